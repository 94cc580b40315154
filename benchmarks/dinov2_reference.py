"""A facebookresearch/dinov2 checkout imported side by side with ours, for the benchmarks that compare
against it (train_step.py, loss_fidelity.py). The checkout stays outside the project.

Here there is no xformers (no CPU kernels), no fvcore and no torchvision that loads against the CPU
torch wheel, so: XFORMERS_DISABLED=1 on CPU (the reference's own CPU path); `dinov2.data` and
`dinov2.train`, whose package __init__ imports torchvision, are loaded module by module from their
files; and for its SSLMetaArch two stand-ins: fvcore's Checkpointer (only subclassed, never used here)
and xformers' BlockDiagonalMask, which in `forward_backward` only concatenates the head inputs and
splits the head outputs back (no attention goes through it).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import warnings
from pathlib import Path
from types import ModuleType

import torch


def import_reference(repo: Path, device: torch.device) -> ModuleType:
    """dinov2.models.vision_transformer of the checkout at `repo`."""
    if device.type == "cpu":
        os.environ["XFORMERS_DISABLED"] = "1"
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dinov2.models import vision_transformer as ref_vits
    return ref_vits


def load_module(repo: Path, relpath: str) -> ModuleType:
    """One module of the checkout from its file (`dinov2/data/masking.py`), without its package's
    __init__; its own imports are absolute, so they resolve through `import_reference`'s sys.path."""
    name = relpath.removesuffix(".py").replace("/", ".")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, repo / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module


class _BlockDiagonalMask:
    """xformers.ops.fmha.BlockDiagonalMask as dinov2's forward_backward uses it: concatenate
    [1, n_i, D] tensors along the tokens, and split a [1, sum n_i, K] output back."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    @classmethod
    def from_tensor_list(cls, tensors: list[torch.Tensor]) -> tuple[_BlockDiagonalMask, torch.Tensor]:
        return cls([t.shape[1] for t in tensors]), torch.cat(tensors, dim=1)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.split(self.sizes, dim=1))


def _stand_in(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def reference_ssl_meta_arch(repo: Path, device: torch.device) -> type:
    """The checkout's SSLMetaArch class, with the stand-ins above where the real packages are missing."""
    import_reference(repo, device)
    if importlib.util.find_spec("fvcore") is None:
        _stand_in("fvcore")
        _stand_in("fvcore.common")
        _stand_in("fvcore.common.checkpoint", Checkpointer=object)
    if importlib.util.find_spec("xformers") is None:
        # only `fmha`: dinov2.loss's `from xformers.ops import cross_entropy` still fails, so it keeps
        # its plain-torch cross-entropy
        _stand_in("xformers")
        _stand_in("xformers.ops", fmha=types.SimpleNamespace(BlockDiagonalMask=_BlockDiagonalMask))
    return load_module(repo, "dinov2/train/ssl_meta_arch.py").SSLMetaArch
