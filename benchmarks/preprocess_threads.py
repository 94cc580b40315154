"""Benchmark-image preprocessing (backbones.preprocess.Preprocess) at 2 torch threads against 1.

    .venv/bin/python benchmarks/preprocess_threads.py [--quick]

Tile benchmarks preprocess in the main process (features.num_workers: 0), at torch's default threads.
Limit: 2 threads no slower than 1.5 x one thread (its normalisation in torch made 2 threads 8-10x
slower than 1 on 2 shared cores; it is in numpy now: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dinov2_patho.backbones.preprocess import Preprocess

LIMIT = 1.5


def measure(threads: int, images: list[np.ndarray]) -> float:
    torch.set_num_threads(threads)
    preprocess = Preprocess()
    preprocess(images[0])  # warm-up
    start = time.perf_counter()  # wall time: waiting threads are the cost here
    for image in images:
        preprocess(image)
    return (time.perf_counter() - start) / len(images) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 images instead of 300")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 300, 3), dtype=np.uint8) for _ in range(50 if args.quick else 300)]
    one, two = measure(1, images), measure(2, images)
    print(f"Preprocess 300x300 -> 224: {one:.2f} ms/image at 1 thread, {two:.2f} at 2; ratio {two / one:.2f} "
          f"(limit {LIMIT})")


if __name__ == "__main__":
    main()
