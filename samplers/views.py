"""Between a TileIndex view's row positions (what strata store) and global row ids (what samplers yield)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinov2_patho.data.index import TileIndex

from .base import SamplerError

CACHE_DIRNAME = ".sampler_cache"


def subset_view(index, path: str | Path):
    """`data.subset`: the view of `index` on the global row ids stored in a .npy (a 1-D integer
    array, as `curate sample` writes; order and repeats do not matter). Every sampler draws
    from the view as from a whole index."""
    path = Path(path)
    try:
        rows = np.load(path)
    except (OSError, ValueError) as e:
        raise SamplerError(f"data.subset {path}: cannot read a .npy of row ids: {e}") from e
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise SamplerError(f"data.subset {path}: want a 1-D integer array, got {rows.dtype} {rows.shape}")
    rows = np.unique(rows)
    if rows.size == 0:
        raise SamplerError(f"data.subset {path}: holds no row ids")
    try:
        RowMap(index).to_positions(rows)
    except SamplerError as e:
        raise SamplerError(f"data.subset {path}: {e} (of {len(index)} rows)") from e
    return index.select(rows)


class RowMap:
    def __init__(self, index):
        n = len(index)
        self.num_rows = n
        if getattr(index, "is_view", True) is False:  # a full TileIndex: never materialise its ids
            self.rows = None
            return
        rows = index.row_ids(TileIndex.ALL)  # a view's own ids, no copy
        # sorted unique ids from 0 to n-1 are the identity: keep no copy of them
        self.rows = None if n == 0 or (int(rows[0]) == 0 and int(rows[-1]) == n - 1) else rows

    def to_global(self, positions: np.ndarray) -> np.ndarray:
        if self.rows is None:
            return positions.astype(np.int64)
        return np.asarray(self.rows[positions], dtype=np.int64)

    def to_positions(self, row_ids: np.ndarray) -> np.ndarray:
        row_ids = np.asarray(row_ids, dtype=np.int64)
        if self.rows is None:
            bad = (row_ids < 0) | (row_ids >= self.num_rows)
            pos = row_ids
        else:
            pos = np.minimum(np.searchsorted(self.rows, row_ids), max(self.num_rows - 1, 0))
            bad = np.asarray(self.rows[pos]) != row_ids
        if bad.any():
            raise SamplerError(f"row id {int(row_ids[np.argmax(bad)])} is not in this index view")
        return pos


def cache_dir(index, enabled: bool) -> Path | None:
    """`<index dir>/.sampler_cache` for an on-disk index, else None (no caching)."""
    path = getattr(index, "path", None)
    if not enabled or path is None or not Path(path).is_dir():
        return None
    return Path(path) / CACHE_DIRNAME
