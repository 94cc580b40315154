"""The paper's metadata-based baseline: a subset drawn with inverse-frequency weights.

Every row with a value in the metadata column gets weight 1 / (rows sharing its value),
so each value carries the same total weight; `target_size` rows are drawn without
replacement with these weights (as pandas' `DataFrame.sample(weights=...)` in the
reference). Rows of one value share one weight, so the draw needs no per-row random key:
  1. how many rows each value gets: Efraimidis-Spirakis keys E / w (E ~ Exp(1)) simulated
     per value, only for the keys below a threshold that leaves a few more than
     `target_size` candidates (truncated exponentials), then the `target_size` smallest;
  2. which rows: a uniform subset of that many of the value's rows (their ranks in view order),
     found in one chunked pass over the codes.
Memory is O(target_size) plus one chunk; time is two passes of bincount/sort over small ints
(per-row hashing cost 77 s at 350M rows on this machine).
"""

from __future__ import annotations

import numpy as np

from .base import SamplerError
from .strata import CHUNK


def _value_counts(codes: np.ndarray) -> np.ndarray:
    freq = np.zeros(0, dtype=np.int64)
    for a in range(0, len(codes), CHUNK):
        c = np.asarray(codes[a:a + CHUNK])
        counts = np.bincount(c[c >= 0], minlength=len(freq))
        counts[:len(freq)] += freq
        freq = counts
    return freq


def _draws_per_value(freq: np.ndarray, target_size: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of each value among the `target_size` smallest keys f_c * E_i (an ES draw with weights 1/f_c)."""
    f = freq.astype(np.float64)
    live = f > 0

    def expected(t: float) -> float:  # rows with a key below t
        return float((f[live] * -np.expm1(-t / f[live])).sum())

    margin = 8 * np.sqrt(target_size) + 16
    while True:
        want = target_size + margin
        if want >= f.sum():
            p = live.astype(np.float64)
        else:
            lo, hi = 0.0, 1.0
            while expected(hi) < want:
                hi *= 2
            for _ in range(60):
                lo, hi = (lo, (lo + hi) / 2) if expected((lo + hi) / 2) >= want else ((lo + hi) / 2, hi)
            p = np.where(live, -np.expm1(-hi / np.where(live, f, 1)), 0.0)
        candidates = rng.binomial(freq, p)
        if candidates.sum() >= target_size:
            break
        margin *= 4  # fewer candidates than asked (many sigma off): a wider threshold
    # candidate keys, grouped by value: f_c * Exp(1) given below the threshold = f_c * -log(1 - U p_c)
    bounds = np.r_[0, np.cumsum(candidates)]
    key = np.empty(bounds[-1], dtype=np.float32)
    for v in np.flatnonzero(candidates):
        key[bounds[v]:bounds[v + 1]] = f[v] * -np.log1p(-rng.random(candidates[v]) * p[v])
    kth = np.partition(key, target_size - 1)[target_size - 1]
    draws = np.array([np.count_nonzero(key[a:b] < kth) for a, b in zip(bounds[:-1], bounds[1:])])
    ties = np.flatnonzero(key == kth)[: target_size - int(draws.sum())]  # float32 ties at the boundary
    return draws + np.bincount(np.searchsorted(bounds, ties, side="right") - 1, minlength=len(freq))


def _draw(freq: np.ndarray, target_size: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows drawn per value and, per value, the sorted ranks (in view order among its rows) drawn."""
    eligible = int(freq.sum())
    if not 0 < target_size <= eligible:
        raise SamplerError(f"sampler.target_size={target_size}: must be in [1, {eligible}] "
                           f"(rows with a metadata value)")
    rng = np.random.default_rng([seed, 21])
    draws = _draws_per_value(freq, target_size, rng)
    ranks = [np.sort(rng.choice(int(n), int(k), replace=False, shuffle=False).astype(np.int32))
             for n, k in zip(freq, draws)]
    return draws, ranks


def inverse_frequency_subset(codes: np.ndarray, target_size: int, seed: int) -> np.ndarray:
    """Sorted view positions of `target_size` rows; codes < 0 (no metadata) are never drawn.
    `codes` is per row, any integer dtype (a memory map is read in chunks)."""
    freq = _value_counts(codes)
    draws, ranks = _draw(freq, target_size, seed)
    seen = np.zeros(len(freq), dtype=np.int64)  # rows of each value before this chunk
    cursor = np.zeros(len(freq), dtype=np.int64)  # ranks of each value already placed
    out = np.empty(target_size, dtype=np.int64)
    filled = 0
    small = np.int16 if len(freq) < 2**15 else np.int32  # stable sort of int16 is a radix sort
    for a in range(0, len(codes), CHUNK):
        c = np.asarray(codes[a:a + CHUNK]).astype(small)
        order = np.argsort(c, kind="stable")  # rows of the chunk grouped by value, in row order
        counts = np.bincount(c[c >= 0], minlength=len(freq))
        start = np.searchsorted(c[order], np.arange(len(freq), dtype=small))  # each value's run in `order`
        for v in np.flatnonzero(draws):
            r, end = ranks[v], seen[v] + counts[v]
            stop = cursor[v] + np.searchsorted(r[cursor[v]:], end)
            picked = r[cursor[v]:stop] - seen[v]
            out[filled:filled + len(picked)] = a + order[start[v] + picked]
            filled += len(picked)
            cursor[v] = stop
        seen += counts
    out.sort()
    return out


def inverse_frequency_subset_of_runs(run_code: np.ndarray, run_start: np.ndarray, run_length: np.ndarray,
                                     target_size: int, seed: int) -> np.ndarray:
    """The same draw as inverse_frequency_subset when the view is runs of rows sharing a code (a slide's
    rows in an index grouped by slide; `run_start` ascending): O(runs + target_size), no per-row pass."""
    run_code = np.asarray(run_code, dtype=np.int64)
    has = run_code >= 0
    freq = np.bincount(run_code[has], weights=run_length[has], minlength=int(run_code.max(initial=-1)) + 1)
    draws, ranks = _draw(freq.astype(np.int64), target_size, seed)
    out = np.empty(target_size, dtype=np.int64)
    filled = 0
    for v in np.flatnonzero(draws):
        runs = np.flatnonzero(run_code == v)
        ends = np.cumsum(run_length[runs])
        which = np.searchsorted(ends, ranks[v], side="right")
        out[filled:filled + len(which)] = run_start[runs][which] + ranks[v] - (ends - run_length[runs])[which]
        filled += len(which)
    out.sort()
    return out
