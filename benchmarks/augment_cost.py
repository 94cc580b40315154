"""Per-sample cost of the default multi-crop augmentation (2 x 224 + 8 x 98 crops), one thread,
as inside a DataLoader worker.

    .venv/bin/python benchmarks/augment_cost.py [--quick]

Limit: a worker must keep up with its share of the GPU. ViT-L/14 DINOv2 at 64 samples per GPU
per step and ~1 step/s, fed by 8 workers, gives each worker 8 / 64 s = 125 ms per sample.
"""

from __future__ import annotations

import argparse
import time

import torch

from dinov2_patho.data.augment import AugmentConfig, MultiCropAugmentation

LIMIT_MS = 125.0


def measure(aug: MultiCropAugmentation, n: int) -> float:
    tiles = [torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8) for _ in range(8)]
    for tile in tiles[:2]:
        aug(tile)  # warm-up
    start = time.process_time()  # CPU time: the host is shared, wall time is not the cost
    for i in range(n):
        aug(tiles[i % len(tiles)])
    return (time.process_time() - start) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 samples instead of 200")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = 20 if args.quick else 200
    configs = {
        "default (2x224 + 8x98, all augmentations)": AugmentConfig.defaults(),
        "geometry + normalise only": AugmentConfig.defaults(
            color_jitter_p=0.0, hed_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
            solarize_p=(0.0, 0.0, 0.0)),
    }
    for name, cfg in configs.items():
        ms = measure(MultiCropAugmentation(cfg), n)
        print(f"{name}: {ms:.1f} ms/sample CPU (1 thread, {n} samples); "
              f"{1000 / ms:.0f} samples/s per worker; {ms / LIMIT_MS:.2f} x the {LIMIT_MS:.0f} ms limit")


if __name__ == "__main__":
    main()
