"""A planted slide task in feature files, to check `eval slide --features` end to end on a CPU.

One trident-style `<slide_id>.h5` per slide: every tile a standard normal feature vector; a positive
slide has `signal_tiles` of its tiles moved `shift` standard deviations along one fixed direction, so its
label is carried by a few tiles, as a small metastasis carries a Camelyon16 slide's. Attention-MIL
should find them (AUROC near 1); with the labels shuffled nothing is there to find (AUROC near 0.5).
At 3 tiles in 30-60 moved 3 standard deviations, 80 slides, eva's head reached AUROC 0.81-0.98 over
seeds 0-3; the defaults (4 deviations, 120 slides) make a check that holds on every seed
(`benchmarks/slide_features.py`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from dinov2_patho.data.feature_files import write_feature_file

SPLITS = (("train", 0.5), ("val", 0.2), ("test", 0.3))


def make_planted_features(folder: str | Path, *, num_slides: int = 120, tiles: tuple[int, int] = (30, 60),
                          dim: int = 32, signal_tiles: int = 3, shift: float = 4.0, seed: int = 0,
                          shuffle_labels: bool = False) -> Path:
    """Write `folder`/features/<slide_id>.h5 and `folder`/labels.csv (slide_id,label,split: half the
    slides positive, each split half positive); return the labels CSV."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    labels = np.arange(num_slides) % 2
    splits = np.empty(num_slides, object)
    for cls in (0, 1):  # each split stratified by label
        members = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.round(np.cumsum([0, *(f for _, f in SPLITS)]) * len(members)).astype(int)
        for (split, _), a, b in zip(SPLITS, bounds[:-1], bounds[1:]):
            splits[members[a:b]] = split
    for i in range(num_slides):
        n = int(rng.integers(tiles[0], tiles[1] + 1))
        x = rng.normal(size=(n, dim))
        if labels[i]:
            x[rng.choice(n, signal_tiles, replace=False)] += shift * direction
        coords = np.stack([np.arange(n) * 256, np.zeros(n, np.int64)], 1)
        write_feature_file(folder / "features" / f"slide_{i:03d}.h5", x, coords, {"patch_size": 224})
    shown = rng.permutation(labels) if shuffle_labels else labels
    labels_csv = folder / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("slide_id", "label", "split"))
        for i, (label, split) in enumerate(zip(shown, splits)):
            w.writerow((f"slide_{i:03d}", ("negative", "positive")[label], split))
    return labels_csv
