"""Slide-level tasks: slide labels, where the slides are, and which tiles make each slide's bag.

A task is a labels CSV `slide_id,label[,split][,patient_id]` (one row per slide; `split` is
train / val / test; `patient_id` defaults to the slide), a slide registry (a folder searched
for `<slide_id>.<ext>`, or a `slide_id,path` CSV) and a tile source: a TileIndex of the
tissue tiles (`dinov2-patho index build`, or the TILES_DIR that `dinov2-patho curate tiles`
writes, whose `index/` is one). Or, with features extracted elsewhere, a labels CSV and a folder
of `<slide_id>.h5` feature files (trident / CLAM), which are the bags. Every check that would
leave a bag empty or a split unusable runs here, before any feature is computed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinov2_patho.data.feature_files import FeatureFile, open_feature_folder
from dinov2_patho.data.folders import tile_index_dir
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.errors import UserError
from dinov2_patho.slide_files import check_slide_id
from dinov2_patho.textfile import open_text

SPLITS = ("train", "val", "test")
COLUMNS = ("slide_id", "label", "split", "patient_id")


@dataclass(frozen=True)
class SlideTask:
    name: str
    classes: tuple[str, ...]  # label of class i; in grade order when `ordinal`
    slide_ids: tuple[str, ...]
    labels: np.ndarray  # [S] int64
    splits: np.ndarray | None  # [S] str (train / val / test), None: K folds by patient
    patients: np.ndarray  # [S] str
    registry: SlideRegistry | None  # None: bags read from `features`
    tiles: TileIndex | None
    ordinal: bool = False
    mpp: float | None = None  # overrides the slides' own µm/px
    features: dict[str, FeatureFile] | None = None  # slide -> its feature file, the bag (no backbone)

    def tile_rows(self, slide_id: str) -> np.ndarray:
        """Global row ids in `tiles` of the slide's tissue tiles (a one-slide view's own ids)."""
        return self.tiles.select_slides([slide_id]).row_ids(TileIndex.ALL)


def open_tiles(path: str | Path) -> TileIndex:
    """A TileIndex directory, or a `curate tiles` TILES_DIR holding one in `index/`."""
    return TileIndex.open(tile_index_dir(path))


def read_labels(path: str | Path) -> list[dict[str, str]]:
    """The rows of a labels CSV, with the columns checked; `line` added to each row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"slide labels {path}: file not found")
    with open_text(path) as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in COLUMNS[:2] if c not in header]
        if missing:
            raise UserError(f"{path}: header lacks column(s) {missing}; expected {','.join(COLUMNS)} "
                            "(split and patient_id optional)")
        rows = [{**row, "line": str(line)} for line, row in enumerate(reader, start=2)]
    if not rows:
        raise UserError(f"{path}: no slides")
    return rows


def _tile_counts(tiles: TileIndex) -> dict[str, int]:
    num_slides = len(tiles.slide_names)
    counts = sum((np.bincount(tiles.slides(chunk), minlength=num_slides) for chunk in tiles.chunks()),
                 np.zeros(num_slides, np.int64))
    return dict(zip(tiles.slide_names, counts.tolist()))


def task_from_rows(name: str, rows: list[dict[str, str]], source: Path, registry: SlideRegistry | None,
                   tiles: TileIndex | None, classes: tuple[str, ...] | None = None, ordinal: bool = False,
                   mpp: float | None = None, features: dict[str, FeatureFile] | None = None,
                   features_dir: Path | None = None) -> SlideTask:
    """Check every row (one-line error naming `source` and its line) and build the task.
    `classes`: the label order (required for ordinal labels); default: sorted labels. With
    `features` (the files of `features_dir`), bags come from them: no slide registry or tiles."""
    if features is not None:
        count_of, no_bag = {s: f.num_rows for s, f in features.items()}, f"no feature file in {features_dir}"
    else:
        count_of, no_bag = _tile_counts(tiles), f"no tissue tiles in {tiles.path}"
    has_split = any((r.get("split") or "").strip() for r in rows)
    seen: set[str] = set()
    for row in rows:
        where = f"{source}: line {row['line']}"
        sid, label = (row.get("slide_id") or "").strip(), (row.get("label") or "").strip()
        if not sid or not label:
            raise UserError(f"{where}: empty slide_id or label")
        check_slide_id(sid, where)
        if sid in seen:
            raise UserError(f"{where}: slide {sid!r} listed twice")
        seen.add(sid)
        if registry is not None and sid not in registry:
            raise UserError(f"{where}: unknown slide {sid!r} (not in the slides {registry.source})")
        if not count_of.get(sid):
            raise UserError(f"{where}: slide {sid!r} has {no_bag}")
        if classes is not None and label not in classes:
            raise UserError(f"{where}: label {label!r} is not one of {list(classes)}")
        split = (row.get("split") or "").strip()
        if has_split and split not in SPLITS:
            raise UserError(f"{where}: split {split!r} must be one of {'/'.join(SPLITS)} "
                            "(the split column, where present, is needed on every row)")
    labels_seen = sorted({r["label"].strip() for r in rows})
    classes = tuple(classes) if classes is not None else tuple(labels_seen)
    if len(labels_seen) < 2:
        raise UserError(f"{source}: a single class ({labels_seen[0]!r}); a slide task needs at least two")
    splits = np.array([r["split"].strip() for r in rows]) if has_split else None
    if splits is not None:
        for split in ("train", "val"):
            if split not in splits:
                raise UserError(f"{source}: no slide in the {split} split (train and val are required)")
        train_labels = {r["label"].strip() for r, s in zip(rows, splits) if s == "train"}
        if len(train_labels) < 2:
            raise UserError(f"{source}: the train split holds a single class ({sorted(train_labels)})")
    slide_ids = tuple(r["slide_id"].strip() for r in rows)
    patients = np.array([(r.get("patient_id") or "").strip() or sid for r, sid in zip(rows, slide_ids)])
    labels = np.array([classes.index(r["label"].strip()) for r in rows], np.int64)
    return SlideTask(name, classes, slide_ids, labels, splits, patients, registry, tiles, ordinal, mpp,
                     features)


def csv_task(labels_csv: str | Path, slides: str | Path, tiles: str | Path, name: str | None = None,
             classes: tuple[str, ...] | None = None, ordinal: bool = False,
             mpp: float | None = None) -> SlideTask:
    """The generic task: a labels CSV, a slide folder or CSV, a tile index or TILES_DIR."""
    labels_csv = Path(labels_csv)
    return task_from_rows(name or labels_csv.stem, read_labels(labels_csv), labels_csv,
                          SlideRegistry.from_spec(slides), open_tiles(tiles), classes, ordinal, mpp)


def features_task(labels_csv: str | Path, features: str | Path, name: str | None = None) -> SlideTask:
    """A labels CSV over a folder of `<slide_id>.h5` feature files (trident / CLAM), each slide's bag."""
    labels_csv, features = Path(labels_csv), Path(features)
    files = {f.slide_id: f for f in open_feature_folder(features)}
    return task_from_rows(name or labels_csv.stem, read_labels(labels_csv), labels_csv, None, None,
                          features=files, features_dir=features)
