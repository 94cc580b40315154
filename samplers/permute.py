"""Counter-based randomness: pseudo-random permutations evaluated per element.

Every random choice a sampler makes is a pure function of (seed, what, where): a
hash for numbers (`dinov2_patho.hashing`) and a keyed Feistel network for permutations. Position `i` of the
permutation of [0, n) under `key` is computed in O(1) without materialising the
permutation, so drawing from a 3.5M-tile cluster costs the same as from a 10-tile one
and a resume needs no random-generator state, only counters.
"""

from __future__ import annotations

import numpy as np

from dinov2_patho.hashing import GOLDEN, MIX1, MIX2, as_u64, splitmix64

# six rounds, distinct round-key offsets precomputed (scalar uint64 products would warn on wrap)
_ROUND_C = [np.uint64((int(GOLDEN) * (2 * r + 1)) % (1 << 64)) for r in range(6)]


def _round(v: np.ndarray, key: np.ndarray) -> np.ndarray:
    f = v ^ key
    f *= MIX1
    f ^= f >> np.uint64(32)
    f *= MIX2
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
    i, n, key = as_u64(i), as_u64(n), as_u64(key)
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
    x += splitmix64(key) % n
    x %= n
    return x.astype(np.int64)
