"""Slide tasks by name, from public on-disk layouts. The tiles of real slides come from a tile
index given as `tiles` (run `dinov2-patho curate tiles --slides <the slide folder> --out DIR` once
and pass DIR); the synthetic cohort's own tiles are indexed into `cache` on first use.

Layouts:

    synthetic    ROOT/slide_labels.csv, ROOT/slides/, ROOT/clusters.csv   (make_cohort with lesions)
    camelyon16   ROOT/training/normal/normal_NNN.tif, ROOT/training/tumor/tumor_NNN.tif,
                 ROOT/testing/images/test_NNN.tif, ROOT/testing/reference.csv
                 (no header: test_NNN,Normal|Tumor[,...]); val = a stratified `val_fraction` of training
    panda        ROOT/train.csv (image_id,data_provider,isup_grade,gleason_score),
                 ROOT/train_images/<image_id>.tiff; ISUP grades 0-5 (ordinal); stratified
                 train / val / test of 70 / 15 / 15 %
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.errors import UserError
from dinov2_patho.registry import Registry
from dinov2_patho.textfile import open_text

from ..runner import heldout_split
from .tasks import SlideTask, open_tiles, read_labels, task_from_rows

SLIDE_TASKS = Registry("slide task")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"expected {what} at {path} (not found)")
    return path


def _tiles(tiles: str | Path | None, name: str, slides: Path):
    if tiles is None:
        raise UserError(f"slide task {name}: datasets.{name}.tiles is not set; index the tissue tiles once "
                        f"with `dinov2-patho curate tiles --slides {slides} --out DIR` and pass DIR")
    return open_tiles(tiles)


def _assign_splits(rows: list[dict[str, str]], fractions: tuple[float, float], seed: int) -> None:
    """Stratified by label: `fractions` (val, test) of each class's slides, the rest train."""
    labels = np.unique([r["label"] for r in rows], return_inverse=True)[1]
    for r in rows:
        r["split"] = "train"
    rest, taken = np.arange(len(rows)), 0.0
    for split, fraction in zip(("val", "test"), fractions):
        if fraction > 0:
            keep, held = heldout_split(labels[rest], fraction / (1 - taken), seed)
            for i in rest[held]:
                rows[i]["split"] = split
            rest, taken = rest[keep], taken + fraction


@SLIDE_TASKS.register("synthetic")
def synthetic(root: Path, cache: Path, tiles: str | Path | None = None) -> SlideTask:
    from dinov2_patho.data.index import build_index

    labels_csv = _require(root / "slide_labels.csv", "the cohort's slide_labels.csv (`dinov2-patho cohort "
                                                     "--positive-fraction P`, P > 0)")
    if tiles is None:
        index_dir = cache / "index"
        if not (index_dir / "manifest.json").is_file():
            build_index(_require(root / "clusters.csv", "the cohort's clusters.csv"), index_dir,
                        progress=False)
        tiles = index_dir
    return task_from_rows("synthetic", read_labels(labels_csv), labels_csv,
                          SlideRegistry.from_dir(_require(root / "slides", "the cohort's slides folder")),
                          open_tiles(tiles), ("negative", "positive"))


@SLIDE_TASKS.register("camelyon16")
def camelyon16(root: Path, cache: Path, tiles: str | Path | None = None, val_fraction: float = 0.2,
               seed: int = 0) -> SlideTask:
    rows: list[dict[str, str]] = []
    for label in ("normal", "tumor"):
        folder = _require(root / "training" / label, f"Camelyon16's training/{label} folder")
        rows += [{"slide_id": p.stem, "label": label, "line": p.name} for p in sorted(folder.glob("*.tif"))]
    if not rows:
        raise UserError(f"{root / 'training'}: no .tif slides in normal/ or tumor/")
    _assign_splits(rows, (val_fraction, 0.0), seed)
    reference = _require(root / "testing" / "reference.csv", "Camelyon16's testing/reference.csv")
    with open_text(reference) as f:
        for line, fields in enumerate(csv.reader(f), start=1):
            if len(fields) < 2 or fields[1].strip().lower() not in ("normal", "tumor"):
                raise UserError(f"{reference}: line {line}: expected test_NNN,Normal|Tumor[,...], "
                                f"got {fields}")
            rows.append({"slide_id": fields[0].strip(), "label": fields[1].strip().lower(), "split": "test",
                         "line": str(line)})
    slides_root = _require(root, "the Camelyon16 root")
    return task_from_rows("camelyon16", rows, reference, SlideRegistry.from_dir(slides_root),
                          _tiles(tiles, "camelyon16", slides_root), ("normal", "tumor"))


@SLIDE_TASKS.register("panda")
def panda(root: Path, cache: Path, tiles: str | Path | None = None, seed: int = 0) -> SlideTask:
    train_csv = _require(root / "train.csv", "PANDA's train.csv")
    with open_text(train_csv) as f:
        reader = csv.DictReader(f)
        missing = {"image_id", "isup_grade"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{train_csv}: header lacks column(s) {sorted(missing)} (PANDA's "
                            "image_id,data_provider,isup_grade,gleason_score)")
        rows = [{"slide_id": r["image_id"], "label": r["isup_grade"], "line": str(line)}
                for line, r in enumerate(reader, start=2)]
    _assign_splits(rows, (0.15, 0.15), seed)
    images = _require(root / "train_images", "PANDA's train_images folder")
    return task_from_rows("panda", rows, train_csv, SlideRegistry.from_dir(images),
                          _tiles(tiles, "panda", images), tuple(str(g) for g in range(6)), ordinal=True)
