"""Tree consistency: each level stores the parent relation twice (`assignment`: point -> cluster, read
by `curate write`; `members` + `member_offsets`: cluster -> points, read by `curate sample`). They must
agree, or the CSV and the subset would describe two different trees."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dinov2_patho.curation.tree import ClusterTree
from dinov2_patho.errors import UserError
from dinov2_patho.progress import progress_bar

if TYPE_CHECKING:
    from tqdm import tqdm

_CHUNK = 1 << 22  # points per step: bounded memory at 350M tiles


def check_tree(tree: ClusterTree, *, progress: bool = True) -> None:
    """Raise a one-line UserError naming the level and the first offending cluster of a broken tree."""
    points = tree.num_points
    with progress_bar(total=_total_points(tree), unit="pt", unit_scale=True, desc="check tree",
              disable=not progress) as bar:
        for level, clusters in enumerate(tree.clusters, 1):
            _check_level(tree, level, clusters, points, bar)
            points = clusters


def _total_points(tree: ClusterTree) -> int:
    return tree.num_points + sum(tree.clusters[:-1])


def _check_level(tree: ClusterTree, level: int, clusters: int, points: int, bar: tqdm) -> None:
    where = f"{tree.root}: level {level}"
    of = "tiles" if level == 1 else f"level-{level - 1} clusters"
    arrays = {name: tree.array(level, name) for name in ("assignment", "members", "member_offsets")}
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.integer):
            raise UserError(f"{where}: {name}.npy holds {array.dtype}, expected integer ids")
    assignment, members = arrays["assignment"], arrays["members"]
    if assignment.shape != (points,) or members.shape != (points,):
        raise UserError(f"{where}: assignment.npy has shape {assignment.shape} and members.npy "
                        f"{members.shape}, expected ({points},) (the {of})")
    offsets = np.asarray(arrays["member_offsets"], dtype=np.int64)
    if offsets.shape != (clusters + 1,) or offsets[0] != 0 or offsets[-1] != points:
        raise UserError(f"{where}: member_offsets.npy must hold {clusters + 1} offsets from 0 to {points}, "
                        f"got shape {offsets.shape} from {offsets.ravel()[:1].tolist()} to "
                        f"{offsets.ravel()[-1:].tolist()}")
    sizes = np.diff(offsets)
    if (sizes < 0).any():
        raise UserError(f"{where}: member_offsets.npy decreases at cluster {int(np.argmax(sizes < 0))}")
    counts = np.zeros(clusters, np.int64)
    for start in range(0, points, _CHUNK):
        a = np.asarray(assignment[start:start + _CHUNK])
        bad = (a < 0) | (a >= clusters)
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(f"{where}: point {start + i} is assigned to cluster {int(a[i])}, but the level "
                            f"has clusters 0..{clusters - 1}")
        counts += np.bincount(a, minlength=clusters)
    if not np.array_equal(counts, sizes):
        c = int(np.argmax(counts != sizes))
        raise UserError(f"{where}: cluster {c} has {counts[c]} points in assignment.npy but {sizes[c]} "
                        "in members.npy")
    for start in range(0, points, _CHUNK):
        m = np.asarray(members[start:start + _CHUNK], dtype=np.int64)
        owner = np.searchsorted(offsets, np.arange(start, start + m.size), side="right") - 1
        bad = (m < 0) | (m >= points)
        bad[~bad] = np.asarray(assignment[m[~bad]]) != owner[~bad]
        if bad.any():
            i = int(np.argmax(bad))
            parent = int(assignment[m[i]]) if 0 <= m[i] < points else "none (out of range)"
            raise UserError(f"{where}: cluster {int(owner[i])} lists point {int(m[i])} as a member, but that "
                            f"point's parent in assignment.npy is cluster {parent}")
        bar.update(m.size)
