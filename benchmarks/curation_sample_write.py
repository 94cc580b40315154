"""`curate sample` and `curate write` at scale: wall time, peak RSS, extrapolated to 350M tiles.

sample: a random tree with the paper's t1 cluster counts (3.5M / 35,000 / 350 / 62; skewed sizes)
over N and N/2 tiles; the tree check and the balanced subset (a quarter of the tiles, `random` and
`closest`) run in a child process (its peak RSS is theirs alone). With the clusters fixed, time is
linear in the tiles, so the two sizes give the fit that extrapolates to 349,664,180 tiles; CPU seconds
(the machine is shared), against limits of 10 minutes and 16 GiB at 350M tiles.

write: a tile index of W rows (8 slides) and a tree over it (W/100, W/10^4, 62 clusters); `curate
write` in a child process, against `build_index` of the CSV it wrote (the reference: the index
build it ends with).

    flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/curation_sample_write.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

FULL_TILES = 349_664_180
T1 = (3_500_000, 35_000, 350, 62)
LIMITS = {"sample_s_at_350M": 600.0, "sample_peak_rss_gb_at_350M": 16.0}
_HWM = 'next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))'
_SAMPLE = f"""
import sys, time, json
import numpy as np
from dinov2_patho.curation.tree import ClusterTree
from dinov2_patho.curation.tree_check import check_tree
from dinov2_patho.curation.sampling import balanced_rows
tree = ClusterTree.open(sys.argv[1])
out = {{}}
t, cpu = time.perf_counter(), time.process_time()
check_tree(tree, progress=False)
out["check_s"], out["check_cpu_s"] = time.perf_counter() - t, time.process_time() - cpu
for strategy in ("random", "closest"):
    t, cpu = time.perf_counter(), time.process_time()
    rows = balanced_rows(tree, tree.num_points // 4, strategy, 0, progress=False).rows
    out[strategy + "_s"], out[strategy + "_cpu_s"] = time.perf_counter() - t, time.process_time() - cpu
out["peak_rss"] = {_HWM}
print(json.dumps(out))
"""
_WRITE = f"""
import sys, time, json
from dinov2_patho.curation.write import write_clusters
from dinov2_patho.data.index import build_index
t, cpu = time.perf_counter(), time.process_time()
write_clusters(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
out = {{"write_s": time.perf_counter() - t, "write_cpu_s": time.process_time() - cpu, "peak_rss": {_HWM}}}
t, cpu = time.perf_counter(), time.process_time()
build_index(sys.argv[3] + "/clusters.csv", sys.argv[3] + "/again", progress=False)
out.update(index_s=time.perf_counter() - t, index_cpu_s=time.process_time() - cpu)
print(json.dumps(out))
"""


def make_tree(root: Path, tiles: int, clusters: tuple[int, ...], seed: int = 0) -> None:
    from dinov2_patho.curation.tree import write_level, write_manifest

    rng = np.random.default_rng(seed)
    points = tiles
    for level, k in enumerate(clusters, 1):
        cdf = np.cumsum(rng.dirichlet(np.full(k, 0.5)))
        assignment = np.minimum(np.searchsorted(cdf, rng.random(points) * cdf[-1]), k - 1)
        write_level(root, level, np.zeros((k, 1), np.float32), assignment, rng.random(points, np.float32))
        points = k
    write_manifest(root, tiles, list(clusters))


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_sample(work: Path, tiles: int, clusters: tuple[int, ...]) -> dict:
    runs = {}
    for n in (tiles // 2, tiles):
        make_tree(work / f"tree{n}", n, clusters)
        runs[n] = child(_SAMPLE, work / f"tree{n}")
        print(f"sample  {n:>12,} tiles: " + ", ".join(
            f"{k} {v:.2f}" if k.endswith("_s") else f"{k} {v / 2**30:.2f} GiB" for k, v in runs[n].items()))
    small, large = runs[tiles // 2], runs[tiles]

    def at_full(key: str) -> float:  # linear in tiles, through the two measured sizes
        slope = (large[key] - small[key]) / (tiles - tiles // 2)
        return large[key] + max(slope, 0.0) * (FULL_TILES - tiles)

    full = {k: at_full(k) for k in large}
    total, rss = full["check_cpu_s"] + full["random_cpu_s"], full["peak_rss"] / 2**30
    print(f"sample  extrapolated to {FULL_TILES:,} tiles, clusters {'/'.join(map(str, clusters))} (CPU s): "
          f"check {full['check_cpu_s']:.0f}, random {full['random_cpu_s']:.0f}, "
          f"closest {full['closest_cpu_s']:.0f}; peak RSS {rss:.1f} GiB")
    time_limit, rss_limit = LIMITS["sample_s_at_350M"], LIMITS["sample_peak_rss_gb_at_350M"]
    print(f"sample  check + random at 350M: {total:.0f} CPU s = {total / time_limit:.2f}x the limit "
          f"{time_limit:.0f} s; peak RSS {rss / rss_limit:.2f}x the limit {rss_limit:.0f} GiB")
    return full


def bench_write(work: Path, rows: int) -> dict:
    from dinov2_patho.data.index import build_index

    side = int(np.ceil(np.sqrt(rows / 8)))
    slide = np.repeat(np.arange(8), side * side)[:rows]
    cell = np.tile(np.arange(side * side), 8)[:rows]
    table = pa.table({"slide_id": pa.array([f"TCGA-XX-{s:04d}-01Z-00-DX1" for s in range(8)]).take(slide),
                      "tile_x": 224 * (cell % side), "tile_y": 224 * (cell // side)})
    pcsv.write_csv(table, work / "tiles.csv")
    build_index(work / "tiles.csv", work / "tiles", progress=False)
    make_tree(work / "wtree", rows, (max(rows // 100, 1), max(rows // 10_000, 1), 62))
    r = child(_WRITE, work / "tiles", work / "wtree", work / "out")
    csv_cpu = r["write_cpu_s"] - r["index_cpu_s"]  # write = tree check + CSV + the index build timed again
    print(f"write   {rows:,} rows: {r['write_s']:.2f} s wall, {r['write_cpu_s']:.2f} s CPU "
          f"({rows / r['write_cpu_s']:,.0f} rows per CPU s; tree check + CSV {csv_cpu:.2f}, its index build "
          f"{r['index_cpu_s']:.2f}), peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
    ratio = r["write_cpu_s"] / r["index_cpu_s"]
    print(f"write   CPU ratio to build_index of the same CSV (reference): {ratio:.2f}x; "
          f"extrapolated to {FULL_TILES:,} rows: {r['write_cpu_s'] * FULL_TILES / rows / 60:.0f} CPU min")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=20_000_000, help="sample: tiles of the larger tree")
    parser.add_argument("--write-rows", type=int, default=2_000_000)
    parser.add_argument("--quick", action="store_true", help="1M tiles, 350,000 leaf clusters, 200k rows")
    args = parser.parse_args()
    tiles, clusters, rows = args.tiles, T1, args.write_rows
    if args.quick:
        tiles, clusters, rows = 1_000_000, (350_000, 3_500, 350, 62), 200_000
    with tempfile.TemporaryDirectory(prefix="curation_bench.") as work:
        t = time.perf_counter()
        bench_sample(Path(work), tiles, clusters)
        bench_write(Path(work), rows)
        print(f"total {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
