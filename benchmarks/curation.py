"""`curate kmeans` against facebookresearch/ssl-data-curation, and at scale.

(a) compare: the same 100,000 x 64 float32 Gaussian input, two levels [1,000, 100], the reference's
    `hierarchical_kmeans_with_resampling` (initial k-means + 10 resampling steps, "closest",
    sample sizes 50 / 5 = half the mean cluster size, its own rule) against ours with the same
    work (resampling_steps 11 = step 0 + 10 resampled). Prints the wall-time ratio (target >= 10x)
    and each level's k-means objective, the mean squared distance of a point to its centroid,
    computed here the same way for both (target: within 1% of the reference, or lower).
    The reference runs from its own checkout and venv (never part of this project):
      git clone ... /tmp/ssl-data-curation && python -m venv /tmp/ssl-data-curation/.venv &&
      /tmp/ssl-data-curation/.venv/bin/pip install -c constraints/cpu.txt torch==2.13.0 "numpy<2" \
          scikit-learn tqdm
(b) scale: ROWS x 384 float16 rows (a memmap in --tmp, deleted afterwards) through the four levels
    of t1 scaled to ROWS, run as `dinov2-patho curate kmeans` in a child process: time per level and
    the child's peak RSS (target <= 8 GB at 10M rows).

    nice -n 5 .venv/bin/python benchmarks/curation.py compare --reference /tmp/ssl-data-curation
    nice -n 5 .venv/bin/python benchmarks/curation.py scale --rows 1000000
(c) kernels: the two products k-means spends its time in, timed each engine's way on this machine.
    .venv/bin/python benchmarks/curation.py kernels
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP, TARGET_OBJECTIVE, TARGET_RSS_GB = 10.0, 1.01, 8.0

REFERENCE_DRIVER = """
import json, os, sys, time
import numpy as np, torch
sys.path.insert(0, os.getcwd())  # the reference checkout
from src import hierarchical_kmeans_gpu as hkmg
x = torch.tensor(np.load(sys.argv[1]), dtype=torch.float32)
start = time.perf_counter()
levels = hkmg.hierarchical_kmeans_with_resampling(data=x, n_clusters=[1000, 100], n_levels=2,
    sample_sizes=[50, 5], n_resamples=10, sample_strategy="closest", verbose=False)
seconds = time.perf_counter() - start
arrays = {}
for i, level in enumerate(levels):
    arrays[f"centroids_{i}"] = torch.as_tensor(level["centroids"]).double().numpy()
    arrays[f"assignment_{i}"] = np.asarray(level["assignment"])
np.savez(sys.argv[2], **arrays)
print(json.dumps({"seconds": seconds}))
"""


def objective(points: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> float:
    """Mean squared L2 distance of each point to its assigned centroid, in float64."""
    diff = points.astype(np.float64) - centroids.astype(np.float64)[assignment]
    return float(np.einsum("ij,ij->i", diff, diff).mean())


def tree_objectives(x: np.ndarray, centroids: list[np.ndarray], assignments: list[np.ndarray]) -> list[float]:
    points, out = x, []
    for c, a in zip(centroids, assignments):
        out.append(objective(points, c, a))
        points = c
    return out


def load() -> str:
    return "load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run_ours(npy: Path, out: Path, overrides: list[str]) -> tuple[float, list[float]]:
    from dinov2_patho.curation.config import load_curation_config
    from dinov2_patho.curation.hierarchy import build_levels
    from dinov2_patho.curation.tree import ClusterTree

    levels = [{"clusters": 1000, "resampling_steps": 11, "sample_per_cluster": 50, "strategy": "closest"},
              {"clusters": 100, "resampling_steps": 11, "sample_per_cluster": 5, "strategy": "closest"}]
    cfg = load_curation_config(overrides=overrides).kmeans
    cfg.levels = levels
    x = np.load(npy, mmap_mode="r")
    start = time.perf_counter()
    build_levels(x, npy, out, cfg, progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - start
    tree = ClusterTree.open(out)
    cents = [np.asarray(tree.array(k, "centroids")) for k in (1, 2)]
    assignments = [np.asarray(tree.array(k, "assignment")) for k in (1, 2)]
    return seconds, tree_objectives(np.asarray(x), cents, assignments)


def run_reference(reference: Path, python: Path, npy: Path, out: Path) -> tuple[float, list[float]]:
    driver = out.parent / "reference_driver.py"
    driver.write_text(REFERENCE_DRIVER)
    result = subprocess.run([str(python), str(driver), str(npy), str(out)], cwd=reference, check=True,
                            capture_output=True, text=True)
    seconds = json.loads(result.stdout.strip().splitlines()[-1])["seconds"]
    saved = np.load(out)
    x = np.load(npy)
    return seconds, tree_objectives(x, [saved["centroids_0"], saved["centroids_1"]],
                                    [saved["assignment_0"], saved["assignment_1"]])


def compare(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        npy = tmp / "x.npy"
        np.save(npy, np.random.default_rng(0).standard_normal((100_000, 64)).astype(np.float32))
        variants = {"faithful (fresh k-means++ per step, 50 iterations)": [],
                    "fast (warm resampling steps, tol 1e-4)": ["kmeans.warm_resampling=true",
                                                               "kmeans.tol=0.0001"]}
        rows = []
        if not args.skip_reference:
            print(f"reference: {load()}", flush=True)
            ref_seconds, ref_obj = run_reference(args.reference, args.reference_python, npy, tmp / "ref.npz")
            print(f"reference: {ref_seconds:.1f} s, objectives {ref_obj}, {load()}", flush=True)
        else:
            ref_seconds, ref_obj = args.reference_seconds, None
        for name, overrides in variants.items():
            print(f"ours {name}: {load()}", flush=True)
            seconds, obj = run_ours(npy, tmp / name.split()[0], [f"kmeans.engine={args.engine}", *overrides])
            print(f"ours {name}: {seconds:.1f} s, objectives {obj}, {load()}", flush=True)
            rows.append((name, seconds, obj))
        print(f"\n| run | wall s | speedup (target >= {TARGET_SPEEDUP:g}x) | objective L1 | L2 | "
              f"vs reference (target <= {TARGET_OBJECTIVE:g}) |")
        print("|---|---|---|---|---|---|")
        if ref_obj is not None:
            print(f"| reference | {ref_seconds:.1f} | 1.0x | {ref_obj[0]:.4f} | {ref_obj[1]:.4f} | 1 / 1 |")
        for name, seconds, obj in rows:
            ratio = " / ".join(f"{o / r:.4f}" for o, r in zip(obj, ref_obj)) if ref_obj else "n/a"
            print(f"| ours, {name} | {seconds:.1f} | {ref_seconds / seconds:.1f}x | {obj[0]:.4f} | "
                  f"{obj[1]:.4f} | {ratio} |")


def kernels(args: argparse.Namespace) -> None:
    """The two products k-means spends its time in, each engine's way, on this machine: one nearest-centroid
    search (50,000 x 64 rows against 1,000 centroids: a resampling step's pass) and one greedy k-means++
    step (8 candidates' augmented rows against 50,000 points)."""
    import faiss
    import torch

    from dinov2_patho.curation.kmeans import NearestCentroid, torch_threads

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50_000, 64)).astype(np.float32)
    centroids = rng.standard_normal((1000, 64)).astype(np.float32)

    def ms(fn, repeats: int) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3

    torch_nearest, faiss_nearest = NearestCentroid(centroids, "torch"), NearestCentroid(centroids, "faiss")
    agree = np.mean(torch_nearest(x, exact=False)[0] == faiss_nearest(x, exact=False)[0])
    threads = faiss.omp_get_max_threads()
    with torch_threads(1):  # as a Lloyd pass runs it (kmeans.assign)
        torch_ms = ms(lambda: torch_nearest(x, exact=False), 20)
    search = {"torch engine (OpenBLAS product, numpy argmin; torch on 1 thread)": torch_ms,
              f"the same, torch on {torch.get_num_threads()} threads (its threads spin beside OpenBLAS's)":
                  ms(lambda: torch_nearest(x, exact=False), 20),
              f"faiss IndexFlatL2 ({threads} threads)": ms(lambda: faiss_nearest(x, exact=False), 20)}
    points = rng.standard_normal((66, 50_000)).astype(np.float32)
    candidates = rng.standard_normal((8, 66)).astype(np.float32)
    out = np.empty((8, 50_000), np.float32)
    p, c, o = torch.from_numpy(points), torch.from_numpy(candidates), torch.from_numpy(out)
    step = {f"torch.mm ({torch.get_num_threads()} threads)": ms(lambda: torch.mm(c, p, out=o), 500),
            "numpy matmul (OpenBLAS)": ms(lambda: np.matmul(candidates, points, out=out), 500)}
    print(f"nearest centroid, 50,000 x 64 against 1,000 (labels agree on {100 * agree:.2f} %); {load()}")
    for name, value in search.items():
        print(f"  {name}: {value:.1f} ms")
    print("k-means++ step, 8 x 66 by 66 x 50,000:")
    for name, value in step.items():
        print(f"  {name}: {value * 1e3:.0f} us")
    first, *_, last = search.values()
    print(f"faiss / torch engine search: {last / first:.1f}x")


def make_memmap(path: Path, rows: int, dim: int, chunk: int = 1 << 18) -> None:
    """Gaussian float16 rows around 4,096 random centres (a clustered cohort), written chunk by chunk."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4096, dim)).astype(np.float32) * 2
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    for a in range(0, rows, chunk):
        b = min(a + chunk, rows)
        noise = rng.standard_normal((b - a, dim), np.float32)
        out[a:b] = centres[rng.integers(0, len(centres), b - a)] + noise
    out.flush()
    del out


def scale(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(dir=args.tmp, prefix="curation_scale_"))
    try:
        npy = tmp / "embeddings.npy"
        start = time.perf_counter()
        make_memmap(npy, args.rows, args.dim)
        print(f"generated {args.rows} x {args.dim} float16 ({npy.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - start:.0f} s; {load()}", flush=True)
        cmd = [sys.executable, "-m", "dinov2_patho.cli", "curate", "kmeans", "--embeddings", str(npy),
               "--out", str(tmp / "tree"), "--config-file", str(ROOT / "configs/curation/t1.yaml"),
               f"kmeans.engine={args.engine}", *args.overrides]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
        summary = json.loads((tmp / "tree" / "kmeans_summary.json").read_text())
        print(f"\n{args.rows} x {args.dim}: {wall:.0f} s wall, peak RSS {peak_gb:.2f} GB "
              f"({TARGET_RSS_GB / peak_gb:.1f}x under the {TARGET_RSS_GB:g} GB target); {load()}")
        print("| level | clusters | objective | seconds |\n|---|---|---|---|")
        for s in summary:
            print(f"| {s['level']} | {s['clusters']} | {s['objective']:.4f} | {s['seconds']:.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    a = sub.add_parser("compare", help="(a) side by side with ssl-data-curation")
    a.add_argument("--reference", type=Path, default=Path("/tmp/ssl-data-curation"))
    a.add_argument("--reference-python", type=Path, default=Path("/tmp/ssl-data-curation/.venv/bin/python"))
    a.add_argument("--skip-reference", action="store_true", help="compare against --reference-seconds only")
    a.add_argument("--reference-seconds", type=float, default=304.0,
                   help="DESIGN.md's anchor on this machine")
    sub.add_parser("kernels", help="(c) the nearest-centroid search and k-means++ step, each engine's way")
    b = sub.add_parser("scale", help="(b) ROWS x DIM float16 through a scaled t1")
    b.add_argument("--rows", type=int, default=10_000_000)
    b.add_argument("--dim", type=int, default=384)
    b.add_argument("overrides", nargs="*", help="kmeans config overrides, e.g. kmeans.tol=1e-4")
    for p in (a, b):
        p.add_argument("--engine", default="torch")
        p.add_argument("--tmp", default="/tmp")
    args = parser.parse_args()
    {"compare": compare, "kernels": kernels, "scale": scale}[args.part](args)


if __name__ == "__main__":
    main()
