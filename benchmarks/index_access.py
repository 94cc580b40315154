"""TileIndex per-row access at scale: memory of the full columns against a chunked pass, and the
batch lookup `tiles()` against `tile()` per row.

Writes a grouped-by-slide index of --rows rows (37,096 slides, uint24 coordinates, one 62-cluster
level; ~8.4 bytes a row on disk) under --workdir, reused when present. Each measurement runs in a
fresh process: the same reduction of row_ids / slides / coords computed from the full column or
from `chunks()`, with the peak of numpy's heap allocations (tracemalloc: the memory-mapped files'
page cache is not allocated memory) and VmHWM. The chunked pass must allocate at most
LIMIT_CHUNKED_GB and return the same reduction.

    nice -n 10 flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/index_access.py
    .venv/bin/python benchmarks/index_access.py --rows 10000000      # a quick run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dinov2_patho.data.index_format import UINT24, LevelMeta, Manifest, encode_xy

FULL_ROWS = 349_664_180
SLIDES = 37_096
CLUSTERS = 62
STEP = 1 << 24
LIMIT_CHUNKED_GB = 0.5

_MEASURE = """
import json, sys, tracemalloc, numpy as np
from dinov2_patho.data.index import TileIndex
ix, accessor, mode = TileIndex.open(sys.argv[1]), sys.argv[2], sys.argv[3]

def reduce(part):  # of one piece, in order: the sequence of these is compared between the modes
    part = np.asarray(part, np.int64)
    return int((part * (np.arange(part.size) % 7 + 1)).sum()), int(part.size)

def pieces(column):  # the reduction itself in bounded steps, in both modes
    for a in range(0, len(column), 1 << 22):
        yield column[a:a + (1 << 22)]

tracemalloc.start()
if mode == "full":
    parts = [getattr(ix, accessor)(TileIndex.ALL)]
else:
    parts = (getattr(ix, accessor)(c) for c in ix.chunks(1 << 22))  # the pieces' size: same sequence
sums = []
for part in parts:
    for i, column in enumerate(part if accessor == "coords" else (part,)):
        sums += [(i, reduce(p)) for p in pieces(column)]
total = hash(tuple(sorted(sums, key=lambda t: t[0])))
peak = tracemalloc.get_traced_memory()[1]
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"accessor": accessor, "mode": mode, "alloc_peak": peak, "vmhwm": hwm, "reduction": total}))
"""

_LOOKUP = """
import json, sys, time, numpy as np
from dinov2_patho.data.index import TileIndex
ix = TileIndex.open(sys.argv[1])
rows = np.sort(np.random.default_rng(0).integers(0, len(ix), 2048))
t = time.perf_counter()
one = [ix.tile(int(r)) for r in rows]
per_tile = (time.perf_counter() - t) / rows.size
t = time.perf_counter()
for _ in range(20):
    s, x, y = ix.tiles(rows)
per_batch = (time.perf_counter() - t) / 20
assert [(ix.slide_names[a], int(b), int(c)) for a, b, c in zip(s, x, y)] == one
print(json.dumps({"tile_us": per_tile * 1e6, "tiles_us_per_row": per_batch / rows.size * 1e6}))
"""


def make_index(root: Path, rows: int) -> None:
    """A grouped index of `rows` rows, written in steps (manifest last, like the builder)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    counts = np.full(SLIDES, rows // SLIDES, np.int64)
    counts[: rows - counts.sum()] += 1
    np.save(root / "slide_offsets.npy", np.concatenate(([0], np.cumsum(counts))))
    (root / "slides.json").write_text(json.dumps([f"slide{i}" for i in range(SLIDES)]))
    xy = np.lib.format.open_memmap(root / "xy.npy", "w+", np.uint8, (rows, 6))
    level = np.lib.format.open_memmap(root / "level_1.npy", "w+", np.uint8, (rows,))
    sizes = np.zeros(CLUSTERS, np.int64)
    for a in range(0, rows, STEP):
        b = min(a + STEP, rows)
        xy[a:b] = encode_xy(UINT24, rng.integers(0, 200_000, b - a), rng.integers(0, 200_000, b - a))
        level[a:b] = rng.integers(0, CLUSTERS, b - a)
        sizes += np.bincount(level[a:b], minlength=CLUSTERS)
    xy.flush()
    level.flush()
    np.save(root / "level_1.sizes.npy", sizes)
    del xy, level
    Manifest(num_rows=rows, num_slides=SLIDES, grouped_by_slide=True, coords=UINT24, slide_dtype=None,
             levels=[LevelMeta("level_1", CLUSTERS, "uint8", False)], level_names=["level_1"],
             source="benchmarks/index_access.py", duplicates_dropped=0).write(root)


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=FULL_ROWS)
    p.add_argument("--workdir", default="/tmp/dinov2_patho_bench_index_access")
    args = p.parse_args()
    root = Path(args.workdir) / f"rows{args.rows}"
    if not (root / "manifest.json").is_file():
        t = time.perf_counter()
        make_index(root, args.rows)
        print(f"wrote a {args.rows:,}-row index in {time.perf_counter() - t:.0f} s: {root}")
    gb = 1e9
    ok = True
    print(f"{'accessor':9} {'full alloc':>11} {'chunked alloc':>14} {'saved':>8} {'full VmHWM':>11} "
          f"{'chunked VmHWM':>14}  same result")
    for accessor in ("row_ids", "slides", "coords"):
        full, chunked = (run(_MEASURE, str(root), accessor, mode) for mode in ("full", "chunked"))
        same = full["reduction"] == chunked["reduction"]
        ok &= same and chunked["alloc_peak"] <= LIMIT_CHUNKED_GB * gb
        print(f"{accessor:9} {full['alloc_peak'] / gb:9.2f} GB {chunked['alloc_peak'] / gb:12.3f} GB "
              f"{full['alloc_peak'] / max(chunked['alloc_peak'], 1):7.0f}x {full['vmhwm'] / gb:9.2f} GB "
              f"{chunked['vmhwm'] / gb:12.2f} GB  {same}")
    lookup = run(_LOOKUP, str(root))
    print(f"lookup of 2048 sorted random rows: tile() {lookup['tile_us']:.1f} us/row, tiles() "
          f"{lookup['tiles_us_per_row']:.2f} us/row ({lookup['tile_us'] / lookup['tiles_us_per_row']:.0f}x)")
    print(f"chunked passes within {LIMIT_CHUNKED_GB} GB of allocations and equal to the full columns: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
