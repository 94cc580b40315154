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
# six rounds, distinct round-key offsets precomputed (scalar uint64 products would warn on wrap)
_ROUND_C = [np.uint64((0x9E3779B97F4A7C15 * (2 * r + 1)) % (1 << 64)) for r in range(6)]


def _u64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    return x if x.ndim else x.reshape(1)


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


def _round(v: np.ndarray, key: np.ndarray) -> np.ndarray:
    f = v ^ key
    f *= _M1
    f ^= f >> np.uint64(32)
    f *= _M2
    return f >> np.uint64(32)


def _feistel(x: np.ndarray, a: np.ndarray, half: np.ndarray, keys: list[np.ndarray]) -> np.ndarray:
    """A Feistel network on [0, a * 2**half): x = l * 2**half + r with l in Z_a, r in Z_{2**half};
    rounds alternately add a keyed hash of one half to the other (each invertible)."""
    mask = (np.uint64(1) << half) - np.uint64(1)
    left, right = x >> half, x & mask
    for k_left, k_right in zip(keys[::2], keys[1::2]):
        left += _round(right, k_left)
        left %= a
        right += _round(left, k_right)
        right &= mask
    return (left << half) | right


def permute(i, n, key) -> np.ndarray:
    """Element `i` of the pseudo-random permutation of [0, n) keyed by `key`.

    A mixed-radix Feistel network is a bijection of [0, a * b) with b = 2**h about sqrt(n)
    and a = ceil(n / b); cycle walking (re-applying it until the value falls below n)
    restricts it to a bijection of [0, n). a * b < n + b, so few values need a walk.
    Arguments broadcast; i < n >= 1 elementwise. Returns int64.
    """
    i, n, key = _u64(i), _u64(n), _u64(key)
    if not i.shape == n.shape == key.shape:
        i, n, key = (a.copy() for a in np.broadcast_arrays(i, n, key))
    bits = np.frexp((n - np.uint64(1)).astype(np.float64))[1].astype(np.uint64)  # of n - 1, exact < 2**53
    half = bits >> np.uint64(1)
    a = ((n - np.uint64(1)) >> half) + np.uint64(1)
    keys = [key + c for c in _ROUND_C]
    x = _feistel(i, a, half, keys)
    out = np.flatnonzero(x >= n)
    while out.size:
        x[out] = _feistel(x[out], a[out], half[out], [k[out] for k in keys])
        out = out[x[out] >= n[out]]
    # a keyed rotation on top: tiny domains get few distinct Feistel permutations, and
    # this makes every element's position exactly uniform over keys
    x += mix64(key) % n
    x %= n
    return x.astype(np.int64)
