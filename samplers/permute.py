"""Counter-based randomness: hashes and pseudo-random permutations evaluated per element.

Every random choice a sampler makes is a pure function of (seed, what, where): a
hash for numbers and a keyed Feistel network for permutations. Position `i` of the
permutation of [0, n) under `key` is computed in O(1) without materialising the
permutation, so drawing from a 3.5M-tile cluster costs the same as from a 10-tile one
and a resume needs no random-generator state, only counters.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ROUNDS = 4
# distinct odd round constants, precomputed (scalar uint64 products would warn on wrap)
_ROUND_C = [np.uint64((0x9E3779B97F4A7C15 * (2 * r + 1)) % (1 << 64)) for r in range(_ROUNDS)]


def _u64(x) -> np.ndarray:
    return np.atleast_1d(np.asarray(x, dtype=np.uint64))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of uint64 (wraps on purpose)."""
    x = _u64(x) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_key(*parts) -> np.ndarray:
    """A uint64 key per element from integer parts (scalars or arrays, broadcast)."""
    h = mix64(np.uint64(0x5EED))
    for p in parts:
        h = mix64(h ^ _u64(p))
    return h


def uniform01(key: np.ndarray) -> np.ndarray:
    """A float in [0, 1) per key."""
    return (mix64(key) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _half_bits(n: np.ndarray) -> np.ndarray:
    # bit length of n-1 (exact below 2**53), split over two Feistel halves
    bits = np.frexp((n - np.uint64(1)).astype(np.float64))[1].astype(np.uint64)
    return (bits + np.uint64(1)) >> np.uint64(1)


def _feistel(x: np.ndarray, half: np.ndarray, key: np.ndarray) -> np.ndarray:
    mask = (np.uint64(1) << half) - np.uint64(1)
    left, right = x >> half, x & mask
    for c in _ROUND_C:
        f = right ^ key
        f *= _M1
        f += c
        f ^= f >> np.uint64(31)
        f *= _M2
        f >>= np.uint64(32)
        f &= mask
        f ^= left
        left, right = right, f
    return (left << half) | right


def permute(i, n, key) -> np.ndarray:
    """Element `i` of the pseudo-random permutation of [0, n) keyed by `key`.

    A balanced Feistel network over the smallest even number of bits covering n is a
    bijection of [0, 4**h); cycle walking (re-applying it until the value falls below n)
    restricts it to a bijection of [0, n). The domain is < 4n, so a walk is short.
    Arguments broadcast; i < n >= 1 elementwise. Returns int64.
    """
    i, n, key = np.broadcast_arrays(_u64(i), _u64(n), _u64(key))
    half = _half_bits(n)
    x = _feistel(i, half, key)
    out = np.flatnonzero(x >= n)
    while out.size:
        x[out] = _feistel(x[out], half[out], key[out])
        out = out[x[out] >= n[out]]
    return x.astype(np.int64)
