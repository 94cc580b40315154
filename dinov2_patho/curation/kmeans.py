"""One k-means level: Lloyd's algorithm (L2, not spherical) streamed over an (M, D) array.

Storage may be float16 (the embeddings memmap); compute is float32; centroid sums are float32 over
blocks of at most SUM_BLOCK_ROWS rows, accumulated in float64.
Points are read in chunks, never loaded whole (a k-means run reads a shard of at most RESIDENT_BYTES once
and keeps it, where a pass would read it again). Under torch.distributed each rank holds a
contiguous shard of the points: assignment is local, centroid sums and counts are
all-reduced, the init is computed from a sample every rank holds and broadcast from rank 0,
so one job over many GPUs equals the one-process result.

Why not `faiss.Kmeans`: it trains on a subsample of k * max_points_per_centroid points
(256 by default) without saying so, it re-seeds empty clusters by splitting large ones
(the reference keeps their centroid), and it cannot shard points over ranks. The Lloyd loop is
ours; its nearest-centroid kernel is a matrix product and an argmin (engine `torch`: OpenBLAS and
numpy on CPU, 2.6-3.3x faster than faiss's `IndexFlatL2` search on 2 Intel cores, as fast on 2 AMD ones;
torch on GPU), or faiss's
`IndexFlatL2` (engine `faiss`, on GPU when faiss-gpu is installed). Subsampling is a stated option,
`max_points_per_centroid` (off by default).
Lloyd stops early only when no assignment changed: the centroids are then a fixed point,
so further iterations would reproduce them exactly. Every pass is a full Lloyd pass, but after
the first it searches a point whose centroid did not move against the moved centroids only (the
others are where they were when its distance was found): late passes, where few centroids still
move, cost a fraction of a full search.
"""

from __future__ import annotations

import functools
import math
import mmap
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dinov2_patho.progress import progress_bar

ENGINES = ("faiss", "torch")  # nearest-centroid kernels (kmeans.engine)
ASSIGN_BLOCK_ELEMENTS = 1 << 22  # rows x centroids per score block, torch engine (16 MB; 64 MB: 2x slower)
SUM_BLOCK_ROWS = 8192  # rows summed in float32 before the float64 total (5x faster than all in float64)
# A Lloyd run reads its points every pass: a shard of at most this many float32 bytes is read once and kept
# (a resampling step's points are scattered rows of a memmap whose pages each read releases)
RESIDENT_BYTES = 1 << 28


# --- points --------------------------------------------------------------------------------

def sharded() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def read_rows(array: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """A float32 copy of `array[rows]`. For a memmap, its pages are then released from this
    process (they stay in the page cache): a pass over a 7.7 GB memmap would otherwise leave it
    all resident and count it in the RSS."""
    out = np.array(array[rows], dtype=np.float32)
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)
    return out


class Points:
    """Rows of an (R, D) array (optionally the subset `ids`, sorted), read as float32 chunks.

    Positions 0..total-1 index the points (rows, or entries of `ids`). With `shard` under
    torch.distributed, this rank holds positions [start, stop) and the collectives below act
    over all ranks; otherwise they are the identity."""

    def __init__(self, array: np.ndarray, ids: np.ndarray | None = None, shard: bool = True):
        self.array, self.ids = array, ids
        self.total = len(ids) if ids is not None else len(array)
        self.distributed = shard and sharded()
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.start, self.stop = self.total * rank // world, self.total * (rank + 1) // world
        self.dim = array.shape[1]
        self.rows: np.ndarray | None = None  # this shard's float32 rows, once `resident`

    def resident(self, max_bytes: int) -> Points:
        """These points, with this shard's rows read into memory once when they take at most `max_bytes`
        as float32 (else themselves): the same rows in the same chunks, without reading them again."""
        if self.rows is not None or len(self) * self.dim * 4 > max_bytes:
            return self
        held = Points(self.array, self.ids, self.distributed)
        held.rows = read_rows(self.array, slice(self.start, self.stop) if self.ids is None
                              else self.ids[self.start:self.stop])
        return held

    def __len__(self) -> int:
        return self.stop - self.start

    def subset(self, positions: np.ndarray) -> Points:
        """The points at sorted global `positions`, sharded like these."""
        return Points(self.array, positions if self.ids is None else self.ids[positions], self.distributed)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at sorted global `positions`."""
        return read_rows(self.array, self.ids[positions] if self.ids is not None else positions)

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(local offset, float32 rows) over this rank's shard."""
        for a in range(self.start, self.stop, chunk_rows):
            b = min(a + chunk_rows, self.stop)
            if self.rows is not None:
                yield a - self.start, self.rows[a - self.start:b - self.start]
            else:
                yield a - self.start, read_rows(self.array,
                                                slice(a, b) if self.ids is None else self.ids[a:b])

    def sample(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at sorted global `positions`, on every rank (each contributes its shard)."""
        if not self.distributed:
            return self.take(positions)
        out = np.zeros((len(positions), self.dim), dtype=np.float32)
        mine = (positions >= self.start) & (positions < self.stop)
        out[mine] = self.take(positions[mine])
        return self.reduce(out)

    # collectives over the ranks holding these points
    def reduce(self, array: np.ndarray) -> np.ndarray:
        if not self.distributed:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array)).to(_comm_device())
        dist.all_reduce(t)
        return t.cpu().numpy()

    def broadcast(self, array: np.ndarray) -> np.ndarray:
        if not self.distributed:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array)).to(_comm_device())
        dist.broadcast(t, src=0)
        return t.cpu().numpy()

    def gather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's `array` concatenated in rank order, on every rank."""
        if not self.distributed:
            return array
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, array)
        return np.concatenate(parts)


def _comm_device() -> torch.device:
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


# --- nearest centroid ----------------------------------------------------------------------

@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block (None: left as they are)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class NearestCentroid:
    """Nearest centroid (squared L2) of float32 rows, with faiss or torch, on CPU or GPU.

    The search expands |x - c|^2 = |x|^2 - 2 x.c + |c|^2 (a matrix product), which loses digits
    to cancellation when |x| is large; with `exact` the distance returned is recomputed as |x - c|^2
    for the chosen centroid, so objectives and "closest" orderings are exact in float32. Lloyd's
    passes skip that (a fifth of a pass at 1,000 centroids): they need the distances only for the
    objective's early stop, and their last assignment is recomputed exactly."""

    def __init__(self, centroids: np.ndarray, engine: str = "torch", device: str = "cpu"):
        self.engine, self.device = engine, resolve_device(device)
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if engine == "faiss":
            import faiss

            index = faiss.IndexFlatL2(centroids.shape[1])
            if self.device == "cuda" and hasattr(faiss, "StandardGpuResources"):
                self._gpu_resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_resources, torch.cuda.current_device(), index)
            index.add(centroids)
            self.index, self.host_centroids = index, centroids
        elif engine == "torch":
            self.centroids = torch.from_numpy(centroids).to(self.device)
            # [-2c, |c|^2] as columns: one product with the rows [x, 1] gives |x - c|^2 - |x|^2
            sq_norms = (self.centroids * self.centroids).sum(1, keepdim=True)
            self.augmented = torch.cat([-2 * self.centroids, sq_norms], 1).T.contiguous()
        else:
            raise ValueError(f"unknown k-means engine {engine!r} ({', '.join(ENGINES)})")

    def __call__(self, x: np.ndarray, exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 [B], squared distances float32 [B])."""
        if self.engine == "faiss":
            found, labels = self.index.search(np.ascontiguousarray(x), 1)
            labels = labels[:, 0].astype(np.int64)
            return labels, squared_distances(x, self.host_centroids, labels) if exact else found[:, 0]
        k, dim = self.centroids.shape
        block = min(len(x), max(1, ASSIGN_BLOCK_ELEMENTS // k))
        rows = torch.ones(block, dim + 1, device=self.device)
        scores = torch.empty(block, k, device=self.device)
        labels, distances = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
        for a in range(0, len(x), block):
            n = min(block, len(x) - a)
            rows[:n, :dim] = torch.from_numpy(x[a:a + n])
            if scores.device.type == "cpu":  # OpenBLAS + numpy argmin: 42-45 ms, faiss 116-138 (RESULTS.md)
                found = np.matmul(rows[:n].numpy(), self.augmented.numpy(), out=scores[:n].numpy())
                label = found.argmin(1)
                value = torch.from_numpy(np.take_along_axis(found, label[:, None], 1)[:, 0])
                label = torch.from_numpy(label)
            else:
                value, label = torch.mm(rows[:n], self.augmented, out=scores[:n]).min(1)
            xb = rows[:n, :dim]
            value = ((xb - self.centroids[label]) ** 2).sum(1) if exact else value + (xb * xb).sum(1)
            labels[a:a + n], distances[a:a + n] = label.cpu().numpy(), value.cpu().numpy()
        return labels, distances


def squared_distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """|x - c|^2 to the centroid of each label, computed directly (no cancellation)."""
    diff = x - centroids[labels]
    return np.einsum("ij,ij->i", diff, diff)


# --- k-means -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LastPass:
    """A Lloyd pass's assignment and distances, and which centroids the update after it moved."""

    assignment: np.ndarray  # int32 [M local]
    distances: np.ndarray  # float32 [M local]
    moved: np.ndarray  # bool [K]


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [K, D]
    assignment: np.ndarray  # int32 [M local]: cluster of each point of this rank's shard
    distances: np.ndarray  # float32 [M local]: squared L2 distance to that centroid
    objective: float  # mean squared distance over all points (all ranks)
    iterations: int  # Lloyd iterations run (fewer than asked when assignments stopped changing)


@functools.cache
def mkl_is_fast() -> bool:
    """Whether torch's MKL runs k-means++'s skinny product faster than numpy's OpenBLAS: on Intel CPUs only.
    8 x 66 by 66 x 50,000 on 2 cores: MKL 306-413 us, OpenBLAS 600-744 us on an Intel Xeon; MKL 1,564 us,
    OpenBLAS 494 us on an AMD EPYC, where MKL takes its generic path (RESULTS.md). Decided by the CPU, not
    timed, so a machine always runs the same kernel (the products of the two libraries round differently)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return "Intel" in platform.processor()


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator, device: str = "cpu") -> np.ndarray:
    """Greedy k-means++ (2 + ln k candidates per centre, as scikit-learn): indices of k rows of x.

    Each step scores its candidates with one product of augmented rows, [-2c, 1, |c|^2] . [x, |x|^2, 1]
    = |x - c|^2, so the step is one GEMM and three passes over the candidates' rows. On CPU the GEMM is
    torch's (MKL) on Intel CPUs, else numpy's (OpenBLAS) with torch's small ops on one thread, as in a
    Lloyd pass (see `mkl_is_fast` and `assign`)."""
    device = resolve_device(device)
    openblas = device == "cpu" and not mkl_is_fast()
    with torch_threads(1 if openblas else None):
        return _kmeans_plus_plus(x, k, rng, device, _numpy_mm if openblas else torch.mm)


def _numpy_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    np.matmul(a.numpy(), b.numpy(), out=out.numpy())


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator, device: str,
                      mm: Callable[..., Any]) -> np.ndarray:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    n = len(xt)
    sq = (xt * xt).sum(1)
    ones = torch.ones(n, 1, device=device)
    points = torch.cat([xt, sq[:, None], ones], 1).T.contiguous()  # (D + 2, n)
    centres = torch.cat([-2 * xt, ones, sq[:, None]], 1)  # (n, D + 2): row i as a candidate centre
    trials = 2 + int(math.log(k))
    d = torch.empty(trials, n, device=device)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    mm(centres[chosen[:1]], points, out=d[:1])
    closest = d[0].clamp_min(0)
    for c in range(1, k):
        cumulative = torch.cumsum(closest, 0, dtype=torch.float64)
        targets = torch.from_numpy(rng.random(trials)).to(device) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, targets).clamp_(max=n - 1).cpu().numpy()
        mm(centres[candidates], points, out=d)
        torch.minimum(d, closest, out=d)
        best = _lowest_potential(d)
        chosen[c], closest = candidates[best], d[best].clamp_min(0)
    return chosen


def _lowest_potential(d: torch.Tensor) -> int:
    """The row of `d` with the lowest sum, as summed in float64. Summed in float32 first (0.73 s against
    1.86 s over benchmarks/curation.py's 12,100 steps, RESULTS.md): a float32 sum of n >= 0 terms is
    within ~log2(n) * 6e-8 of itself, so a lead of more than 1e-5 over the runner-up is the float64 order
    too; a closer race is summed again in float64."""
    totals = d.sum(1)
    if len(totals) > 1:
        low, second = torch.topk(totals, 2, largest=False).values.tolist()
        if second - low <= 1e-5 * low:
            totals = d.sum(1, dtype=torch.float64)
    return int(totals.argmin())


def init_centroids(points: Points, k: int, init: str, rng: np.random.Generator,
                   init_points_per_centroid: int, device: str = "cpu") -> np.ndarray:
    """k-means++ or random rows, drawn from a uniform sample of min(M, k * init_points_per_centroid)
    points that every rank holds; rank 0's choice is broadcast."""
    size = min(points.total, k * init_points_per_centroid)
    positions = np.sort(rng.choice(points.total, size, replace=False))
    x = points.sample(positions)
    if init == "kmeans++":
        rows = kmeans_plus_plus(x, k, rng, device)
    elif init == "random":
        rows = rng.choice(len(x), k, replace=False)
    else:
        raise ValueError(f"unknown k-means init {init!r} (kmeans++, random)")
    return points.broadcast(np.ascontiguousarray(x[rows]))


def assign(points: Points, centroids: np.ndarray, engine: str = "torch", device: str = "cpu",
           chunk_rows: int = 65536, sums: bool = False, last: LastPass | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Nearest centroid of every local point: (assignment int32, distances float32, and with
    `sums` the all-reduced per-cluster float64 sums and int64 counts). With `sums` (a Lloyd pass)
    the distances are the search's own, expanded ones (see NearestCentroid).

    With `last` (the previous pass against centroids that differ from these only in the rows
    `last.moved`), a point whose own centroid did not move is searched against the moved ones only:
    every other centroid is where it was when that point's distance was found, so the nearest is
    its own or a moved one. Points of moved centroids are searched against all. The result is a
    full pass's, for a fraction of its work once few centroids move.

    With the torch engine on CPU, torch runs on one thread here: the pass's products are OpenBLAS's, on
    every core, and torch's threads spinning between them beside OpenBLAS's made the benchmark's passes
    twice as slow (RESULTS.md). Faiss shares torch's OpenMP threads, so its engine keeps them."""
    with torch_threads(1 if engine == "torch" and resolve_device(device) == "cpu" else None):
        return _assign(points, centroids, engine, device, chunk_rows, sums, last)


def _assign(points: Points, centroids: np.ndarray, engine: str, device: str, chunk_rows: int, sums: bool,
            last: LastPass | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    nearest = NearestCentroid(centroids, engine, device)
    moved_ids = None if last is None else np.flatnonzero(last.moved)
    nearest_moved = NearestCentroid(centroids[moved_ids], engine, device) if last and len(moved_ids) else None
    k, d = centroids.shape
    assignment = np.empty(len(points), dtype=np.int32)
    distances = np.empty(len(points), dtype=np.float32)
    totals = torch.zeros(k, d, dtype=torch.float64) if sums else None
    for offset, x in points.chunks(chunk_rows):
        rows = slice(offset, offset + len(x))
        if last is None:
            labels, dist_sq = nearest(x, exact=not sums)
        else:
            labels, dist_sq = last.assignment[rows].astype(np.int64), last.distances[rows].copy()
            full = last.moved[labels]  # compared on the search's expanded distances, as `last` holds them
            if full.any():
                labels[full], dist_sq[full] = nearest(x[full], exact=False)
            if nearest_moved is not None and not full.all():
                rest = np.flatnonzero(~full)
                found, dist_found = nearest_moved(x[rest] if len(rest) < len(x) else x, exact=False)
                closer = dist_found < dist_sq[rest]
                labels[rest[closer]], dist_sq[rest[closer]] = moved_ids[found[closer]], dist_found[closer]
            if not sums:
                dist_sq = squared_distances(x, centroids, labels)
        assignment[rows] = labels
        distances[rows] = dist_sq
        if totals is not None:
            labels_t, x_t = torch.from_numpy(labels), torch.from_numpy(x)
            for a in range(0, len(x), SUM_BLOCK_ROWS):
                block = slice(a, a + SUM_BLOCK_ROWS)
                totals += torch.zeros(k, d).index_add_(0, labels_t[block], x_t[block])
    if totals is None:
        return assignment, distances, None, None
    counts = np.bincount(assignment, minlength=k).astype(np.int64)
    return assignment, distances, points.reduce(totals.numpy()), points.reduce(counts)


def exact_distances(points: Points, centroids: np.ndarray, assignment: np.ndarray,
                    chunk_rows: int = 65536) -> np.ndarray:
    """|x - c|^2 of every local point to its assigned centroid (no search)."""
    distances = np.empty(len(points), dtype=np.float32)
    for offset, x in points.chunks(chunk_rows):
        labels = assignment[offset:offset + len(x)]
        distances[offset:offset + len(x)] = squared_distances(x, centroids, labels)
    return distances


def mean_distance(points: Points, distances: np.ndarray) -> float:
    return float(points.reduce(np.array([distances.sum(dtype=np.float64)]))[0]) / max(points.total, 1)


@dataclass(frozen=True)
class LloydOptions:
    iterations: int = 50
    init: str = "kmeans++"  # kmeans++ | random
    engine: str = "torch"  # torch | faiss
    device: str = "cpu"
    chunk_rows: int = 65536
    init_points_per_centroid: int = 64
    max_points_per_centroid: int | None = None
    tol: float = 0.0  # stop once a pass lowers the objective by less than tol (relative); 0: never


def kmeans(points: Points, k: int, seed: int = 0, options: LloydOptions = LloydOptions(),
           centroids: np.ndarray | None = None, progress: bool = False,
           desc: str = "k-means") -> KMeansResult:
    """Lloyd's algorithm from `centroids` (else k-means++/random init); empty clusters keep their
    centroid; deterministic for a seed.

    With `max_points_per_centroid`, Lloyd runs on a uniform sample of k * that many points
    (faiss's subsampling, stated) and the result is the assignment of every point."""
    o = options
    if not 1 <= k <= points.total:
        raise ValueError(f"{k} clusters for {points.total} points")
    rng = np.random.default_rng(seed)
    if centroids is None:
        centroids = init_centroids(points, k, o.init, rng, o.init_points_per_centroid, o.device)
    sampled = o.max_points_per_centroid is not None and points.total > k * o.max_points_per_centroid
    if sampled:
        positions = np.sort(rng.choice(points.total, k * o.max_points_per_centroid, replace=False))
    train = (points.subset(positions) if sampled else points).resident(RESIDENT_BYTES)
    last, objective, done, fixed = None, math.inf, 0, False
    for _ in progress_bar(range(o.iterations), desc=desc, disable=not progress, leave=False):
        assignment, distances, sums, counts = assign(train, centroids, o.engine, o.device, o.chunk_rows,
                                                     sums=True, last=last)
        done += 1
        changed = len(assignment) if last is None else int(np.count_nonzero(assignment != last.assignment))
        if last is not None and train.reduce(np.array([changed]))[0] == 0:
            fixed = True  # the update below would give the same centroids
            break
        nonempty = counts > 0
        updated = centroids.copy()
        updated[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        last = LastPass(assignment, distances, np.any(updated != centroids, axis=1))
        centroids, previous_objective = updated, objective
        objective = mean_distance(train, distances)
        if previous_objective - objective <= o.tol * objective:
            break
    if fixed and not sampled:  # this pass's assignment is the one to these centroids
        distances = exact_distances(train, centroids, assignment, o.chunk_rows)
    else:
        assignment, distances, _, _ = assign(points if sampled else train, centroids, o.engine, o.device,
                                             o.chunk_rows, last=None if sampled else last)
    return KMeansResult(centroids, assignment, distances, mean_distance(points, distances), done)
