"""The synthetic cohort as a benchmark: tiles of labels.csv (tissue type per tile), read
from the slides through a TileSource, split by slide (patient-disjoint, as real benchmarks)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from dinov2_patho.textfile import open_text

from .base import BENCHMARKS, Benchmark, BenchmarkError, ImageSplit, require_file


class TileSplit(ImageSplit):
    def __init__(self, source, tiles: list[tuple[str, int, int]], labels: list[int]):
        self.source = source
        self.tiles = tiles
        self.labels = np.asarray(labels, np.int64)
        self.groups = np.asarray([slide for slide, _, _ in tiles])

    def read(self, i: int) -> np.ndarray:
        return self.source.read(*self.tiles[i])


def _default_source(root: Path):
    from dinov2_patho.data.readers import SlideTileSource
    from dinov2_patho.data.slides import SlideRegistry

    return SlideTileSource(SlideRegistry.from_dir(root / "slides"))


@BENCHMARKS.register("synthetic")
def synthetic(root: Path, source=None, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
              max_tiles_per_split: int | None = None, seed: int = 0) -> Benchmark:
    """`root`: a cohort directory (labels.csv, slides/). Slides, in sorted order, go to
    train/val/test by `fractions`; `max_tiles_per_split` keeps a seeded random subset."""
    root = Path(root)
    labels_csv = require_file(root / "labels.csv",
                              "the cohort's labels.csv (slide_id,tile_x,tile_y,tissue_type)")
    with open_text(labels_csv) as f:
        reader = csv.DictReader(f)
        missing = {"slide_id", "tile_x", "tile_y", "tissue_type"} - set(reader.fieldnames or [])
        if missing:
            raise BenchmarkError(f"{labels_csv}: missing column(s) {sorted(missing)}")
        rows = list(reader)
    if not rows:
        raise BenchmarkError(f"{labels_csv}: no tiles")
    classes = tuple(sorted({r["tissue_type"] for r in rows}))
    slides = sorted({r["slide_id"] for r in rows})
    bounds = np.round(np.cumsum(fractions) / sum(fractions) * len(slides)).astype(int)
    split_of = {s: ("train", "val", "test")[int(np.searchsorted(bounds, i, side="right"))]
                for i, s in enumerate(slides)}
    source = source if source is not None else _default_source(root)
    rng = np.random.default_rng(seed)
    splits = {}
    for split in ("train", "val", "test"):
        chosen = [r for r in rows if split_of[r["slide_id"]] == split]
        if max_tiles_per_split is not None and len(chosen) > max_tiles_per_split:
            keep = np.sort(rng.choice(len(chosen), max_tiles_per_split, replace=False))
            chosen = [chosen[i] for i in keep]
        if chosen:
            tiles = [(r["slide_id"], int(r["tile_x"]), int(r["tile_y"])) for r in chosen]
            splits[split] = TileSplit(source, tiles, [classes.index(r["tissue_type"]) for r in chosen])
    return Benchmark("synthetic", classes, 0.5, splits)
