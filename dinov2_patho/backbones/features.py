"""The project's one feature engine: a frozen backbone over a dataset, into memory-mapped arrays,
resumable. `fill_features` is the loop (evaluation splits, `curate embed`'s shards, slide bags);
`extract_features` is evaluation's cache on top of it.

Per split, `<cache>/<split>/` holds `cls.npy` and `patch_mean.npy` (float32 [N, D], .npy
files opened with `np.load(mmap_mode="r")`), `labels.npy` and `meta.json`. Rows are
written in dataset order; `progress.json` records how many rows are on disk (rewritten
atomically after the arrays are flushed), so an interrupted extraction resumes at the
first missing row. `meta.json` appears last, marking the split complete.

`<cache>/manifest.json` (`check_cache_manifest`) records what the features are of (a sha256 of
the backbone's weights, the preprocessing, the images); a cache of other settings is refused
naming the first difference, never reused (evaluation's features and the slide bags).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_write_text
from dinov2_patho.jsonfile import JsonFileError, first_difference, read_json
from dinov2_patho.logging import get_logger
from dinov2_patho.progress import progress_bar
from dinov2_patho.readback import DamagedFileError, load_npy, rebuilding

log = get_logger(__name__)

TOKENS = ("cls", "patch_mean")
MANIFEST = "manifest.json"


def weights_hash(module: nn.Module) -> str:
    """sha256 of the module's parameters and buffers, in state_dict order (a module in memory, as the
    trainer's teacher, has no weights file to hash)."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_cache_manifest(cache: Path, manifest: dict, what: str) -> None:
    """Write `cache`/manifest.json on first use; a cache whose manifest differs is a UserError naming
    the first difference (`what`: the cached things, as the message names them)."""
    path = cache / MANIFEST
    if path.is_file():
        recorded = read_json(path, f"{what} cache manifest", "delete that directory or give another output "
                             "directory")
        diff = first_difference(recorded, manifest)
        if diff is not None:
            raise UserError(f"{path}: {what} of other settings ({diff}); delete that directory or give "
                            "another output directory")
    else:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(manifest, indent=1))


def embed(backbone: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """CLS and mean patch token [B, D] from our ViT (`forward_features` dict), a timm ViT
    (`forward_features` tensor with `num_prefix_tokens`), or any module mapping images to
    [B, D] (then both are its output: it has no patch tokens to average)."""
    if hasattr(backbone, "forward_features"):
        out = backbone.forward_features(images)
        if isinstance(out, dict):
            return {"cls": out["x_norm_clstoken"], "patch_mean": out["x_norm_patchtokens"].mean(1)}
        if out.ndim == 3:
            prefix = getattr(backbone, "num_prefix_tokens", 1)
            return {"cls": out[:, 0], "patch_mean": out[:, prefix:].mean(1)}
    out = backbone(images)
    if out.ndim != 2:
        raise UserError(f"backbone {type(backbone).__name__} returned shape {tuple(out.shape)}; "
                        "expected [B, D]")
    return {"cls": out, "patch_mean": out}


@dataclass(frozen=True)
class Features:
    cls: np.ndarray  # [N, D] float32 (memory-mapped)
    patch_mean: np.ndarray
    labels: np.ndarray  # [N] int64

    def tokens(self, which: str) -> np.ndarray:
        """`cls`, `patch_mean`, or `cls+patch_mean` (concatenated, as DINOv2's linear eval)."""
        if which == "cls+patch_mean":
            return np.concatenate([self.cls, self.patch_mean], axis=1)
        if which not in TOKENS:
            raise UserError(f"features.tokens: unknown {which!r}; valid: cls, patch_mean, cls+patch_mean")
        return np.asarray(getattr(self, which))


def load_features(split_dir: str | Path) -> Features:
    split_dir = Path(split_dir)
    if not (split_dir / "meta.json").is_file():
        raise UserError(f"{split_dir}: no meta.json, the feature extraction of this split is incomplete")
    return Features(*_cached_arrays(split_dir, "r"))


def _cached_arrays(split_dir: Path, mode: str, rows: int | None = None) -> list[np.ndarray]:
    """The split's token arrays then labels, memory-mapped, as many rows each (`rows` where given);
    a DamagedFileError otherwise (the cache rebuilds)."""
    arrays: list[np.ndarray] = []
    for name in (*TOKENS, "labels"):
        arrays.append(load_npy(split_dir / f"{name}.npy", "cached feature array", "", mmap_mode=mode,
                               kinds="i" if name == "labels" else "f", ndim=1 if name == "labels" else 2,
                               rows=rows if not arrays else len(arrays[0])))
    return arrays


def select_token(out: dict[str, torch.Tensor], which: str) -> torch.Tensor:
    """`cls`, `patch_mean` or `cls+patch_mean` of an `embed` output."""
    if which == "cls+patch_mean":
        return torch.cat([out["cls"], out["patch_mean"]], dim=1)
    if which not in TOKENS:
        raise UserError(f"unknown token {which!r}; valid: cls, patch_mean, cls+patch_mean")
    return out[which]


def backbone_device(backbone: nn.Module) -> torch.device:
    return next(backbone.parameters(), torch.empty(0)).device


def feature_dim(backbone: nn.Module, image: torch.Tensor, token: str = "cls") -> int:
    """D of `token` for one input image [C, H, W] (a forward pass on the backbone's device)."""
    with torch.inference_mode():
        out = embed(backbone, image.unsqueeze(0).to(backbone_device(backbone)))
    return int(select_token(out, token).shape[1])


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


@torch.inference_mode()
def fill_features(backbone: nn.Module, dataset: Dataset, outputs: dict[str, tuple[np.ndarray, str]],
                  progress_file: str | Path, *, batch_size: int = 64, num_workers: int = 0,
                  progress: bool = True, desc: str = "features", unit: str = "img", amp: str = "none",
                  on_device: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  checkpoint_seconds: float = 0.0) -> None:
    """Embed items `(image, label)` of `dataset` into rows of the `outputs` arrays, in order.

    `outputs` maps a name to (array with len(dataset) rows, source): a token of `select_token`, or
    `label`. Arrays are flushed, then `progress_file` ({"rows": done}) rewritten atomically after
    a batch once `checkpoint_seconds` have passed since the last time (0: every batch; a cluster
    file system makes each fsync costly), so a killed run resumes at its last checkpoint; the end
    of the run is always checkpointed. A complete run leaves
    {"rows": len(dataset)} there and returns at once when called again. `on_device` maps a batch on
    the backbone's device to its input (say uint8 tiles -> normalised floats: 4x fewer bytes to
    move); `amp` (bf16 | fp16 | none) autocasts the forward pass on CUDA."""
    progress_file = Path(progress_file)
    n = len(dataset)
    done = rows_done(progress_file, n) if progress_file.is_file() else 0
    if done == n:
        return
    if amp not in AMP_DTYPES:
        raise UserError(f"amp: unknown {amp!r}; valid: {', '.join(AMP_DTYPES)}")
    device = backbone_device(backbone)
    autocast = torch.autocast("cuda", dtype=AMP_DTYPES[amp], enabled=device.type == "cuda"
                              and AMP_DTYPES[amp] is not None)
    backbone.eval()
    if done:
        log.info("%s: resuming at row %d of %d", desc, done, n)
    loader = DataLoader(Subset(dataset, range(done, n)), batch_size=batch_size, num_workers=num_workers,
                        shuffle=False, persistent_workers=False, pin_memory=device.type == "cuda")
    last_checkpoint = time.monotonic()
    with progress_bar(total=n, initial=done, desc=desc, disable=not progress, unit=unit,
                      unit_scale=True) as bar:
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            with autocast:
                out = embed(backbone, on_device(images) if on_device is not None else images)
            stop = done + images.shape[0]
            for array, source in outputs.values():
                array[done:stop] = labels.numpy() if source == "label" else \
                    select_token(out, source).float().cpu().numpy()
            done = stop
            if done == n or time.monotonic() - last_checkpoint >= checkpoint_seconds:
                for array, _ in outputs.values():
                    if isinstance(array, np.memmap):
                        array.flush()
                write_rows_done(progress_file, done)
                last_checkpoint = time.monotonic()
            bar.update(images.shape[0])


def write_rows_done(progress_file: Path, rows: int) -> None:
    atomic_write_text(progress_file, json.dumps({"rows": rows}))


def rows_done(progress_file: Path, n: int) -> int:
    """The rows of `n` a progress file of fill_features says are on disk."""
    fix = "delete it to extract from the first row again"
    rows = read_json(progress_file, "feature progress record", fix, shape={"rows": int})["rows"]
    if not 0 <= rows <= n:
        raise JsonFileError(f"{progress_file}: {rows} rows done of {n}; {fix}")
    return rows


def _resumable(split_dir: Path, n: int) -> Features | dict[str, np.ndarray] | None:
    """A complete cached split, the arrays of a partial one to resume, or None (nothing cached); a
    damaged cache (a file cut short or replaced, a progress record unreadable) is dropped, saying so."""
    try:
        if (split_dir / "meta.json").is_file():
            features = load_features(split_dir)
            if len(features.labels) != n:
                raise DamagedFileError(f"{split_dir}: cached split of {len(features.labels)} rows, the "
                                       f"dataset has {n}")
            return features
        if (split_dir / "progress.json").is_file():
            rows_done(split_dir / "progress.json", n)
            return dict(zip((*TOKENS, "labels"), _cached_arrays(split_dir, "r+", n)))
    except (DamagedFileError, JsonFileError) as e:
        rebuilding(e, "feature cache")
        shutil.rmtree(split_dir)
    return None


def extract_features(backbone: nn.Module, dataset: Dataset, split_dir: str | Path, *, batch_size: int = 64,
                     num_workers: int = 0, progress: bool = True, desc: str = "features") -> Features:
    """Embed every item (image tensor, label) of `dataset` with the frozen `backbone`
    into `split_dir`, resuming a partial run, returning the cached features. Images go to
    the backbone's device; the backbone is left where it is (the trainer's teacher)."""
    split_dir = Path(split_dir)
    n = len(dataset)
    arrays = _resumable(split_dir, n)
    if isinstance(arrays, Features):
        return arrays
    if n == 0:
        raise UserError(f"{desc}: the dataset is empty, nothing to extract into {split_dir}")
    split_dir.mkdir(parents=True, exist_ok=True)
    progress_file = split_dir / "progress.json"
    if arrays is None:
        backbone.eval()
        dim = feature_dim(backbone, dataset[0][0])
        arrays = {name: np.lib.format.open_memmap(split_dir / f"{name}.npy", "w+", np.float32, (n, dim))
                  for name in TOKENS}
        arrays["labels"] = np.lib.format.open_memmap(split_dir / "labels.npy", "w+", np.int64, (n,))
    outputs = {name: (arrays[name], name) for name in TOKENS}
    outputs["labels"] = (arrays["labels"], "label")
    fill_features(backbone, dataset, outputs, progress_file, batch_size=batch_size, num_workers=num_workers,
                  progress=progress, desc=desc)
    del arrays, outputs
    atomic_write_text(split_dir / "meta.json", json.dumps({"rows": n}))
    progress_file.unlink()
    return load_features(split_dir)
