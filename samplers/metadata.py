"""The paper's metadata-based baseline: a subset drawn with inverse-frequency weights.

Every row with a value in the metadata column gets weight 1 / (rows sharing its value),
so each value carries the same total weight; `target_size` rows are drawn without
replacement with these weights (as pandas' `DataFrame.sample(weights=...)` in the
reference), by Efraimidis-Spirakis keys: the rows with the smallest E_i / w_i, E_i ~
Exp(1) a hash of (seed, row), in one chunked pass with O(target_size) memory.
"""

from __future__ import annotations

import numpy as np

from dinov2_patho.hashing import hash_key, uniform01

from .base import SamplerError
from .strata import CHUNK

_KEY = 21  # hash domain


def inverse_frequency_subset(codes: np.ndarray, target_size: int, seed: int) -> np.ndarray:
    """Sorted view positions of `target_size` rows; codes < 0 (no metadata) are never drawn."""
    n = len(codes)
    freq = np.zeros(0, dtype=np.int64)
    for a in range(0, n, CHUNK):
        c = np.asarray(codes[a:a + CHUNK]).astype(np.int64)
        c = c[c >= 0]
        counts = np.bincount(c, minlength=len(freq))
        counts[:len(freq)] += freq
        freq = counts
    eligible = int(freq.sum())
    if not 0 < target_size <= eligible:
        raise SamplerError(f"sampler.target_size={target_size}: must be in [1, {eligible}] "
                           f"(rows with a metadata value)")
    best_pos = np.zeros(0, dtype=np.int64)
    best_key = np.zeros(0, dtype=np.float64)
    for a in range(0, n, CHUNK):
        c = np.asarray(codes[a:a + CHUNK]).astype(np.int64)
        pos = a + np.flatnonzero(c >= 0)
        # E / w with w = 1 / freq: the exponential is scaled by the value's frequency
        key = -np.log1p(-uniform01(hash_key(seed, _KEY, pos))) * freq[c[c >= 0]]
        best_pos, best_key = np.r_[best_pos, pos], np.r_[best_key, key]
        if len(best_pos) > target_size:
            keep = np.argpartition(best_key, target_size - 1)[:target_size]
            best_pos, best_key = best_pos[keep], best_key[keep]
    return np.sort(best_pos)
