"""`curate import` throughput and memory: tiles per second, and peak RSS against the matrix it writes.

Writes `--slides` trident-style `.h5` files of `--tiles` rows x `--dim` float32 features (random, so
on-disk size is the real one), runs `dinov2-patho curate import` on them in a subprocess, and prints
its wall time, tiles/s, the extrapolation to the paper's 349,664,180 tiles at this rate, and the
subprocess's peak RSS next to the size of the float16 matrix (the import streams a block of rows at a
time: RSS stays near the block's size, whatever N).

    .venv/bin/python benchmarks/curate_import.py --slides 100 --tiles 2000 --dim 1024
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dinov2_patho.data.feature_files import write_feature_file

PAPER_TILES = 349_664_180


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=100)
    parser.add_argument("--tiles", type=int, default=2000, help="tiles per slide")
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        feats = Path(tmp) / "features"
        grid = np.stack([np.arange(args.tiles) % 100 * 256, np.arange(args.tiles) // 100 * 256], 1)
        for s in range(args.slides):
            write_feature_file(feats / f"slide_{s:05d}.h5", rng.standard_normal((args.tiles, args.dim),
                                                                               np.float32), grid, {})
        on_disk = sum(p.stat().st_size for p in feats.iterdir())
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dinov2_patho", "curate", "import", "--features", str(feats),
                        "--out", f"{tmp}/emb", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
    n = args.slides * args.tiles
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    print(f"curate import: {args.slides} files, {n:,} tiles x {args.dim} ({on_disk / 1e9:.2f} GB of float32 "
          f".h5) in {wall:.1f} s: {n / wall:,.0f} tiles/s; at this rate the paper's {PAPER_TILES:,} tiles "
          f"take {PAPER_TILES / (n / wall) / 3600:.1f} h on one process")
    print(f"peak RSS {peak / 1e9:.2f} GB vs the float16 matrix written {n * args.dim * 2 / 1e9:.2f} GB "
          f"(ratio {peak / (n * args.dim * 2):.2f})")


if __name__ == "__main__":
    main()
