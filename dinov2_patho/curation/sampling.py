"""`curate sample`: the hierarchical balanced sampling of Vo et al. (2024), as row ids for `data.subset`.

Top down, from the root (the set of top-level clusters) to level 1: a cluster's target T is split over
its children by water-filling: the water level t solves sum_i min(t, size_i) ~= T (size = tiles under
the child), each child gets min(t, size_i), and the remainder goes one each to random children that
still have room. A level-1 cluster's target is then met with its `closest` members (the tree lists
them closest first) or `random` ones. Every step is a numpy pass over a level's clusters (sorts,
bincounts, cumsums), never a Python loop over clusters or tiles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinov2_patho.config_files import check_section
from dinov2_patho.curation.tree import ClusterTree
from dinov2_patho.curation.tree_check import check_tree
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path, atomic_write_text
from dinov2_patho.progress import progress_bar

STRATEGIES = ("random", "closest")
_PICK_CHUNK = 1 << 23  # members sorted per step by the random pick: bounded memory at 350M tiles


@dataclass
class SampleConfig:
    """The `sample` section of the curation config (`curate sample`): water-filling down the tree, then
    within each level-1 cluster `random` members or the `closest` to its centroid."""

    strategy: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        check_section("sample", self, integers={"seed": 0}, choices={"strategy": STRATEGIES})


@dataclass
class BalancedSubset:
    rows: np.ndarray  # sorted int64 tile row ids
    counts: list[np.ndarray]  # per level 1..L: selected tiles per cluster
    sizes: list[np.ndarray]  # per level 1..L: tiles per cluster in the tree


def cluster_sizes(tree: ClusterTree) -> list[np.ndarray]:
    """Tiles under every cluster, per level 1..L (int64)."""
    sizes = [np.diff(np.asarray(tree.array(1, "member_offsets"), dtype=np.int64))]
    for k in range(2, tree.num_levels + 1):
        weights = sizes[-1].astype(np.float64)  # exact: counts stay far below 2^53
        sizes.append(np.bincount(tree.array(k, "assignment"), weights=weights,
                                 minlength=tree.clusters[k - 1]).astype(np.int64))
    return sizes


def _sort_within(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Stable order by group, then key (both non-negative): one sort of packed uint64 keys
    (group << 32 | key), about twice as fast as np.lexsort of the two."""
    if keys.size and keys.max() >= 1 << 32:
        return np.lexsort((keys, groups))
    return np.argsort((groups.astype(np.uint64) << np.uint64(32)) | keys.astype(np.uint64), kind="stable")


def water_fill(parent: np.ndarray, parent_target: np.ndarray, sizes: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Split each parent's target over its children (child i has parent `parent[i]`, `sizes[i]` tiles):
    equal shares capped by size, the remainder one each over random uncapped children."""
    n = sizes.size
    order = _sort_within(parent, sizes)
    p, s = parent[order].astype(np.int64), sizes[order]
    group = np.bincount(p, minlength=parent_target.size)
    start = np.cumsum(group) - group
    before = np.cumsum(s) - s  # sum of the sizes before each child, over all children
    before -= before[start[p]]  # ... within its parent
    left = group[p] - (np.arange(n) - start[p])  # children from this one to the parent's largest
    # water level at this child's size: all smaller children capped, the others given as much
    capped = before + left * s <= parent_target[p]
    n_capped = np.bincount(p, weights=capped, minlength=group.size).astype(np.int64)
    rest = parent_target - np.bincount(p, weights=s * capped, minlength=group.size).astype(np.int64)
    share_of = group - n_capped
    if (rest[share_of == 0] != 0).any():
        raise ValueError("a target exceeds the tiles under its cluster")
    base, extra = np.divmod(rest, np.maximum(share_of, 1))
    # rank the uncapped children of each parent in a random order; the first `extra` get one more
    free = np.flatnonzero(~capped)
    shuffled = free[_sort_within(p[free], rng.integers(0, 1 << 32, free.size, dtype=np.uint64))]
    rank = np.zeros(n, np.int64)
    rank[shuffled] = np.arange(shuffled.size) - (np.cumsum(share_of) - share_of)[p[shuffled]]
    sorted_counts = np.where(capped, s, base[p] + (rank < extra[p]))
    counts = np.empty(n, np.int64)
    counts[order] = sorted_counts
    return counts


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for every pair (int64)."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if ends.size else 0)


def pick_members(tree: ClusterTree, counts: np.ndarray, strategy: str, rng: np.random.Generator,
                 progress: bool = True) -> np.ndarray:
    """`counts[c]` tiles of every level-1 cluster c: its first (closest) members or a random subset."""
    offsets = np.asarray(tree.array(1, "member_offsets"), dtype=np.int64)
    members = tree.array(1, "members")
    sizes = np.diff(offsets)
    whole = counts == sizes if strategy == "random" else counts > 0
    positions = [_ranges(offsets[:-1][whole], counts[whole])]
    partial = np.flatnonzero(~whole & (counts > 0))
    # random: sort each partial cluster's members by a random key, keep its first `counts` (chunks of
    # consecutive clusters bound the memory)
    bounds = np.searchsorted(np.cumsum(sizes[partial]), np.arange(0, sizes[partial].sum(), _PICK_CHUNK))
    for lo, hi in progress_bar(zip(bounds, [*bounds[1:], partial.size]), total=bounds.size,
                               desc="pick random", disable=not progress or not partial.size):
        clusters = partial[lo:hi]
        pos = _ranges(offsets[clusters], sizes[clusters])
        local = np.repeat(np.arange(clusters.size, dtype=np.uint64), sizes[clusters])
        key = (local << np.uint64(32)) | rng.integers(0, 1 << 32, pos.size, dtype=np.uint64)
        # grouped by cluster, random order within; stable, so equal keys break alike on every platform
        pos = pos[np.argsort(key, kind="stable")]
        first = np.cumsum(sizes[clusters]) - sizes[clusters]
        positions.append(pos[_ranges(first, counts[clusters])])
    return np.sort(np.asarray(members[np.sort(np.concatenate(positions))], dtype=np.int64))


def balanced_rows(tree: ClusterTree, target: int, strategy: str = "random", seed: int = 0,
                  progress: bool = True) -> BalancedSubset:
    """`target` distinct tile row ids, balanced over the tree top down (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise UserError(f"sample strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not 0 < target <= tree.num_points:
        raise UserError(f"--target {target}: the tree {tree.root} has {tree.num_points} tiles; "
                        f"the target must lie in 1..{tree.num_points}")
    rng = np.random.default_rng(seed)
    sizes = cluster_sizes(tree)
    top = tree.num_levels
    counts: list[np.ndarray] = [np.empty(0)] * top
    counts[top - 1] = water_fill(np.zeros(tree.clusters[-1], np.int64), np.array([target]), sizes[-1], rng)
    for k in range(top, 1, -1):  # level k's counts -> its children's, at level k - 1
        counts[k - 2] = water_fill(np.asarray(tree.array(k, "assignment")), counts[k - 1], sizes[k - 2], rng)
    rows = pick_members(tree, counts[0], strategy, rng, progress)
    if rows.size != target or (rows.size > 1 and (np.diff(rows) <= 0).any()):
        raise UserError(f"{tree.root}: level 1's members.npy lists a tile twice; rebuild the tree")
    return BalancedSubset(rows, counts, sizes)


def summary(subset: BalancedSubset) -> list[dict]:
    """Per level: clusters, how many the subset covers, and the largest/smallest cluster's share of the
    tiles before (the tree) and after (the subset)."""
    out = []
    total_before, total_after = subset.sizes[0].sum(), subset.rows.size
    for k, (size, count) in enumerate(zip(subset.sizes, subset.counts), 1):
        nonempty = size > 0
        out.append({"level": k, "clusters": int(size.size), "nonempty": int(nonempty.sum()),
                    "covered": int((count > 0).sum()), "tiles": int(count.sum()),
                    "largest_share_before": float(size.max() / total_before),
                    "largest_share_after": float(count.max() / total_after),
                    "smallest_share_before": float(size[nonempty].min() / total_before),
                    "smallest_share_after": float(count[nonempty].min() / total_after)})
    return out


def format_summary(levels: list[dict]) -> str:
    lines = ["level  nonempty  covered   largest share before -> after   smallest share before -> after"]
    for s in levels:
        lines.append(f"{s['level']:>5}  {s['nonempty']:>8,}  {s['covered']:>7,}   "
                     f"{s['largest_share_before']:>20.3%} -> {s['largest_share_after']:<7.3%}  "
                     f"{s['smallest_share_before']:>20.4%} -> {s['smallest_share_after']:.4%}")
    return "\n".join(lines)


def balanced_subset(tree: str | Path, target: int, out: str | Path, *, strategy: str | None = None,
                    seed: int | None = None, config: SampleConfig | None = None,
                    progress: bool = True) -> BalancedSubset:
    """`curate sample`: a hierarchical balanced subset of `target` tiles of the cluster tree `tree`
    (`curate kmeans`'s folder) -> OUT, a .npy of sorted int64 row ids (`data.subset=OUT`), and its
    summary beside it (.json). `strategy` (random | closest) and `seed`: default `config`'s (None: the
    defaults)."""
    cfg = SampleConfig() if config is None else config
    strategy = strategy or str(cfg.strategy)
    seed = int(cfg.seed if seed is None else seed)
    cluster_tree = ClusterTree.open(tree)
    check_tree(cluster_tree, progress=progress)
    subset = balanced_rows(cluster_tree, target, strategy, seed, progress=progress)
    out = Path(out)
    levels = summary(subset)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, subset.rows)
    atomic_write_text(out.with_suffix(".json"), json.dumps(
        {"tree": str(Path(tree).resolve()), "target": target, "strategy": strategy, "seed": seed,
         "levels": levels}, indent=1))
    print(format_summary(levels))
    print(f"{out}: {subset.rows.size:,} of {cluster_tree.num_points:,} tiles; train on them with "
          f"data.subset={out} and data.index=<the index `curate write` made from this tree>")
    return subset
