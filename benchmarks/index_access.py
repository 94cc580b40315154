"""TileIndex per-row access at scale: memory of the full columns against a chunked pass, and the
batch lookup `tiles()` against `tile()` per row.

Writes a grouped-by-slide index of --rows rows (37,096 slides, uint24 coordinates, one 62-cluster
level; ~8.4 bytes a row on disk) under --workdir, reused when present. Each measurement runs in a
fresh process: the same reduction of row_ids / slides / coords computed from the full column or
from `chunks()`, with the peak of numpy's heap allocations (tracemalloc: the memory-mapped files'
page cache is not allocated memory) and VmHWM. The chunked pass must allocate at most
LIMIT_CHUNKED_GB and return the same reduction.

With --consumers REV: three callers that used to take whole columns (the slide ranges `curate embed`
writes, one slide's coordinates for `tiles extract`, a slide-capped stratified sampler over cached strata
with its telemetry), each measured with the code of git revision REV and with this tree, in fresh
processes: peak allocations, VmHWM, and a digest of what they produce, which must match.

    nice -n 10 flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/index_access.py
    .venv/bin/python benchmarks/index_access.py --rows 10000000      # a quick run
    nice -n 10 flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/index_access.py \\
        --rows 100000000 --consumers 7b483af
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from dinov2_patho.data.index.format import UINT24, LevelMeta, Manifest, encode_xy

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


_CONSUMER = """
import hashlib, json, shutil, sys, tempfile, time, tracemalloc
from pathlib import Path
from dinov2_patho.curation import embed  # imported before tracing: module objects are not the consumers'
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.tilestore import _slide_coords
from dinov2_patho.samplers import build_sampler
ix, consumer = TileIndex.open(sys.argv[1]), sys.argv[2]

def embed_slides():  # the slide ranges (slides.csv) that finish a `curate embed` run
    out = Path(tempfile.mkdtemp(prefix="index_consumer_"))
    (out / embed.PROGRESS).mkdir()
    (out / embed.PROGRESS / f"rows_0_{len(ix)}.json").write_text(json.dumps({"rows": len(ix)}))
    (out / embed.PARTIAL).write_bytes(b"")
    (out / embed.RUN).write_text("{}")
    embed._finish(out, ix, {"tiles": {"num_rows": len(ix)}, "dim": 1}, 1)
    text = (out / embed.SLIDES).read_bytes()
    shutil.rmtree(out)
    return text

def tile_store():  # the coordinates of one slide, as `tiles extract --slides` reads them
    coords = _slide_coords(ix, [ix.slide_names[len(ix.slide_names) // 2]])
    return b"".join(c.tobytes() for c in coords.values())

def sampler():  # a slide-capped stratified sampler (strata cached next to the index) and its telemetry
    s = build_sampler({"name": "cluster_stratified", "level": 1, "max_slides_per_epoch": 800}, ix, 2048)
    out = json.dumps([s.telemetry(s.next_batch()) for _ in range(8)]).encode()
    kept["bytes"] = tracemalloc.get_traced_memory()[0]  # while the sampler lives
    return out

kept = {}
tracemalloc.start()
t = time.perf_counter()
result = {"embed_slides": embed_slides, "tile_store": tile_store, "sampler": sampler}[consumer]()
seconds = time.perf_counter() - t
peak = tracemalloc.get_traced_memory()[1]
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"alloc_peak": peak, "kept": kept.get("bytes"), "vmhwm": hwm, "seconds": seconds,
                  "digest": hashlib.sha256(result).hexdigest()}))
"""
CONSUMERS = ("embed_slides", "tile_store", "sampler")


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


def run(script: str, *args: str, code: Path | None = None) -> dict:
    """`script` in a fresh process, importing dinov2_patho from `code` (default: the installed package)."""
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None
    cwd = code or tempfile.gettempdir()  # `python -c` puts its working directory first on sys.path
    out = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True,
                         env=env, cwd=cwd)
    return json.loads(out.stdout)


def code_of(rev: str, dest: Path) -> Path:
    """The package as of git revision `rev`, importable from `dest`; samplers/ and eval/ are linked in
    as the editable install maps them."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "dinov2_patho", "samplers", "eval"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    for name in ("samplers", "eval"):
        (dest / "dinov2_patho" / name).symlink_to(Path("..") / name)
    return dest


def compare_consumers(root: Path, rev: str) -> bool:
    gb = 1e9
    ok = True
    run(_CONSUMER, str(root), "sampler")  # builds the strata cache, which both codes then read
    print(f"{'consumer':12} {'alloc ' + rev:>16} {'alloc now':>10} {'saved':>7} {'VmHWM ' + rev:>16} "
          f"{'VmHWM now':>10} {'kept ' + rev:>15} {'kept now':>9} {'s ' + rev:>10} {'s now':>6}  same result")
    with tempfile.TemporaryDirectory(prefix="index_access_code_") as tmp:
        before_code = code_of(rev, Path(tmp))
        for consumer in CONSUMERS:
            before = run(_CONSUMER, str(root), consumer, code=before_code)
            now = run(_CONSUMER, str(root), consumer)
            same = before["digest"] == now["digest"]
            ok &= same
            kept = [f"{m['kept'] / gb:.3f} GB" if m["kept"] is not None else "-" for m in (before, now)]
            print(f"{consumer:12} {before['alloc_peak'] / gb:13.3f} GB {now['alloc_peak'] / gb:7.3f} GB "
                  f"{before['alloc_peak'] / max(now['alloc_peak'], 1):6.0f}x {before['vmhwm'] / gb:13.2f} GB "
                  f"{now['vmhwm'] / gb:7.2f} GB {kept[0]:>15} {kept[1]:>9} {before['seconds']:10.1f} "
                  f"{now['seconds']:6.1f}  {same}")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=FULL_ROWS)
    p.add_argument("--workdir", default="/tmp/dinov2_patho_bench_index_access")
    p.add_argument("--consumers", metavar="REV",
                   help="compare the consumers with the code of git revision REV")
    args = p.parse_args()
    root = Path(args.workdir) / f"rows{args.rows}"
    if not (root / "manifest.json").is_file():
        t = time.perf_counter()
        make_index(root, args.rows)
        print(f"wrote a {args.rows:,}-row index in {time.perf_counter() - t:.0f} s: {root}")
    if args.consumers:
        ok = compare_consumers(root, args.consumers)
        print(f"every consumer produces what it did at {args.consumers}: {ok}")
        return 0 if ok else 1
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
