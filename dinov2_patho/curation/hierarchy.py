"""`curate kmeans`: hierarchical k-means with resampling (Vo et al. 2024) over the embeddings.

Level 1 clusters the tiles' embeddings, level k clusters level k-1's centroids. A level runs
`resampling_steps` steps: step 0 clusters all its points; each later step runs a fresh k-means
on the `sample_per_cluster` points of each cluster closest to its centroid (or random ones),
then reassigns every point. A level with `split: m` is built in two stages instead: k clusters,
then each split into min(m, its size) (both paper trees' level 1: 100,000 x 35).

Small cohorts: a level with `min_mean_cluster_size: r` gets min(clusters, ceil(M / r)) clusters,
M being its number of points (tiles, or the previous level's clusters); for a split level the
first stage shrinks, to min(k, ceil(M / (r * m))). r is the paper tree's own points per cluster.

Every level is written through `tree.write_level`; a kill resumes at the first level without
done.json, and inside a level after the last finished resampling step. Under torchrun, every
level is sharded over the ranks (level 2 of the paper's trees clusters 3.5M centroids: ~40 min on
one GPU, ~20 s on 128); rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from dinov2_patho.config_files import NON_NEGATIVE, check_section
from dinov2_patho.curation import tree
from dinov2_patho.data.folders import embeddings_file, tile_index_dir
from dinov2_patho.distributed import ranks_agree
from dinov2_patho.errors import UserError
from dinov2_patho.hashing import hash_key, uniform01
from dinov2_patho.io import atomic_path, atomic_write_text
from dinov2_patho.jsonfile import first_difference
from dinov2_patho.logging import get_logger
from dinov2_patho.textfile import open_text

LEVEL_KEYS = {"clusters", "split", "iterations", "init", "resampling_steps", "sample_per_cluster", "strategy",
              "min_mean_cluster_size"}
logger = get_logger(__name__)  # `log` is build_levels' printer

STEPS_DIR = "steps"  # per-level checkpoints of finished resampling steps, removed once the level is done
STEPS_INPUTS = "inputs.json"  # in STEPS_DIR: the level record (config, embeddings) the steps are of


@dataclass
class KmeansConfig:
    """The `kmeans` section of the curation config (`curate kmeans`): hierarchical k-means with
    resampling (Vo et al. 2024); L2 Lloyd, fp32 compute on fp16 storage."""

    seed: int = 0
    engine: str = "torch"             # nearest centroid: torch (a BLAS product + argmin) | faiss
    device: str = "auto"              # auto | cpu | cuda; under torchrun every level is sharded over ranks
    chunk_rows: int = 65536           # rows read from the memmap per step (memory stays bounded)
    init_points_per_centroid: int = 64  # k-means++/random init draws from min(M, k * this) sampled points
    max_points_per_centroid: int | None = None  # None: Lloyd over every point (the reference); N: faiss-style
    tol: float = 0.0                  # stop Lloyd once a pass lowers the objective by less (relative)
    warm_resampling: bool = False     # resampled steps start from the previous step's centroids (else fresh)
    # One entry per level, finest first (`LevelSpec`'s keys, checked by `parse_levels`). Empty: pass
    # --config-file configs/curation/t1.yaml, t2.yaml or cpu_smoke.yaml.
    levels: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        from dinov2_patho.curation.kmeans import ENGINES
        from dinov2_patho.distributed import DEVICES

        check_section("kmeans", self, numbers={"tol": NON_NEGATIVE},
                      integers={"seed": 0, "chunk_rows": 1, "init_points_per_centroid": 1,
                                "max_points_per_centroid": 1}, optional=("max_points_per_centroid",),
                      choices={"engine": ENGINES, "device": DEVICES})


@dataclass(frozen=True)
class LevelSpec:
    clusters: int  # k (the first stage's k for a split level)
    split: int = 1  # m: split each of the k clusters into m (two-stage level)
    iterations: int = 50
    init: str = "kmeans++"
    resampling_steps: int = 1  # step 0 on all points + (steps - 1) resampled steps
    sample_per_cluster: int = 1  # points taken per cluster at each resampled step
    strategy: str = "closest"  # closest | random
    min_mean_cluster_size: float | None = None  # shrink clusters for small inputs (see module doc)

    @property
    def total_clusters(self) -> int:
        return self.clusters * self.split


def parse_levels(levels: list[dict[str, Any]]) -> list[LevelSpec]:
    """Level specs from `kmeans.levels`, each key checked; a one-line UserError names the bad one."""
    if OmegaConf.is_config(levels):
        levels = OmegaConf.to_container(levels, resolve=True)
    if not levels:
        raise UserError("kmeans.levels is empty: pass --config-file configs/curation/t1.yaml (or t2.yaml, "
                        "cpu_smoke.yaml) or set the levels")
    specs = []
    for i, level in enumerate(levels, 1):
        where = f"kmeans.levels[{i}]"
        if not isinstance(level, dict):
            raise UserError(f"{where}: expected a mapping of {sorted(LEVEL_KEYS)}, got {level!r}")
        unknown = set(level) - LEVEL_KEYS
        if unknown:
            raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                            f"(keys: {', '.join(sorted(LEVEL_KEYS))})")
        if "clusters" not in level:
            raise UserError(f"{where}: `clusters` is required")
        spec = LevelSpec(**level)
        for key in ("clusters", "split", "iterations", "resampling_steps", "sample_per_cluster"):
            value = getattr(spec, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{where}.{key}: {value!r} is not a positive integer")
        if spec.init not in ("kmeans++", "random"):
            raise UserError(f"{where}.init: {spec.init!r} is not kmeans++ or random")
        if spec.strategy not in ("closest", "random"):
            raise UserError(f"{where}.strategy: {spec.strategy!r} is not closest or random")
        if spec.split > 1 and spec.resampling_steps > 1:
            raise UserError(f"{where}: a split level (split={spec.split}) cannot also resample "
                            f"(resampling_steps={spec.resampling_steps})")
        if spec.min_mean_cluster_size is not None and spec.min_mean_cluster_size < 1:
            raise UserError(f"{where}.min_mean_cluster_size: {spec.min_mean_cluster_size} is below 1")
        specs.append(spec)
    return specs


def scale_levels(specs: list[LevelSpec], num_points: int, source: str) -> list[LevelSpec]:
    """Apply each level's min_mean_cluster_size to its number of points; check that every level
    has at least as many points as clusters and fewer clusters than the level below."""
    scaled, points = [], num_points
    for i, spec in enumerate(specs, 1):
        k = spec.clusters
        if spec.min_mean_cluster_size is not None:
            k = min(k, math.ceil(points / (spec.min_mean_cluster_size * spec.split)))
        spec = LevelSpec(**{**asdict(spec), "clusters": k})
        of = "rows" if i == 1 else f"level-{i - 1} clusters"
        if spec.total_clusters > points:
            raise UserError(f"{source}: level {i} asks for {spec.total_clusters} clusters but has only "
                            f"{points} points ({of}); lower kmeans.levels[{i}].clusters")
        if i > 1 and spec.total_clusters >= points:
            raise UserError(f"{source}: levels are not decreasing: level {i} has {spec.total_clusters} "
                            f"clusters, level {i - 1} {points}")
        scaled.append(spec)
        points = spec.total_clusters
    return scaled


# --- input ---------------------------------------------------------------------------------

def open_embeddings(path: str | Path, tiles: str | Path | None = None) -> tuple[np.ndarray, Path]:
    """The (N, D) float16/float32 matrix of `path` (a `curate embed` folder or a .npy), memory-mapped."""
    from dinov2_patho.data.index import TileIndex

    npy = embeddings_file(path)
    try:
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{npy}: cannot read as a .npy array: {e}") from e
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{npy}: expected a non-empty 2-D (rows, dim) array, got shape {array.shape}")
    if array.dtype not in (np.float16, np.float32):
        raise UserError(f"{npy}: expected float16 or float32 embeddings, got {array.dtype}")
    slides = npy.parent / "slides.csv"
    if Path(path).is_dir() and slides.is_file():
        last = _last_end_row(slides)
        if last != array.shape[0]:
            raise UserError(f"{slides}: slide rows end at {last} but {npy.name} has {array.shape[0]} rows")
    if tiles is not None:
        index_dir = tile_index_dir(tiles)
        count = len(TileIndex.open(index_dir))
        if count != array.shape[0]:
            raise UserError(f"--tiles {tiles}: the tile list ({index_dir}) has {count} rows but {npy} has "
                            f"{array.shape[0]}")
    return array, npy


def embeddings_fingerprint(embeddings: np.ndarray, samples: int = 256) -> dict[str, Any]:
    """What a tree is of: rows, dim, dtype and a sha256 of `samples` evenly spaced rows (first and
    last included). Sampled, not whole: 670 GB at the paper's scale; another backbone, tile list or
    model changes every row, and a copy of the same file (new mtime) keeps its fingerprint."""
    rows = np.unique(np.linspace(0, len(embeddings) - 1, min(samples, len(embeddings))).astype(np.int64))
    sample = np.ascontiguousarray(embeddings[rows])
    return {"rows": int(embeddings.shape[0]), "dim": int(embeddings.shape[1]), "dtype": str(embeddings.dtype),
            "sampled_rows_sha256": hashlib.sha256(sample.tobytes()).hexdigest()}


def _last_end_row(path: Path) -> int:
    import csv

    with open_text(path) as f:
        rows = list(csv.DictReader(f))
    try:
        return max((int(r["end_row"]) for r in rows), default=0)
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: expected columns slide_id,start_row,end_row with integer rows ({e})") from e


def check_finite(array: np.ndarray, source: Path, chunk_rows: int, progress: bool) -> None:
    """UserError naming the first row holding NaN or inf (one streaming pass)."""
    from dinov2_patho.curation.kmeans import read_rows
    from dinov2_patho.progress import progress_bar

    for a in progress_bar(range(0, len(array), chunk_rows), desc="check finite", disable=not progress,
                          leave=False):
        ok = np.isfinite(read_rows(array, slice(a, a + chunk_rows))).all(axis=1)
        if not ok.all():
            raise UserError(f"{source}: row {a + int(np.argmin(ok))} holds NaN or inf")


# --- one level -----------------------------------------------------------------------------

class LevelBuilder:
    """Runs one level (resampled or split), checkpointing finished resampling steps."""

    def __init__(self, level: int, spec: LevelSpec, cfg: Any, out: Path, progress: bool,
                 record: dict[str, Any]):
        self.level, self.spec, self.cfg, self.progress, self.record = level, spec, cfg, progress, record
        self.steps_dir = tree.level_dir(out, level) / STEPS_DIR
        self.options = lloyd_options(spec, cfg)

    def seed(self, *parts: int) -> int:
        return int(np.random.SeedSequence([int(self.cfg.seed), self.level, *parts]).generate_state(1)[0])

    def kmeans(self, points, k: int, seed: int, desc: str, centroids: np.ndarray | None = None):
        from dinov2_patho.curation.kmeans import kmeans

        return kmeans(points, k, seed, self.options, centroids, self.progress, desc)

    def run(self, points):
        return self.split(points) if self.spec.split > 1 else self.resampled(points)

    def resampled(self, points):
        from dinov2_patho.curation.kmeans import KMeansResult, assign, mean_distance

        spec, name = self.spec, f"level {self.level}"
        first, result = self._resume(points)
        for step in range(first, spec.resampling_steps):
            if step == 0:
                result = self.kmeans(points, spec.clusters, self.seed(0), f"{name} step 0")
            else:
                keys = result.distances if spec.strategy == "closest" else random_keys(
                    np.arange(points.start, points.stop), self.seed(step, 1))
                picked = select_per_cluster(points, result.assignment, keys, spec.sample_per_cluster)
                subset = points.subset(picked)
                warm = result.centroids if self.cfg.warm_resampling else None
                sub = self.kmeans(subset, spec.clusters, self.seed(step), f"{name} step {step}", warm)
                assignment, distances, _, _ = assign(points, sub.centroids, self.options.engine,
                                                     self.options.device, self.options.chunk_rows)
                result = KMeansResult(sub.centroids, assignment, distances, mean_distance(points, distances),
                                      sub.iterations)
            with ranks_agree():  # rank 0 checkpoints the step; a failure there stops every rank
                if points.start == 0 and spec.resampling_steps > 1:
                    with atomic_path(self.steps_dir / f"step_{step}.npy") as tmp, open(tmp, "wb") as f:
                        np.save(f, result.centroids)
        return result

    def _resume(self, points):
        """(first step to run, result of the last finished step) from the step checkpoints."""
        from dinov2_patho.curation.kmeans import KMeansResult, assign, mean_distance

        last = -1  # the last finished step: rank 0 looks, every rank follows
        with ranks_agree():
            if points.start == 0:
                last = self._last_step()
        last = int(points.broadcast(np.array([last]))[0])
        if last < 0:
            return 0, None
        centroids = np.load(self.steps_dir / f"step_{last}.npy")
        assignment, distances, _, _ = assign(points, centroids, self.options.engine, self.options.device,
                                             self.options.chunk_rows)
        objective = mean_distance(points, distances)
        return last + 1, KMeansResult(centroids, assignment, distances, objective, 0)

    def _last_step(self) -> int:
        """The last finished resampling step of these inputs (-1: none); step checkpoints of other
        inputs are removed and the steps directory made ready for this level's."""
        inputs = self.steps_dir / STEPS_INPUTS
        if not self._steps_are_of(inputs):  # checkpoints of other embeddings or config: never resumed
            if self.spec.resampling_steps > 1:
                if self.steps_dir.is_dir():
                    logger.warning("level %d: the step checkpoints in %s are of other inputs: starting the "
                                   "level over", self.level, self.steps_dir)
                shutil.rmtree(self.steps_dir, ignore_errors=True)
                self.steps_dir.mkdir(parents=True)
                atomic_write_text(inputs, json.dumps(self.record, indent=1))
            return -1
        done = sorted(int(p.stem.split("_")[1]) for p in self.steps_dir.glob("step_*.npy"))
        done = [s for s in done if s < self.spec.resampling_steps]
        return done[-1] if done else -1

    def _steps_are_of(self, inputs: Path) -> bool:
        try:
            return json.loads(inputs.read_text()) == json.loads(json.dumps(self.record))
        except (OSError, ValueError):  # absent, or cut short by a kill: the steps are not trusted
            return False

    def split(self, points):
        """k clusters, then each split into min(m, size) by its own k-means; clusters are numbered
        parent by parent. Under torchrun the parents are shared out over the ranks."""
        import torch.distributed as dist

        from dinov2_patho.curation.kmeans import KMeansResult, Points, mean_distance

        spec = self.spec
        parent = self.kmeans(points, spec.clusters, self.seed(0), f"level {self.level} stage 1")
        labels = points.gather(parent.assignment)  # every point's parent, on every rank
        order = np.argsort(labels, kind="stable")
        offsets = np.searchsorted(labels[order], np.arange(spec.clusters + 1))
        rank, world = (dist.get_rank(), dist.get_world_size()) if points.distributed else (0, 1)
        from dinov2_patho.progress import progress_bar

        mine = {}
        for c in progress_bar(range(rank, spec.clusters, world), desc=f"level {self.level} stage 2",
                      disable=not self.progress, leave=False):
            members = order[offsets[c]:offsets[c + 1]]
            if len(members) == 0:
                mine[c] = (parent.centroids[c:c + 1], members, np.zeros(0, np.int32), np.zeros(0, np.float32))
                continue
            child = Points(points.array, members if points.ids is None else points.ids[members], shard=False)
            sub = self.kmeans(child, min(spec.split, len(members)), self.seed(1, c), "split")
            mine[c] = (sub.centroids, members, sub.assignment, sub.distances)
        if points.distributed:
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, mine)
            mine = {c: v for part in parts for c, v in part.items()}
        centroids, assignment = [], np.empty(points.total, np.int32)
        distances = np.empty(points.total, np.float32)
        first = 0
        for c in range(spec.clusters):
            sub_centroids, members, sub_assignment, sub_distances = mine[c]
            assignment[members] = first + sub_assignment
            distances[members] = sub_distances
            centroids.append(sub_centroids)
            first += len(sub_centroids)
        local = slice(points.start, points.stop)
        return KMeansResult(np.concatenate(centroids), assignment[local], distances[local],
                            mean_distance(points, distances[local]), parent.iterations)


def select_per_cluster(points, assignment: np.ndarray, keys: np.ndarray, per_cluster: int) -> np.ndarray:
    """Sorted global positions of the `per_cluster` points of lowest key in each cluster (ties by
    position); under torchrun each rank proposes its local best, which contain the global best."""
    def best(positions: np.ndarray, labels: np.ndarray, key: np.ndarray) -> np.ndarray:
        order = np.lexsort((positions, key, labels))
        sorted_labels = labels[order]
        starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
        return order[np.arange(len(order)) - starts < per_cluster]

    positions = np.arange(points.start, points.stop)
    pick = best(positions, assignment, keys)
    if points.distributed:
        positions, assignment, keys = (points.gather(a[pick]) for a in (positions, assignment, keys))
        pick = best(positions, assignment, keys)
    return np.sort(positions[pick])


def random_keys(positions: np.ndarray, seed: int) -> np.ndarray:
    """A uniform key per point from (position, seed) alone: the same on any sharding."""
    return uniform01(hash_key(seed, positions))


def lloyd_options(spec: LevelSpec, cfg: Any):
    from dinov2_patho.curation.kmeans import LloydOptions

    return LloydOptions(spec.iterations, spec.init, cfg.engine, cfg.device, int(cfg.chunk_rows),
                        int(cfg.init_points_per_centroid), cfg.max_points_per_centroid, float(cfg.tol))


# --- the tree ------------------------------------------------------------------------------

def level_record(spec: LevelSpec, cfg: Any) -> dict[str, Any]:
    """What a level's result depends on: a finished level is reused only if this matches."""
    return {"spec": asdict(spec), "seed": int(cfg.seed),
            "init_points_per_centroid": int(cfg.init_points_per_centroid),
            "max_points_per_centroid": cfg.max_points_per_centroid, "tol": float(cfg.tol),
            "warm_resampling": bool(cfg.warm_resampling)}


def build_levels(embeddings: np.ndarray, source: Path, out: Path, cfg: Any, progress: bool = True,
                 log=print) -> list[dict[str, Any]]:
    """Build (or resume) the tree of `embeddings` in `out` by the `kmeans` section `cfg`; returns one
    summary per level (on rank 0)."""
    from dinov2_patho.curation.kmeans import Points

    specs = scale_levels(parse_levels(cfg.levels), len(embeddings), str(source))
    points = Points(embeddings)
    main = points.start == 0
    summaries: list[dict[str, Any]] = []
    centroids = None
    fingerprint = embeddings_fingerprint(embeddings)
    for level, spec in enumerate(specs, 1):
        record = {**level_record(spec, cfg), "embeddings": fingerprint}
        if tree.level_complete(out, level):
            done = tree.read_level_done(out, level)
            diff = first_difference({k: done.get(k) for k in record}, record)
            if diff is not None:
                what = "other embeddings" if diff.startswith("embeddings") else "another config"
                raise UserError(f"{tree.level_dir(out, level)}: built with {what} ({diff}); use a new --out "
                                f"or delete that directory")
            summaries.append({"level": level, "clusters": done["clusters"], "objective": done["objective"],
                              "seconds": 0.0, "resumed": True})
            centroids = np.load(tree.level_dir(out, level) / "centroids.npy")
            with ranks_agree():  # killed after done.json, before its step checkpoints were removed
                if main:
                    shutil.rmtree(tree.level_dir(out, level) / STEPS_DIR, ignore_errors=True)
            log(f"level {level}: {done['clusters']} clusters, finished before (done.json): reused")
            continue
        if level > 1:
            points = Points(centroids)  # every rank holds them (reduced, or read back); sharded again
        start = time.perf_counter()
        result = LevelBuilder(level, spec, cfg, out, progress, record).run(points)
        seconds = time.perf_counter() - start
        assignment, distances = points.gather(result.assignment), points.gather(result.distances)
        centroids = result.centroids
        with ranks_agree():  # rank 0 writes the level; a full disk there stops every rank
            if main:
                summary = {"level": level, "clusters": len(centroids), "objective": result.objective,
                           "seconds": round(seconds, 2),
                           "empty": int(len(centroids) - len(np.unique(assignment)))}
                tree.write_level(out, level, centroids, assignment, distances, objective=result.objective,
                                 seconds=summary["seconds"], **record)
                shutil.rmtree(tree.level_dir(out, level) / STEPS_DIR, ignore_errors=True)
                summaries.append(summary)
                log(f"level {level}: {summary['clusters']} clusters ({summary['empty']} empty), objective "
                    f"{summary['objective']:.6g} (mean squared distance), {seconds:.1f} s")
    with ranks_agree():
        if main:
            tree.write_manifest(out, len(embeddings), [s["clusters"] for s in summaries],
                                embeddings=str(source), dim=int(embeddings.shape[1]),
                                embeddings_fingerprint=fingerprint,
                                objectives=[s["objective"] for s in summaries], seed=int(cfg.seed))
    return summaries


def build_tree(embeddings: str | Path, out: str | Path, *, tiles: str | Path | None = None,
               config: KmeansConfig | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """`curate kmeans`: the hierarchical k-means tree of `embeddings` (a `curate embed` folder or an (N, D)
    .npy) in OUT, sharded over the ranks under torchrun, resumed at the first unfinished level. `tiles`:
    the tile list the embeddings were made from (row counts must match); `config`: its levels at least
    (the defaults have none). Returns one summary per level (on rank 0; [] on the others)."""
    from dinov2_patho.dirlock import exclusive_directory
    from dinov2_patho.distributed import distributed_context

    cfg = KmeansConfig() if config is None else config
    array, source = open_embeddings(embeddings, tiles)
    specs = scale_levels(parse_levels(cfg.levels), len(array), str(source))  # fail before any work
    out = Path(out)
    summaries: list[dict[str, Any]] = []
    with distributed_context(cfg.device, "kmeans.device") as ctx:
        check_finite(array, source, int(cfg.chunk_rows), progress and ctx.is_main)
        with exclusive_directory(out, "curate kmeans", ctx):
            if ctx.is_main:
                print(f"curate kmeans: {len(array)} x {array.shape[1]} {array.dtype} from "
                      f"{source}; levels {[s.total_clusters for s in specs]}; engine {cfg.engine}, "
                      f"{ctx.world_size} rank(s)")
            show = progress and ctx.is_main
            summaries = build_levels(array, source, out, cfg, progress=show,
                                     log=print if ctx.is_main else lambda *_: None)
            with ranks_agree(ctx):
                if ctx.is_main:
                    atomic_write_text(out / "kmeans_summary.json", json.dumps(summaries, indent=1))
    return summaries
