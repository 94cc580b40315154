"""Rows grouped by stratum (a CSR: `order` + `offsets`), built by a chunked counting sort.

A stratum is a (slide group, cluster) pair: without a slide cap there is one slide
group and the strata are the non-empty clusters. Rows whose label is negative (a slide
missing from a metadata CSV) belong to no stratum and are never drawn. The build reads
the labels (and slides) in chunks, so its memory is the `order` array (int32 below 2**31
rows) plus one chunk; the result can be cached next to the index and memory-mapped back.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinov2_patho.io import atomic_dir
from dinov2_patho.logging import get_logger

log = get_logger(__name__)

CHUNK = 1 << 22
CACHE_KEEP = 4  # cached strata kept per index directory, most recently used first
_FILES = ("order", "offsets", "cluster", "group_start")


@dataclass(frozen=True)
class Strata:
    order: np.ndarray  # view positions, grouped by stratum
    offsets: np.ndarray  # int64 [S + 1]: stratum s is order[offsets[s]:offsets[s + 1]]
    cluster: np.ndarray  # int64 [S]: the cluster (label) of each stratum
    group_start: np.ndarray  # int64 [G + 1]: strata of slide group g are group_start[g]:group_start[g + 1]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_groups(self) -> int:
        return len(self.group_start) - 1


def build_strata(num_rows: int, num_labels: int, labels: Callable[[int, int], np.ndarray],
                 groups: Callable[[int, int], np.ndarray] | None = None, num_groups: int = 1) -> Strata:
    """Group view rows [0, num_rows) by (group, label).

    `labels(a, b)` / `groups(a, b)` return the label / slide group of rows a..b-1; a
    negative label drops the row.
    """
    bins = num_groups * num_labels
    if bins >= 2**31 - 1:
        raise ValueError(f"{num_groups} slide groups x {num_labels} clusters is too many strata")
    drop = bins  # one extra bin collects dropped rows at the end of `order`

    key_dtype = np.uint8 if bins < 2**8 else np.uint16 if bins < 2**16 else np.int32

    def keys(a: int, b: int) -> np.ndarray:
        lab = np.asarray(labels(a, b)).astype(np.int64)
        key = lab if groups is None else np.asarray(groups(a, b)).astype(np.int64) * num_labels + lab
        key[lab < 0] = drop
        return key.astype(key_dtype)

    def stable_argsort(key: np.ndarray) -> np.ndarray:
        # both are radix sorts: numpy's for keys of <= 16 bits, torch's (3x numpy's timsort) above
        if key.dtype == np.int32:
            return torch.sort(torch.from_numpy(key), stable=True)[1].numpy()
        return np.argsort(key, kind="stable")

    counts = np.zeros(bins + 1, dtype=np.int64)
    for a in range(0, num_rows, CHUNK):
        counts += np.bincount(keys(a, min(a + CHUNK, num_rows)), minlength=bins + 1)
    cursor = np.concatenate(([0], np.cumsum(counts)[:-1]))
    order = np.empty(num_rows, dtype=np.int32 if num_rows < 2**31 else np.int64)
    for a in range(0, num_rows, CHUNK):
        b = min(a + CHUNK, num_rows)
        key = keys(a, b)
        idx = stable_argsort(key)
        sk = key[idx]
        chunk_counts = np.bincount(sk, minlength=bins + 1)
        first = np.concatenate(([0], np.cumsum(chunk_counts)[:-1]))
        order[(cursor - first)[sk] + np.arange(b - a)] = idx + a
        cursor += chunk_counts
    kept = np.flatnonzero(counts[:bins])
    offsets = np.concatenate(([0], np.cumsum(counts[kept]))).astype(np.int64)
    group_start = np.searchsorted(kept // num_labels, np.arange(num_groups + 1)).astype(np.int64)
    return Strata(order=order, offsets=offsets, cluster=(kept % num_labels).astype(np.int64),
                  group_start=group_start)


class ChunkedColumn:
    """A per-row column read a slice at a time, never held whole (a view's slide column is computed:
    4 bytes a row, 1.4 GB at 350M rows); `cache_key` hashes it by content, like an array."""

    def __init__(self, length: int, read: Callable[[slice], np.ndarray]):
        self.length, self.read = length, read

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.read(rows))


def cache_key(**parts) -> str:
    """A short digest of what determines the strata (arrays and chunked columns hashed by content)."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(parts):
        value = parts[name]
        h.update(name.encode())
        if isinstance(value, (np.ndarray, ChunkedColumn)):
            for a in range(0, len(value), CHUNK):
                h.update(np.ascontiguousarray(value[a:a + CHUNK]).tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _load(final: Path) -> Strata:
    return Strata(**{f: np.load(final / f"{f}.npy", mmap_mode="r") for f in _FILES})


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (made if missing; the kernel drops the lock if
    this process dies, so a killed builder never blocks the next one)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cache_entries(cache_dir: Path) -> list[Path]:
    """The cached strata in `cache_dir`, most recently used first (a load marks an entry used)."""
    if not cache_dir.is_dir():
        return []
    entries = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]  # "." : writes
    return sorted(entries, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def clear_cache(cache_dir: Path) -> int:
    """Remove every cached entry and any leftover of an interrupted write, under the build lock (never
    under a builder); the number of entries removed. Processes that mapped an entry keep reading it."""
    if not cache_dir.is_dir():
        return 0
    with _exclusive(cache_dir):
        removed = len(cache_entries(cache_dir))
        for p in cache_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return removed


def _mark_used(entry: Path) -> None:
    with suppress(OSError):  # a read-only index directory: the order of use is not recorded there
        now = time.time_ns()  # finer than the file system's own clock tick: uses in one tick stay ordered
        os.utime(entry, ns=(now, now))


def load_or_build(cache_dir: Path | None, key_parts: dict, build: Callable[[], Strata],
                  keep: int = CACHE_KEEP) -> Strata:
    """Memory-map cached strata from `cache_dir/<digest of key_parts>`, else build and cache
    them atomically. The digest covers the labels (and slide groups) by content, so a
    cache entry can never serve different strata. Processes that start together (the ranks
    of a node) build once: the first takes a lock on the cache directory and builds, the others wait
    and memory-map its result, so the page cache holds one copy for all of them. After a build
    only the `keep` most recently used entries stay: each is an index-sized `order` array."""
    if keep < 1:
        raise ValueError(f"the sampler cache must keep at least 1 entry, got {keep}")
    if cache_dir is None:
        return build()
    key = cache_key(**key_parts)
    final = cache_dir / key
    with ExitStack() as held:
        try:
            held.enter_context(_exclusive(cache_dir))
        except OSError as e:  # a read-only index directory, or a file system without flock
            log.warning("cannot lock %s (%s): processes starting together may each build the strata",
                        cache_dir, e)
        damaged = False
        if final.is_dir():
            try:
                strata = _load(final)
                _mark_used(final)
                return strata
            except (OSError, ValueError) as e:  # a damaged cache is rebuilt, never trusted
                log.warning("sampler cache %s unreadable (%s): rebuilding", final, e)
                damaged = True
        strata = build()
        try:
            with atomic_dir(final, keep_existing=not damaged) as tmp:
                for f in _FILES:
                    np.save(tmp / f"{f}.npy", getattr(strata, f))
            _mark_used(final)
            for old in cache_entries(cache_dir)[keep:]:
                shutil.rmtree(old, ignore_errors=True)
            return _load(final)  # memory-mapped like the other processes' copy, not private memory
        except (OSError, ValueError) as e:
            log.warning("cannot cache sampler strata in %s (%s): continuing uncached", cache_dir, e)
            return strata
