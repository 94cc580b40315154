"""The cluster tree on disk: what `curate kmeans` writes and `curate write` / `curate sample` read.

A tree directory holds one folder per level and `manifest.json`, written last (its presence
marks a complete tree; a level folder without `done.json` is an unfinished level):

    level_k/centroids.npy        float32 [K_k, D]
    level_k/assignment.npy       int32 [M_k]: cluster of each point of this level. Level 1's points
                                 are the tiles (M_1 = N rows of the embeddings); level k's are the
                                 centroids of level k-1 (M_k = K_{k-1}).
    level_k/distances.npy        float32 [M_k]: squared L2 distance of each point to its centroid
    level_k/members.npy          int32/int64 [M_k]: point ids grouped by cluster, closest first
    level_k/member_offsets.npy   int64 [K_k + 1]: cluster c's members are members[o[c]:o[c+1]]
    level_k/done.json            {"clusters": K_k, "points": M_k, ...}: the level is complete
    manifest.json                {"format_version", "num_points": N, "clusters": [K_1..K_L], ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path, atomic_write_text
from dinov2_patho.jsonfile import read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LEVEL_DONE = "done.json"
MANIFEST_SHAPE = {"num_points": int, "clusters": list[int]}
LEVEL_DONE_SHAPE = {"clusters": int, "points": int, "objective": float}


def level_dir(root: str | Path, level: int) -> Path:
    return Path(root) / f"level_{level}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_level(root: str | Path, level: int, centroids: np.ndarray, assignment: np.ndarray,
                distances: np.ndarray, **info: Any) -> Path:
    """Write one complete level (members sorted by cluster, then distance); `info` goes to done.json."""
    k, m = len(centroids), len(assignment)
    if len(distances) != m:
        raise ValueError(f"level {level}: {m} assignments but {len(distances)} distances")
    out = level_dir(root, level)
    out.mkdir(parents=True, exist_ok=True)
    (out / LEVEL_DONE).unlink(missing_ok=True)
    assignment = np.asarray(assignment, dtype=np.int32)
    # lexsort: last key is primary -> by cluster, then by distance (closest first), stable on ties
    members = np.lexsort((np.arange(m), distances, assignment))
    offsets = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(np.bincount(assignment, minlength=k), out=offsets[1:])
    index_dtype = np.int32 if m < 2**31 else np.int64
    _save_npy(out / "centroids.npy", np.asarray(centroids, dtype=np.float32))
    _save_npy(out / "assignment.npy", assignment)
    _save_npy(out / "distances.npy", np.asarray(distances, dtype=np.float32))
    _save_npy(out / "members.npy", members.astype(index_dtype))
    _save_npy(out / "member_offsets.npy", offsets)
    atomic_write_text(out / LEVEL_DONE, json.dumps({"clusters": k, "points": m, **info}, indent=1))
    return out


def level_complete(root: str | Path, level: int) -> bool:
    return (level_dir(root, level) / LEVEL_DONE).is_file()


def read_level_done(root: str | Path, level: int) -> dict[str, Any]:
    """A complete level's done.json (what write_level recorded)."""
    return read_json(level_dir(root, level) / LEVEL_DONE, "finished-level record",
                     f"delete {level_dir(root, level)} (and the levels above it) and rerun "
                     "`dinov2-patho curate kmeans`: it rebuilds them", shape=LEVEL_DONE_SHAPE)


def write_manifest(root: str | Path, num_points: int, clusters: list[int], **info: Any) -> None:
    manifest = {"format_version": FORMAT_VERSION, "num_points": int(num_points),
                "clusters": [int(k) for k in clusters], **info}
    atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=1))


class ClusterTree:
    """A complete tree directory, memory-mapped. Levels are numbered 1 (finest) .. L."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.num_points: int = manifest["num_points"]
        self.clusters: list[int] = manifest["clusters"]

    @classmethod
    def open(cls, root: str | Path) -> ClusterTree:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise UserError(f"{root}: not a complete cluster tree (no {MANIFEST}); run `dinov2-patho curate "
                            "kmeans` to (re)build it")
        manifest = read_json(path, "cluster tree manifest", "rerun `dinov2-patho curate kmeans` with this "
                             "--out (it reuses the finished levels) to rewrite it, or delete that directory",
                             shape=MANIFEST_SHAPE, version=FORMAT_VERSION)
        return cls(root, manifest)

    @property
    def num_levels(self) -> int:
        return len(self.clusters)

    def _check_level(self, level: int) -> None:
        if not 1 <= level <= self.num_levels:
            raise UserError(f"{self.root}: level {level} does not exist; "
                            f"the tree has levels 1..{self.num_levels}")

    def array(self, level: int, name: str) -> np.ndarray:
        """A level's `centroids`, `assignment`, `distances`, `members` or `member_offsets`, memory-mapped."""
        self._check_level(level)
        path = level_dir(self.root, level) / f"{name}.npy"
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read as a .npy array ({e}); rebuild the tree") from e

    def members(self, level: int, cluster: int) -> np.ndarray:
        """Point ids of `cluster` at `level` (tiles at level 1, level-(k-1) clusters above), closest first."""
        offsets = self.array(level, "member_offsets")
        return np.asarray(self.array(level, "members")[offsets[cluster]:offsets[cluster + 1]])

    def tile_labels(self, level: int) -> np.ndarray:
        """The level-`level` cluster of every tile: [N] int32, composed through the levels below."""
        labels = np.asarray(self.array(1, "assignment"))
        for k in range(2, level + 1):
            labels = np.asarray(self.array(k, "assignment"))[labels]
        return labels
