"""Tile features in trident's / CLAM's layout: a folder of `<slide_id>.h5`, one per slide, each with

    features   float [N, D]: one row per tile
    coords     int [N, 2]: level-0 (x, y) of each tile's top-left corner; its attributes may say the
               tile's footprint (`patch_size_level0`, trident), magnification and patch size

as trident writes them (`features_<encoder>/`) and Patho-Bench reads them (CLAM's `h5_files/` too).
Opening a folder checks every file's shapes (metadata only); rows are read in blocks, each checked
for finite values, so a folder of 350M x 1,024 features is never held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path
from dinov2_patho.slide_files import check_distinct_case, check_slide_id

SUFFIXES = (".h5", ".hdf5")
FEATURES, COORDS = "features", "coords"
BLOCK_ROWS = 1 << 14  # 64 MB of float32 at D = 1,024
# attributes of `coords` carried into an export and back (trident's names)
COORD_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification")


def feature_file_name(slide_id: str, where: str) -> str:
    """`<slide_id>.h5`, by the project's one rule for a file named after a slide (slide_files): an id
    that is not one plain file name is refused, naming `where`."""
    return f"{check_slide_id(slide_id, where)}{SUFFIXES[0]}"


@dataclass(frozen=True)
class FeatureFile:
    """One slide's file, its shapes checked."""

    slide_id: str
    path: Path
    num_rows: int
    dim: int
    attrs: dict[str, Any] = field(default_factory=dict)  # of COORD_ATTRS, those the file has

    def feature_blocks(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 features [n, D]) a block at a time; a non-finite value is an error naming
        the file and the row."""
        with _open(self.path) as f:
            features = f[FEATURES]
            for a in range(0, self.num_rows, rows):
                x = np.asarray(features[a:a + rows], np.float32)
                bad = ~np.isfinite(x).all(1)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise UserError(f"{self.path}: {FEATURES} row {a + i} is not finite "
                                    f"({x[i][~np.isfinite(x[i])][0]})")
                yield a, x

    def coord_blocks(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, int64 coords [n, 2]) a block at a time; a non-integer position is an error naming
        the file and the row."""
        with _open(self.path) as f:
            coords = f[COORDS]
            for a in range(0, self.num_rows, rows):
                yield a, _integer_coords(np.asarray(coords[a:a + rows]), self.path, a)

    def bag(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 [n, D] of `rows` (sorted; default all), checked as `feature_blocks` checks them."""
        if rows is None:
            return np.concatenate([x for _, x in self.feature_blocks()])
        out, taken = np.empty((len(rows), self.dim), np.float32), 0
        for a, x in self.feature_blocks():
            mine = rows[(rows >= a) & (rows < a + len(x))]
            out[taken:taken + len(mine)] = x[mine - a]
            taken += len(mine)
        return out


def _open(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:  # h5py's one error type for missing, truncated and non-HDF5 files
        raise UserError(f"{path}: cannot be read as HDF5 ({' '.join(str(e).split())})") from e


def _integer_coords(c: np.ndarray, path: Path, first_row: int) -> np.ndarray:
    if np.issubdtype(c.dtype, np.integer):
        return c.astype(np.int64)
    if np.issubdtype(c.dtype, np.floating):
        bad = ~(np.isfinite(c) & (c == np.round(c))).all(1)
        if not bad.any():
            return c.astype(np.int64)
        raise UserError(f"{path}: {COORDS} row {first_row + int(np.argmax(bad))} is not a pair of integer "
                        f"pixel positions ({c[int(np.argmax(bad))].tolist()})")
    raise UserError(f"{path}: {COORDS} has dtype {c.dtype}; expected integer level-0 pixel positions")


def open_feature_file(path: Path) -> FeatureFile:
    """The file's shapes and coords attributes, checked; no row is read."""
    with _open(path) as f:
        for name in (FEATURES, COORDS):
            if name not in f:
                raise UserError(f"{path}: no '{name}' dataset (has {sorted(f.keys())}); expected trident's "
                                f"'{FEATURES}' [N, D] and '{COORDS}' [N, 2]")
        features, coords = f[FEATURES], f[COORDS]
        if features.ndim != 2:
            raise UserError(f"{path}: {FEATURES} has shape {features.shape}; expected rank 2 [tiles, dim]")
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise UserError(f"{path}: {COORDS} has shape {coords.shape}; expected [tiles, 2] (x, y)")
        if features.shape[0] != coords.shape[0]:
            raise UserError(f"{path}: {FEATURES} has {features.shape[0]} rows but {COORDS} has "
                            f"{coords.shape[0]}; they must be one row per tile")
        if features.shape[0] == 0 or features.shape[1] == 0:
            raise UserError(f"{path}: empty: {FEATURES} has shape {features.shape}")
        if not np.issubdtype(features.dtype, np.floating):
            raise UserError(f"{path}: {FEATURES} has dtype {features.dtype}; expected floats")
        attrs = {k: _plain(coords.attrs[k]) for k in COORD_ATTRS if k in coords.attrs}
        return FeatureFile(path.stem, path, int(features.shape[0]), int(features.shape[1]), attrs)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def open_feature_folder(folder: str | Path) -> list[FeatureFile]:
    """Every `<slide_id>.h5` of `folder` (not its subfolders), sorted by slide id, checked: one line for an
    empty folder, a duplicate slide id, a bad file, or dimensions that differ between files."""
    from dinov2_patho.progress import progress_bar

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"features {folder}: not a folder (want one <slide_id>.h5 per slide)")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    if not paths:
        nested = sorted({p.parent.name for p in folder.glob(f"*/*{SUFFIXES[0]}")})
        hint = f"; subfolders {nested} hold some: pass one of them" if nested else ""
        raise UserError(f"features {folder}: no {'/'.join(SUFFIXES)} file{hint}")
    check_distinct_case((p.stem for p in paths), f"features {folder}")
    files: list[FeatureFile] = []
    seen: dict[str, Path] = {}
    for path in progress_bar(paths, desc="feature files", unit="file", disable=len(paths) < 1000):
        if path.stem in seen:
            raise UserError(f"{path}: slide id {path.stem!r} also has {seen[path.stem].name}: a duplicate "
                            "slide id")
        seen[path.stem] = path
        feature_file_name(path.stem, str(path))
        file = open_feature_file(path)
        if files and file.dim != files[0].dim:
            raise UserError(f"{path}: features of dimension {file.dim}, but {files[0].path.name} has "
                            f"{files[0].dim}: every slide must come from the same encoder")
        files.append(file)
    return sorted(files, key=lambda f: f.slide_id)


def write_feature_file(path: Path, features: np.ndarray, coords: np.ndarray, attrs: dict[str, Any]) -> None:
    """One slide's trident-style file, written whole or not at all."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(FEATURES, data=np.asarray(features, np.float32))
        c = f.create_dataset(COORDS, data=np.asarray(coords, np.int64))
        for key, value in attrs.items():
            c.attrs[key] = value
