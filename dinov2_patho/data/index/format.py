"""The tile index on disk, defined once: file names, manifest, dtypes and the coordinate codec,
for the writer (ingest.py), the reader (tile_index.py) and the checks.

An index is a directory; `manifest.json` is written last, so its presence marks a complete index:
- `xy.npy`: per-row coordinates, uint8 [N, 6] (x, y as little-endian 24-bit, when every coordinate is
  below 2^24 px, always so for a WSI) or int32 [N, 2];
- `level_k.npy`: per-row dense cluster id, narrowest unsigned dtype; `level_k.sizes.npy` rows per
  cluster; `level_k.values.npy` the original CSV values by dense id (absent when they are 0..K-1);
- `slide_offsets.npy` (int64 [S+1], when the CSV lists each slide's rows contiguously) or `slide.npy`
  (per-row slide index, otherwise); `slides.json` slide index -> slide_id.
Row i is data row i of the CSV (after `--dedupe`, of the kept rows, in order).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_patho.errors import UserError
from dinov2_patho.jsonfile import read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SLIDES = "slides.json"
XY = "xy.npy"
SLIDE = "slide.npy"
SLIDE_OFFSETS = "slide_offsets.npy"
UINT24, INT32 = "uint24", "int32"  # the two coordinate encodings
UINT24_LIMIT = 1 << 24
REBUILD = "rebuild the index (`dinov2-patho index build --out` onto it)"


def level_file(k: int) -> str:
    return f"level_{k}.npy"


def level_sizes_file(k: int) -> str:
    return f"level_{k}.sizes.npy"


def level_values_file(k: int) -> str:
    return f"level_{k}.values.npy"


@dataclass
class LevelMeta:
    name: str
    num_clusters: int
    dtype: str                  # numpy dtype string of level_k.npy
    values_stored: bool         # level_k.values.npy exists (values are not 0..K-1)
    nesting: str | None = None  # a warning when this level does not nest in the next


@dataclass
class Manifest:
    num_rows: int
    num_slides: int
    grouped_by_slide: bool      # slide_offsets.npy, not slide.npy
    coords: str                 # UINT24 or INT32
    slide_dtype: str | None     # of slide.npy; None when grouped
    levels: list[LevelMeta]
    level_names: list[str]
    source: str
    duplicates_dropped: int
    format_version: int = field(default=FORMAT_VERSION)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, directory: Path) -> None:
        """Written last by the builder: its presence marks a complete index."""
        (Path(directory) / MANIFEST).write_text(json.dumps(self.as_dict(), indent=1))

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise UserError(f"{directory}: not a tile index (no {MANIFEST}); build one with "
                            "`dinov2-patho index build`")
        return read_json(path, "tile index manifest", REBUILD, shape=cls, version=FORMAT_VERSION)


def index_files(manifest: Manifest) -> list[str]:
    """Every file of a complete index with this manifest."""
    files = [MANIFEST, SLIDES, XY, SLIDE_OFFSETS if manifest.grouped_by_slide else SLIDE]
    for k, meta in enumerate(manifest.levels, 1):
        files += [level_file(k), level_sizes_file(k), *([level_values_file(k)] if meta.values_stored else [])]
    return files


def narrow_unsigned(max_value: int) -> np.dtype:
    """The narrowest unsigned dtype holding 0..max_value."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(max_value)


def narrow_signed(lo: int, hi: int) -> np.dtype:
    """The narrowest signed dtype holding lo..hi."""
    for dt in (np.int8, np.int16, np.int32, np.int64):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError((lo, hi))


def coords_for(max_xy: int) -> str:
    """The coordinate encoding for coordinates in [0, max_xy]."""
    return UINT24 if max_xy < UINT24_LIMIT else INT32


def xy_layout(coords: str, num_rows: int) -> tuple[np.dtype, tuple[int, int]]:
    """dtype and shape of xy.npy."""
    return (np.dtype(np.uint8), (num_rows, 6)) if coords == UINT24 else (np.dtype(np.int32), (num_rows, 2))


def encode_xy(coords: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows of xy.npy for int32 coordinates x, y."""
    if coords == INT32:
        return np.stack([x, y], 1).astype(np.int32)
    out = np.empty((x.size, 6), np.uint8)
    out[:, 0:3] = x.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
    out[:, 3:6] = y.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
    return out


def decode_xy(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 x, y from rows of xy.npy (either encoding)."""
    if xy.dtype == np.int32:
        return np.array(xy[:, 0]), np.array(xy[:, 1])
    out = []
    for lo in (0, 3):
        b = xy[:, lo : lo + 3].astype(np.int32)
        out.append(b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16))
    return out[0], out[1]
