"""Bags: the frozen features of a slide's tissue tiles, cached per slide.

`<cache>/manifest.json` records what the features are of (backbone name and a sha256 of its
weights, the tile list's fingerprint, the slides' mpp override, token, cap, tile size and normalisation);
a cache whose manifest differs is refused naming the first difference, never reused. Each slide's
bag is filled by the project's one feature engine (`backbones.features.fill_features`, uint8 tiles
normalised on the device) into `<cache>/slides/<slide_id>/`: `rows.npy` (the tile rows of the
index, written first), `features.npy` (float32 [n, D] of the token) and `progress.json`, which
makes an interrupted extraction resume and marks the bag complete when it reaches n. A task over
feature files (`eval slide --features`) has its bags on disk already: `feature_bags` reads them.
"""

from __future__ import annotations

import functools
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from dinov2_patho.backbones.features import (
    check_cache_manifest,
    feature_dim,
    fill_features,
    rows_done,
    weights_hash,
)
from dinov2_patho.backbones.hub import normalisation
from dinov2_patho.backbones.preprocess import normalise_on_device
from dinov2_patho.data.feature_files import feature_file_name, write_feature_file
from dinov2_patho.data.index import tile_list_fingerprint
from dinov2_patho.data.readers import TILE_PX
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path
from dinov2_patho.jsonfile import JsonFileError
from dinov2_patho.progress import progress_bar
from dinov2_patho.readback import DamagedFileError, load_npy, rebuilding
from dinov2_patho.slide_files import slide_path

from .tasks import SlideTask


def capped_rows(rows: np.ndarray, slide_id: str, cap: int | None, seed: int) -> np.ndarray:
    """At most `cap` of a slide's tile rows, drawn with a generator seeded by (seed, slide id), so a
    slide's bag does not depend on which other slides the task holds; sorted."""
    if cap is None or len(rows) <= cap:
        return rows
    rng = np.random.default_rng([seed, zlib.crc32(slide_id.encode())])
    return np.sort(rng.choice(rows, cap, replace=False))


def bag_manifest(task: SlideTask, backbone: nn.Module, backbone_name: str, token: str, cap: int | None,
                 seed: int, size: int | None = None) -> dict:
    return {"backbone": backbone_name, "weights_sha256": weights_hash(backbone),
            "tiles": {"index": str(Path(task.tiles.path).resolve()),
                      "fingerprint": tile_list_fingerprint(Path(task.tiles.path))},
            "mpp_override": task.mpp, "token": token, "max_tiles": cap, "cap_seed": seed, "size": size,
            "normalisation": dict(zip(("mean", "std"), map(list, normalisation(backbone))))}


def _cached_bag(slide_dir: Path, rows: np.ndarray) -> np.ndarray | None:
    """The (partial) cached bag of `rows`, memory-mapped to resume, or None when it was damaged (a file
    cut short or replaced, an unreadable progress record): dropped, saying so."""
    try:
        rows_done(slide_dir / "progress.json", len(rows))
        cached = load_npy(slide_dir / "rows.npy", "cached bag's tile rows", "", kinds="iu", ndim=1)
        if not np.array_equal(cached, rows):
            raise UserError(f"{slide_dir}: cached bag of other tiles ({len(cached)} rows, {len(rows)} in the "
                            "index now); delete the cache to re-extract")
        return load_npy(slide_dir / "features.npy", "cached bag", "", kinds="f", ndim=2, rows=len(rows),
                        mmap_mode="r+")
    except (DamagedFileError, JsonFileError) as e:
        rebuilding(e, "bag cache")
        shutil.rmtree(slide_dir)
        return None


def _bag(backbone: nn.Module, tiles: Subset, rows: np.ndarray, slide_dir: Path, token: str,
         dim: Callable[[], int], batch_size: int, num_workers: int, on_device) -> np.ndarray:
    """One slide's bag, filled where the cache lacks it."""
    progress, features = slide_dir / "progress.json", slide_dir / "features.npy"
    array = _cached_bag(slide_dir, rows) if progress.is_file() else None
    if array is None:
        slide_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(slide_dir / "rows.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, rows)
        array = np.lib.format.open_memmap(features, "w+", np.float32, (len(rows), dim()))
    fill_features(backbone, tiles, {"features": (array, token)}, progress, batch_size=batch_size,
                  num_workers=num_workers, progress=False, on_device=on_device)
    return np.array(array)  # in memory: the head reads every bag each epoch


def extract_bags(task: SlideTask, backbone: nn.Module, cache: str | Path, *, backbone_name: str,
                 token: str = "cls", cap: int | None = None, seed: int = 0, batch_size: int = 64,
                 num_workers: int = 0, size: int | None = None, progress: bool = True,
                 source=None) -> list[np.ndarray]:
    """The bag [n_tiles, D] of every slide of `task` (in its order), extracted where not cached.
    Tiles are read through `source` (default: the task's slides at their own or the override mpp),
    and resized to `size` px when given."""
    from dinov2_patho.data.augment import resize
    from dinov2_patho.data.dataset import TileDataset
    from dinov2_patho.data.readers import SlideTileSource

    cache = Path(cache)
    check_cache_manifest(cache, bag_manifest(task, backbone, backbone_name, token, cap, seed, size), "bags")
    source = source if source is not None else SlideTileSource(task.registry, mpp_override=task.mpp,
                                                                      mpp_key="mpp (eval slide)")
    # (uint8 [3, 224, 224] tile, or [3, size, size], row id) by global row id
    dataset = TileDataset(task.tiles, source, None if size is None else functools.partial(resize, size=size))
    on_device = normalise_on_device(*normalisation(backbone))
    side = size or 224
    blank = on_device(torch.zeros(1, 3, side, side, dtype=torch.uint8))[0]
    dim = functools.cache(lambda: feature_dim(backbone, blank, token))  # only when a bag is missing
    bags = []
    for slide_id in progress_bar(task.slide_ids, desc=f"{task.name} bags", unit="slide",
                                 disable=not progress):
        rows = capped_rows(task.tile_rows(slide_id), slide_id, cap, seed)
        if len(rows) == 0:  # task_from_rows refuses such slides before any bag
            raise UserError(f"slide task {task.name}: slide {slide_id!r} has no tiles to make a bag of")
        slide_dir = slide_path(cache / "slides", slide_id)
        bags.append(_bag(backbone, Subset(dataset, rows.tolist()), rows, slide_dir, token, dim, batch_size,
                         num_workers, on_device))
    return bags


def feature_bags(task: SlideTask, *, cap: int | None = None, seed: int = 0,
                 progress: bool = True) -> list[np.ndarray]:
    """The bag of every slide of a task over feature files, read from its file (at most `cap` rows,
    drawn as `extract_bags` draws them)."""
    assert task.features is not None, "a task over feature files"
    bags = []
    for slide_id in progress_bar(task.slide_ids, desc=f"{task.name} bags", unit="slide",
                                 disable=not progress):
        file = task.features[slide_id]
        rows = capped_rows(np.arange(file.num_rows), slide_id, cap, seed)
        bags.append(file.bag(None if len(rows) == file.num_rows else rows))
    return bags


def write_bags(task: SlideTask, bags: list[np.ndarray], folder: Path, *, cap: int | None = None,
               seed: int = 0) -> None:
    """Each bag of `extract_bags` as trident's `<slide_id>.h5` (features, level-0 coords of its tiles), the
    layout `eval slide --features` and Patho-Bench read."""
    for slide_id, bag in zip(task.slide_ids, bags):
        _, x, y = task.tiles.tiles(capped_rows(task.tile_rows(slide_id), slide_id, cap, seed))
        write_feature_file(folder / feature_file_name(slide_id, f"slide task {task.name}"), bag,
                           np.stack([x, y], 1), {"patch_size": TILE_PX})
