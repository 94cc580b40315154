"""Counter-based hashing with splitmix64 (Steele, Lea & Flood 2014): the project's one mixer.

Random choices that must not depend on process, sharding or resume (sampler draws, tile
hashes, curation's random picks) are pure functions of integers through these. uint64
arithmetic wraps on purpose; arrays wrap silently in numpy, scalars are made arrays first.
"""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # the state increment
# the finaliser's multipliers (also good constants for other invertible mixes)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def as_u64(x) -> np.ndarray:
    """`x` as a uint64 array of at least one dimension."""
    x = np.asarray(x, dtype=np.uint64)
    return x if x.ndim else x.reshape(1)


def splitmix64(x) -> np.ndarray:
    """splitmix64's output for state `x`: add the golden gamma, then the finaliser's avalanche
    (a bijection of uint64). splitmix64(0) is the generator's first output for seed 0."""
    x = as_u64(x) + GOLDEN
    x = (x ^ (x >> np.uint64(30))) * MIX1
    x = (x ^ (x >> np.uint64(27))) * MIX2
    return x ^ (x >> np.uint64(31))


def hash_key(*parts) -> np.ndarray:
    """A uint64 key per element from integer parts (scalars or arrays, broadcast)."""
    h = splitmix64(np.uint64(0x5EED))
    for p in parts:
        h = splitmix64(h ^ as_u64(p))
    return h


def uniform01(key: np.ndarray) -> np.ndarray:
    """A float in [0, 1) per key (53 random bits)."""
    return (splitmix64(key) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
