"""Any labelled tile set: a folder tree `<root>/<split>/<class>/<image>`, or a CSV
`path,label,split` (paths relative to the CSV's folder)."""

from __future__ import annotations

import csv
from pathlib import Path

from dinov2_patho.textfile import open_text

from .base import (
    BENCHMARKS,
    IMAGE_EXTENSIONS,
    Benchmark,
    BenchmarkError,
    FileSplit,
    class_folders,
    require_dir,
    require_file,
)

SPLITS = ("train", "val", "test")


@BENCHMARKS.register("folder")
def folder(root: Path, mpp: float | None = None, name: str = "folder") -> Benchmark:
    root = require_dir(Path(root), "a folder with train/ and val/ (and optional test/) subfolders")
    present = [s for s in SPLITS if (root / s).is_dir()]
    for split in ("train", "val"):
        require_dir(root / split, f"the {split} split folder (<root>/{split}/<class>/<image>)")
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if not classes:
        raise BenchmarkError(f"{root / 'train'}: no class folders")
    splits = {s: class_folders(root / s, classes, IMAGE_EXTENSIONS) for s in present}
    return Benchmark(name, classes, mpp, splits)


@BENCHMARKS.register("csv")
def csv_benchmark(root: Path, mpp: float | None = None, name: str = "csv") -> Benchmark:
    """`root` is the CSV file."""
    path = require_file(Path(root), "a CSV with columns path,label,split")
    with open_text(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("path", "label", "split") if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; "
                                 f"header is {reader.fieldnames}")
        rows = list(reader)
    classes = tuple(sorted({r["label"] for r in rows}))
    by_split: dict[str, tuple[list[Path], list[int]]] = {}
    for n, row in enumerate(rows, start=2):
        if row["split"] not in SPLITS:
            raise BenchmarkError(f"{path}: row {n}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
        image = path.parent / row["path"]
        if not image.is_file():
            raise BenchmarkError(f"{path}: row {n}: image {image} not found")
        paths, labels = by_split.setdefault(row["split"], ([], []))
        paths.append(image)
        labels.append(classes.index(row["label"]))
    return Benchmark(name, classes, mpp, {s: FileSplit(*v) for s, v in by_split.items()})
