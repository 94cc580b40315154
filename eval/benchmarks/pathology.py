"""Adapters for the official on-disk layouts and splits of the paper's tile benchmarks.

Layouts, class orders and splits are those of kaiko-eva's dataset classes (read for the
facts; the code is ours); native µm/px from eva's dataset notes. Where a benchmark has no
validation split, eva validates on its test split, and so do we (MHIST, Chaoyang).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from dinov2_patho.jsonfile import read_json
from dinov2_patho.textfile import open_text

from .base import (
    BENCHMARKS,
    Benchmark,
    BenchmarkError,
    FileSplit,
    class_folders,
    list_images,
    require_dir,
    require_file,
)


def _ranges(ranges: list[tuple[int, int]]) -> list[int]:
    return [i for start, stop in ranges for i in range(start, stop)]


# eva's patient-disjoint split of the 400 BACH photos (sorted class folders, sorted files)
_BACH_TRAIN = _ranges([(0, 41), (59, 60), (90, 139), (169, 240), (258, 260), (273, 345), (368, 400)])
_BACH_VAL = _ranges([(41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368)])


@BENCHMARKS.register("bach")
def bach(root: Path) -> Benchmark:
    classes = ("Benign", "InSitu", "Invasive", "Normal")
    photos = require_dir(Path(root) / "ICIAR2018_BACH_Challenge" / "Photos", "BACH's photos folder")
    everything = class_folders(photos, classes, (".tif",))
    if len(everything) != 400:
        raise BenchmarkError(f"{photos}: expected the 400 official BACH photos (100 .tif per class folder), "
                             f"found {len(everything)}; eva's fixed split indexes that list")

    def subset(indices: list[int]) -> FileSplit:
        return FileSplit([everything.paths[i] for i in indices], everything.labels[indices])

    return Benchmark("bach", classes, 0.42, {"train": subset(_BACH_TRAIN), "val": subset(_BACH_VAL)})


@BENCHMARKS.register("crc")
def crc(root: Path) -> Benchmark:
    classes = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
    root = Path(root)
    splits = {split: class_folders(require_dir(root / folder, f"the {folder} folder"), classes, (".tif",))
              for split, folder in (("train", "NCT-CRC-HE-100K"), ("val", "CRC-VAL-HE-7K"))}
    return Benchmark("crc", classes, 0.5, splits)


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with open_text(require_file(path, path.name)) as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                                 f"header is {reader.fieldnames}")
        return list(reader)


def _labelled_files(rows: list[tuple[int, Path, str]], classes: tuple[str, ...], source: Path) -> FileSplit:
    """(CSV line number, image path, label name) rows as a split."""
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for n, path, label in rows:
        if label not in index:
            raise BenchmarkError(f"{source}: row {n}: unknown label {label!r}; "
                                 f"expected one of {list(classes)}")
        if not path.is_file():
            raise BenchmarkError(f"{source}: row {n}: image {path} not found")
        labels.append(index[label])
    return FileSplit([p for _, p, _ in rows], labels)


@BENCHMARKS.register("mhist")
def mhist(root: Path) -> Benchmark:
    classes = ("SSA", "HP")
    root = Path(root)
    annotations = root / "annotations.csv"
    rows = _read_csv(annotations, ("Image Name", "Majority Vote Label", "Partition"))
    images = require_dir(root / "images", "MHIST's images folder")
    splits = {}
    for split, partition in (("train", "train"), ("val", "test")):
        selected = [(n, images / r["Image Name"], r["Majority Vote Label"])
                    for n, r in enumerate(rows, start=2) if r["Partition"] == partition]
        splits[split] = _labelled_files(selected, classes, annotations)
    return Benchmark("mhist", classes, 2.0, splits)


@BENCHMARKS.register("bracs")
def bracs(root: Path) -> Benchmark:
    classes = ("0_N", "1_PB", "2_UDH", "3_FEA", "4_ADH", "5_DCIS", "6_IC")
    base = require_dir(Path(root) / "BRACS_RoI" / "latest_version", "BRACS's RoI folder")
    splits = {split: class_folders(require_dir(base / split, f"the {split} folder"), classes, (".png",))
              for split in ("train", "val", "test")}
    return Benchmark("bracs", classes, 0.25, splits)


# eva's validation patients (patient-disjoint split of the 40X images of 4 subtypes)
_BREAKHIS_VAL_PATIENTS = frozenset({"18842D", "19979", "15275", "15792", "16875", "3909", "5287", "16716",
                                    "2773", "5695", "16184CD", "23060CD", "21998CD", "21998EF"})


@BENCHMARKS.register("breakhis")
def breakhis(root: Path, magnifications: tuple[str, ...] = ("40X",)) -> Benchmark:
    classes = ("TA", "MC", "F", "DC")
    root = require_dir(Path(root), "the BreakHis root (BreaKHis_v1 tree)")
    files = sorted(p for p in list_images(root, (".png",), recursive=True) if p.parent.name in magnifications)
    if not files:
        raise BenchmarkError(f"{root}: no .png images in folders named {'/'.join(magnifications)} "
                             f"(expected .../<patient>/{magnifications[0]}/SOB_<B|M>_<type>-<...>.png)")
    split_rows: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "val": ([], [])}
    for path in files:
        parts = path.name.split("-")
        if len(parts) < 3:
            raise BenchmarkError(f"{path}: file name does not follow SOB_<B|M>_<type>-<year>-<patient>-...")
        subtype = parts[0].split("_")[-1]
        if subtype not in classes:  # eva keeps 4 of the 8 subtypes
            continue
        rows = split_rows["val" if parts[2] in _BREAKHIS_VAL_PATIENTS else "train"]
        rows[0].append(path)
        rows[1].append(classes.index(subtype))
    return Benchmark("breakhis", classes, 0.25, {k: FileSplit(*v) for k, v in split_rows.items()})


@BENCHMARKS.register("unitopatho")
def unitopatho(root: Path) -> Benchmark:
    classes = ("HP", "NORM", "TA.HG", "TA.LG", "TVA.HG", "TVA.LG")
    base = require_dir(Path(root) / "800", "UniToPatho's 800 folder")
    by_name = {p.name: p for p in list_images(base, (".png",), recursive=True)}
    splits = {}
    for split, manifest in (("train", "train.csv"), ("val", "test.csv")):
        path = base / manifest
        paths, labels = [], []
        for n, row in enumerate(_read_csv(path, ("image_id", "top_label")), start=2):
            if row["image_id"] not in by_name:
                raise BenchmarkError(f"{path}: row {n}: image {row['image_id']!r} not found under {base}")
            try:
                label = int(row["top_label"])
            except ValueError:
                label = -1
            if not 0 <= label < len(classes):
                raise BenchmarkError(f"{path}: row {n}: top_label {row['top_label']!r} "
                                     f"is not in 0..{len(classes) - 1}")
            paths.append(by_name[row["image_id"]])
            labels.append(label)
        splits[split] = FileSplit(paths, labels)
    return Benchmark("unitopatho", classes, 0.4415, splits)


_CHAOYANG_ENTRY = {"name": str, "label": int}


@BENCHMARKS.register("chaoyang")
def chaoyang(root: Path) -> Benchmark:
    """`train.json` / `test.json`: lists of {"name": "train/<file>", "label": 0..3}."""
    classes = ("normal", "serrated", "adenocarcinoma", "adenoma")
    root = Path(root)
    splits = {}
    for split, manifest in (("train", "train.json"), ("val", "test.json")):
        path = require_file(root / manifest, f"Chaoyang's {manifest}")
        entries = read_json(path, "Chaoyang split (a list of {\"name\", \"label\"} objects)",
                            "use the dataset's own file", shape=list[_CHAOYANG_ENTRY])
        rows = [(root / e["name"], e["label"]) for e in entries]
        for n, (image, label) in enumerate(rows):
            if not 0 <= label < len(classes):
                raise BenchmarkError(f"{path}: entry {n}: label {label} is not in 0..{len(classes) - 1}")
            if not image.is_file():
                raise BenchmarkError(f"{path}: entry {n}: image {image} not found")
        splits[split] = FileSplit([p for p, _ in rows], np.array([label for _, label in rows], np.int64))
    # 512 px patches scanned at 20x (nominal 0.5 µm/px)
    return Benchmark("chaoyang", classes, 0.5, splits)
