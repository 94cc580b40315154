"""A frozen backbone from disk: a training run's teacher (its run directory or a checkpoint
directory, built at its own architecture from the config saved with it), a weights file
(ours, DINOv2 hub format or a timm ViT, loaded into our ViT by `load_pretrained`), or any
timm model by name (`timm/<name>`). `BackboneConfig`: the `backbone` section of the eval configs."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinov2_patho.backbones.hub import build_hub_backbone, is_hub_name
from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger
from dinov2_patho.registry import did_you_mean

log = get_logger(__name__)


@dataclass
class BackboneConfig:
    """The `backbone` section of `eval run`'s and `eval slide`'s configs: what `load_backbone` loads."""

    path: str | None = None           # checkpoint (ours, DINOv2 hub, timm); null = random init baseline
    arch: str = "vit_small"           # our backbone name, or timm/<model name>
    weights_format: str = "auto"      # auto | ours | dinov2 | timm
    seed: int = 0                     # the random init of a baseline (path null): the same weights every run
    model: dict[str, Any] = field(default_factory=dict)  # build_backbone kwargs (patch_size, ffn, ...)


@contextlib.contextmanager
def frozen(backbone: nn.Module) -> Iterator[nn.Module]:
    """`backbone` in eval mode for the block (the trainer's teacher goes back to its mode after)."""
    was_training = backbone.training
    backbone.eval()
    try:
        yield backbone
    finally:
        backbone.train(was_training)

TIMM_PREFIX = "timm/"
# fixed by the architecture's name: our registered ViTs take every other VisionTransformer argument
_SIZE_ARGS = ("embed_dim", "depth", "num_heads")


def _check_model_kwargs(arch: str, model_kwargs: dict[str, Any]) -> None:
    from dinov2_patho.models import VisionTransformer

    valid = [p for p in inspect.signature(VisionTransformer).parameters if p not in _SIZE_ARGS]
    for key in model_kwargs:
        if key in _SIZE_ARGS:
            raise UserError(f"backbone.model.{key}: fixed by backbone.arch={arch}; to evaluate a run's own "
                            f"teacher at its size, give its run directory as --backbone")
        if key not in valid:
            raise UserError(f"backbone.model.{key}: not an option of {arch}{did_you_mean(key, valid)}")


def _training_run(path: str | Path | None) -> Path | None:
    """A run or checkpoint directory (or a checkpoint's state file, taken as its directory)."""
    from dinov2_patho.checkpoint_files import SHARED_FILE

    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent if path.name == SHARED_FILE and path.is_file() else None


def _arch_name(arch: str, model_kwargs: dict[str, Any]) -> str:
    options = ", ".join(f"{k}={v}" for k, v in model_kwargs.items())
    return f"arch {arch}" + (f" ({options})" if options else "")


def backbone_record(path: str | Path | None, arch: str, seed: int) -> dict[str, Any]:
    """What results record of the evaluated backbone: the seed only for a random initialisation; no
    arch for a training run's teacher, which is evaluated at its own architecture, not `arch`."""
    return {"path": None if path is None else str(path), "arch": None if _training_run(path) else arch,
            "seed": int(seed) if path is None else None}


def backbone_label(path: str | Path | None, arch: str, model: nn.Module) -> str:
    """How a summary names the backbone built by `load_backbone`: `arch`, but a training run's
    teacher by its run and sizes (it is built from the run's config, whatever `arch` says)."""
    run = _training_run(path)
    if run is None:
        return arch
    return (f"the teacher of {run}: ViT {model.embed_dim}-dim, {model.n_blocks} blocks, patch "
            f"{model.patch_size}")


def load_backbone(path: str | Path | None, arch: str = "vit_small", weights_format: str = "auto",
                  seed: int = 0, **model_kwargs: Any) -> nn.Module:
    """`arch` is one of our backbones (`vit_small`, ...; `model_kwargs` go to `build_backbone`)
    or `timm/<model name>`. `path=None` keeps the random initialisation (a baseline), drawn from
    `seed` so that a baseline is reproducible; a directory is a training run or checkpoint, whose
    teacher is evaluated (`arch` unused). The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = _build(path, arch, weights_format, **model_kwargs)
    if path is None:
        log.warning("backbone %s: no weights given, evaluating a random initialisation (seed %d)", arch, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _build(path: str | Path | None, arch: str, weights_format: str, **model_kwargs: Any) -> nn.Module:
    run = _training_run(path)
    if run is not None:
        from dinov2_patho.backbones.teacher import teacher_backbone

        if model_kwargs:
            raise UserError(f"backbone.model: {path} is a training run, built from its own config; "
                            f"drop backbone.model ({', '.join(model_kwargs)})")
        log.info("backbone: the teacher of %s at its own architecture (backbone.arch is not used)", run)
        model = teacher_backbone(run)
    elif is_hub_name(arch):
        model = build_hub_backbone(arch, path, **model_kwargs)
    elif arch.startswith(TIMM_PREFIX):
        from dinov2_patho.models.weights import import_timm

        timm = import_timm()
        try:
            model = timm.create_model(arch[len(TIMM_PREFIX):], pretrained=False, num_classes=0,
                                      **model_kwargs)
        except (RuntimeError, TypeError) as e:  # timm's unknown-model error; a keyword it does not take
            raise UserError(f"backbone arch {arch!r}: {e}") from e
        if path is not None:
            if not Path(path).is_file():
                raise UserError(f"{path}: checkpoint not found")
            try:
                timm.models.load_checkpoint(model, str(path), strict=True)
            except RuntimeError as e:  # torch's state-dict mismatch: many lines naming every key
                from dinov2_patho.models import weights

                sd, _ = weights.extract_state_dict(weights.read_checkpoint(path), str(path))
                first = weights.first_mismatch(model.state_dict(), sd) or str(e).strip().splitlines()[0]
                raise UserError(f"{path}: does not fit {_arch_name(arch, model_kwargs)}: {first}") from e
    else:
        from dinov2_patho.models import BACKBONES, build_backbone, load_pretrained
        from dinov2_patho.models.weights import WeightsMismatchError

        if arch not in BACKBONES:
            raise UserError(f"backbone arch {arch!r} is unknown (valid: {', '.join(BACKBONES.names())}, "
                            f"{TIMM_PREFIX}<model name>, local-dir:PATH or hf-hub:ORG/NAME)")
        _check_model_kwargs(arch, model_kwargs)
        model = build_backbone(arch, **model_kwargs)
        if path is not None:
            try:
                load_pretrained(model, path, format=weights_format)
            except WeightsMismatchError as e:
                raise UserError(f"{path}: does not fit {_arch_name(arch, model_kwargs)}: {e.first}") from e
    return model
