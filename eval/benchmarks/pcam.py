"""PatchCamelyon from its official h5 files (96 px patches of Camelyon16 at level 2)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .base import BENCHMARKS, Benchmark, BenchmarkError, ImageSplit, require_file


class H5Split(ImageSplit):
    """Images `x` [N, H, W, 3] uint8 read lazily from one h5 file; the handle is opened per
    process (DataLoader workers get a pickled split without it)."""

    def __init__(self, x_path: Path, labels: np.ndarray):
        self.x_path = x_path
        self.labels = labels
        self._file: h5py.File | None = None
        with h5py.File(x_path, "r") as f:
            if "x" not in f or f["x"].ndim != 4 or f["x"].shape[0] != len(labels) or f["x"].shape[3] != 3:
                shape = f["x"].shape if "x" in f else None
                raise BenchmarkError(f"{x_path}: expected a dataset 'x' of shape [{len(labels)}, H, W, 3], "
                                     f"got {shape}")

    def read(self, i: int) -> np.ndarray:
        if self._file is None:
            self._file = h5py.File(self.x_path, "r")
        return np.asarray(self._file["x"][i])

    def __getstate__(self):
        return {**self.__dict__, "_file": None}


def _labels(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        if "y" not in f:
            raise BenchmarkError(f"{path}: no dataset 'y' (keys: {list(f)})")
        y = np.asarray(f["y"]).reshape(-1).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 1):
        raise BenchmarkError(f"{path}: labels must be 0/1, found values in [{y.min()}, {y.max()}]")
    return y


@BENCHMARKS.register("pcam")
def pcam(root: Path) -> Benchmark:
    root = Path(root)
    splits = {}
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        stem = f"camelyonpatch_level_2_split_{name}"
        x = require_file(root / f"{stem}_x.h5", f"PCam's {split} images")
        y = require_file(root / f"{stem}_y.h5", f"PCam's {split} labels")
        splits[split] = H5Split(x, _labels(y))
    # level 2 of Camelyon16's 0.243 µm/px scans
    return Benchmark("pcam", ("no_tumor", "tumor"), 0.972, splits)
