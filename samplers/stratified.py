"""Cluster-stratified batches (Chen et al. 2025, "BS"), at a tree level or by a metadata column.

Semantics, with K the number of non-empty clusters available and B the global batch:

* Quotas (alpha = 0, the paper): each batch shuffles the K clusters afresh; each gets
  floor(B/K) tiles, plus one for the first B mod K in the shuffled order. K > B gives B
  distinct clusters with one tile each. Empty clusters (no rows in this view, or only
  rows of slides missing from the metadata CSV) do not count in K and are never drawn.
* Quotas (alpha != 0): cluster weights size**alpha (alpha = 1: uniform over tiles).
  Systematic sampling: the clusters are laid out in a seeded random order as intervals
  of length B * w / sum(w) and B points spaced 1 apart from a random offset pick them, so
  every cluster gets floor or ceil of its expected share, in O(B log K) per batch.
* Least-seen first: a cluster's j-th draw is tile perm_{cluster, pass}(j mod n) with
  pass = j div n, a fresh pseudo-random permutation per pass. No tile is drawn a second
  time before every tile of its cluster was drawn once: use counts within a cluster never
  differ by more than 1 (with a slide cap: within a (cluster, slide group) stratum).
* Pseudo-epochs: ceil(pseudo_epoch_samples / B) batches each (`GlobalBatchSampler.pseudo_epoch`).
* Slide cap (max_slides_per_epoch = S, a hard bound): the slides that hold drawable rows
  are dealt, in a seeded random order, into G = ceil(slides / S) groups of at most S
  slides; each cycle of G pseudo-epochs visits every group once, in a fresh order. A
  pseudo-epoch draws only from its group's slides, so it touches at most S slides. Its
  strata are the (cluster, group) pairs: quotas run over the clusters with tiles in the
  group, and least-seen first holds within each (cluster, group) stratum. A cluster
  absent from a group sits out that pseudo-epoch rather than break the cap.
* The batch is shuffled last, so each rank's contiguous slice mixes clusters.

Every choice is a function of (seed, step) (a Philox generator keyed by them) or of
(seed, stratum, pass) (a keyed permutation): the state is the step and one draw counter
per stratum, and a batch costs O(B) (O(B log K) with alpha != 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dinov2_patho.hashing import hash_key, splitmix64

from .base import GlobalBatchSampler, SamplerError
from .permute import permute
from .strata import CACHE_KEEP, CHUNK, ChunkedColumn, Strata, build_strata, load_or_build
from .telemetry import Columns, batch_stats
from .views import RowMap, cache_dir

# hash domains, one per kind of random choice
_TILE, _STEP, _SLIDES, _EPOCH, _LAYOUT = range(1, 6)


class ClusterStratifiedSampler(GlobalBatchSampler):
    name = "cluster_stratified"

    def __init__(self, index, batch_size: int, *, seed: int, labels: np.ndarray, num_labels: int,
                 label_name: str, alpha: float, max_slides_per_epoch: int | None, pseudo_epoch_samples: int,
                 cache: bool, cache_keep: int = CACHE_KEEP):
        super().__init__(batch_size, seed, pseudo_epoch_samples)
        if len(labels) != len(index):
            raise SamplerError(f"{len(labels)} labels for an index view of {len(index)} rows")
        if cache_keep < 1:
            raise SamplerError(f"sampler.cache_keep must be >= 1, got {cache_keep}")
        self.cache_keep = int(cache_keep)
        if max_slides_per_epoch is not None and int(max_slides_per_epoch) < 1:
            raise SamplerError(f"sampler.max_slides_per_epoch must be >= 1, got {max_slides_per_epoch}")
        self.index, self.labels, self.label_name, self.num_labels = index, labels, label_name, num_labels
        self.alpha = float(alpha)
        self.max_slides = None if max_slides_per_epoch is None else int(max_slides_per_epoch)
        self.rows = RowMap(index)
        self.columns = Columns(index)
        self.strata = self._build(num_labels, cache)
        if len(self.strata.cluster) == 0:
            raise SamplerError(f"no drawable rows: every row's {label_name} is missing or the view is empty")
        self.sizes = self.strata.sizes.astype(np.int64)
        self.eligible = int(self.strata.offsets[-1])
        self.counters = np.zeros(len(self.sizes), dtype=np.int64)
        self._layout = self._alpha_layout() if self.alpha != 0.0 else None
        self._seed_key = int(hash_key(self.seed, _STEP)[0])
        # one key per stratum; a pass's permutation key is splitmix64(stratum key ^ pass)
        self._stratum_keys = hash_key(self.seed, _TILE, np.arange(len(self.sizes)))

    def _build(self, num_labels: int, cache: bool) -> Strata:
        n, labels = len(self.index), self.labels
        if self.max_slides is None:
            parts = {"labels": labels, "num_labels": num_labels}
            return load_or_build(cache_dir(self.index, cache), parts,
                                 lambda: build_strata(n, num_labels, lambda a, b: labels[a:b]),
                                 self.cache_keep)
        slides = ChunkedColumn(n, self.index.slides)
        present = np.zeros(len(self.index.slide_names), dtype=bool)
        for a in range(0, n, CHUNK):  # slides holding at least one drawable row
            present[np.asarray(slides[a:a + CHUNK])[np.asarray(labels[a:a + CHUNK]) >= 0]] = True
        ids = np.flatnonzero(present)
        num_groups = max(1, -(-len(ids) // self.max_slides))
        group_of_slide = np.zeros(len(present), dtype=np.int32)
        dealt = permute(np.arange(len(ids)), len(ids), hash_key(self.seed, _SLIDES))
        group_of_slide[ids] = dealt % num_groups
        parts = {"labels": labels, "num_labels": num_labels, "slides": slides, "groups": group_of_slide}
        return load_or_build(cache_dir(self.index, cache), parts, lambda: build_strata(
            n, num_labels, lambda a, b: labels[a:b], lambda a, b: group_of_slide[slides[a:b]], num_groups),
            self.cache_keep)

    def _alpha_layout(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per slide group: its strata in a seeded order and their cumulative weights."""
        layout = []
        for g in range(self.strata.num_groups):
            s0, s1 = self.strata.group_start[g:g + 2]
            order = s0 + permute(np.arange(s1 - s0), s1 - s0, hash_key(self.seed, _LAYOUT, g))
            layout.append((order, np.cumsum(self.sizes[order].astype(np.float64) ** self.alpha)))
        return layout

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "strata": len(self.sizes), "rows": self.eligible,
                "alpha": self.alpha, "max_slides": self.max_slides, "epoch_batches": self.epoch_batches}

    def slide_group(self, step: int) -> int:
        """The slide group of the pseudo-epoch holding `step`."""
        num_groups = self.strata.num_groups
        if num_groups == 1:
            return 0
        epoch = self.pseudo_epoch(step)
        cycle, within = divmod(epoch, num_groups)
        return int(permute(within, num_groups, hash_key(self.seed, _EPOCH, cycle))[0])

    def _rng(self, step: int) -> np.random.Generator:
        """The random numbers of one step: a counter-based generator keyed by (seed, step)."""
        return np.random.Generator(np.random.Philox(key=np.array([self._seed_key, step], dtype=np.uint64)))

    def quotas(self, step: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The strata drawn at `step` and how many tiles each gives (summing to B)."""
        B = self.batch_size
        rng = self._rng(step) if rng is None else rng
        g = self.slide_group(step)
        s0, s1 = (int(x) for x in self.strata.group_start[g:g + 2])
        k = s1 - s0
        if self._layout is None:
            if k <= B:
                return s0 + rng.permutation(k), B // k + (np.arange(k) < B % k)
            return s0 + _distinct(rng, k, B), np.ones(B, dtype=np.int64)
        order, cum = self._layout[g]
        points = (rng.random() + np.arange(B)) * (cum[-1] / B)
        picks = np.minimum(np.searchsorted(cum, points, side="right"), k - 1)
        starts = np.flatnonzero(np.r_[True, picks[1:] != picks[:-1]])  # picks are sorted
        return order[picks[starts]], np.diff(np.r_[starts, B])

    def _batch(self, step: int) -> tuple[np.ndarray, Any]:
        rng = self._rng(step)
        strata, quota = self.quotas(step, rng)
        first = self.counters[strata]
        self.counters[strata] += quota
        which = np.repeat(np.arange(len(strata)), quota)
        stratum = strata[which]
        draw = first[which] + np.arange(self.batch_size) - np.repeat(np.cumsum(quota) - quota, quota)
        size = self.sizes[stratum]
        passes = draw // size
        keys = splitmix64(self._stratum_keys[stratum] ^ passes.astype(np.uint64))
        member = permute(draw - passes * size, size, keys)
        positions = np.asarray(self.strata.order[self.strata.offsets[stratum] + member])
        return self.rows.to_global(positions[rng.permutation(self.batch_size)]), (strata, quota)

    def _extra_state(self, undo: Sequence[Any]) -> dict[str, Any]:
        counters = self.counters.copy()
        for strata, quota in undo:
            counters[strata] -= quota
        # a tensor, so that torch.load(weights_only=True) reads checkpoints holding it
        return {"counters": torch.from_numpy(counters)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        counters = state["counters"]
        if isinstance(counters, torch.Tensor):
            counters = counters.numpy()
        counters = np.asarray(counters, dtype=np.int64)
        if counters.shape != self.counters.shape or (counters < 0).any():
            raise SamplerError(f"sampler state has {counters.shape} counters, "
                               f"this sampler {self.counters.shape}")
        self.counters = counters.copy()

    def use_counts(self) -> np.ndarray:
        """Draws so far of every drawable row, by view position (O(rows): for tests and tools)."""
        counts = np.zeros(len(self.index), dtype=np.int64)
        for s in np.flatnonzero(self.counters):
            full, rest = divmod(int(self.counters[s]), int(self.sizes[s]))
            members = np.asarray(self.strata.order[self.strata.offsets[s]:self.strata.offsets[s + 1]])
            counts[members] += full
            key = splitmix64(self._stratum_keys[s] ^ np.uint64(full))
            firsts = permute(np.arange(rest), self.sizes[s], key)
            counts[members[firsts]] += 1
        return counts

    def telemetry(self, batch: np.ndarray, step: int | None = None) -> dict[str, Any]:
        stats = batch_stats(self.columns, self.rows.to_positions(batch), self.labels)
        step = self._telemetry_step(step)
        stats.update(step=step, pseudo_epoch=self.pseudo_epoch(step), slide_group=self.slide_group(step))
        return stats


def _distinct(rng: np.random.Generator, k: int, b: int) -> np.ndarray:
    """b distinct integers of [0, k) in random order, uniformly, in O(b) for k >> b."""
    if k <= 4 * b:
        return rng.permutation(k)[:b]
    picks = np.empty(0, dtype=np.int64)
    while len(picks) < b:  # rejection of repeats; about b**2 / 2k of them
        candidates = np.concatenate([picks, rng.integers(0, k, b - len(picks) + b // 8 + 1)])
        _, first = np.unique(candidates, return_index=True)
        picks = candidates[np.sort(first)]  # first occurrences, in draw order
    return picks[:b]
