"""TileIndex: the clustering CSV, ingested once, read as memory maps; views select rows without copying.

The files on disk are defined in format.py; row i is data row i of the CSV (after `--dedupe`,
of the kept rows, in order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from dinov2_patho.data.index.format import (
    REBUILD,
    SLIDE,
    SLIDE_OFFSETS,
    SLIDES,
    XY,
    Manifest,
    decode_xy,
    index_files,
    level_file,
    level_sizes_file,
    level_values_file,
)
from dinov2_patho.data.index.ingest import build
from dinov2_patho.data.index.source import read_text_table
from dinov2_patho.errors import UserError
from dinov2_patho.io import sha256_file
from dinov2_patho.jsonfile import JsonFileError, read_json
from dinov2_patho.readback import load_npy

_ROW_CHUNK = 1 << 22  # rows per step of a per-row pass that must not hold a full-length temporary

Positions = slice | np.ndarray  # view positions: a slice, or an int array

def build_index(
    csv: str | Path, out: str | Path, *, dedupe: bool = False, progress: bool = True
) -> TileIndex:
    """Ingest a `slide_id,tile_x,tile_y,level_1..level_k` CSV (or parquet) into an index at `out`."""
    build(Path(csv), Path(out), dedupe=dedupe, progress=progress)
    return TileIndex.open(out)


class _Store:
    """The memory-mapped arrays of one index directory, shared by all its views."""

    def __init__(self, path: Path):
        self.manifest = Manifest.read(path)
        self.num_rows: int = self.manifest.num_rows
        self.level_names = tuple(self.manifest.level_names)
        self.slide_names: list[str] = read_json(path / SLIDES, "slide list of the index", REBUILD,
                                                 shape=list[str])
        if len(self.slide_names) != self.manifest.num_slides:
            raise JsonFileError(f"{path / SLIDES}: {len(self.slide_names)} slide ids, the manifest says "
                                f"{self.manifest.num_slides}; {REBUILD}")
        n, ks = self.num_rows, range(1, len(self.level_names) + 1)

        def column(name: str, mmap: bool = False, **shape) -> np.ndarray:
            return load_npy(path / name, "index column", REBUILD, kinds="iu", mmap_mode="r" if mmap else None,
                            **shape)

        self.xy = column(XY, True, ndim=2, rows=n)
        self.levels = [column(level_file(k), True, ndim=1, rows=n) for k in ks]
        self.sizes = [column(level_sizes_file(k), rows=meta.num_clusters).astype(np.int64)
                      for k, meta in zip(ks, self.manifest.levels)]
        self.values = [
            column(level_values_file(k), rows=meta.num_clusters).astype(np.int64)
            if meta.values_stored
            else np.arange(meta.num_clusters, dtype=np.int64)
            for k, meta in zip(ks, self.manifest.levels)
        ]
        self.grouped: bool = self.manifest.grouped_by_slide
        if self.grouped:
            self.offsets = column(SLIDE_OFFSETS, ndim=1, rows=self.manifest.num_slides + 1)
        else:
            self.slide = column(SLIDE, True, ndim=1, rows=n)


class TileIndex:
    """A full on-disk index, or a view (a sorted subset of its global row ids)."""

    def __init__(self, path: Path, store: _Store, rows: np.ndarray | None = None):
        self.path = path
        self._store = store
        self._rows = rows  # None: every row
        self._sizes: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | Path) -> TileIndex:
        path = Path(path)
        return cls(path, _Store(path))

    # --- shape --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._store.num_rows if self._rows is None else int(self._rows.size)

    def __repr__(self) -> str:
        kind = "index" if self._rows is None else "view"
        return f"TileIndex({str(self.path)!r}, {kind}, rows={len(self)}, levels={self.num_levels})"

    @property
    def is_view(self) -> bool:
        return self._rows is not None

    @property
    def num_levels(self) -> int:
        return len(self._store.level_names)

    @property
    def level_names(self) -> tuple[str, ...]:
        return self._store.level_names

    @property
    def slide_names(self) -> list[str]:
        return self._store.slide_names

    @property
    def grouped_by_slide(self) -> bool:
        return self._store.grouped

    @property
    def manifest(self) -> dict:
        """The manifest as stored (see format.Manifest)."""
        return self._store.manifest.as_dict()

    # --- per-row data ---------------------------------------------------------------------------
    ALL = slice(None)
    """`positions` meaning every row of the view: the whole column, held in memory at once. It costs
    bytes per row x rows: row_ids 8 (2.8 GB at 350M rows; a view's own ids, no copy), slides 4 (1.4 GB),
    coords 8 for the two int32 axes returned (2.8 GB; decoding uint24 peaks near 28, 9.8 GB). Passes
    over every row go through `chunks()` instead; ALL is for small views and explicit full copies."""

    def row_ids(self, positions: Positions) -> np.ndarray:
        """Global row ids of these view positions (`ALL`: every one, see its cost)."""
        if self._rows is not None:
            return np.asarray(self._rows[positions], dtype=np.int64)
        n = self._store.num_rows
        if isinstance(positions, slice):  # the ids of a full index are its positions: no arange(n)
            return np.arange(*positions.indices(n), dtype=np.int64)
        pos = np.asarray(positions)
        if pos.dtype == bool:
            return np.flatnonzero(pos).astype(np.int64)
        pos = pos.astype(np.int64)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"view position out of range [-{n}, {n})")
        return np.where(pos < 0, pos + n, pos)

    def chunks(self, size: int | None = None) -> Iterator[slice]:
        """Consecutive slices of view positions of at most `size` rows (default the module's `_ROW_CHUNK`,
        read at each call), covering the view in order."""
        size = _ROW_CHUNK if size is None else size
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        for a in range(0, len(self), size):
            yield slice(a, min(a + size, len(self)))

    def _k(self, k: int) -> int:
        if not 1 <= k <= self.num_levels:
            raise ValueError(f"level {k} out of range: this index has levels 1..{self.num_levels}")
        return k - 1

    def level(self, k: int) -> np.ndarray:
        col = self._store.levels[self._k(k)]
        return col if self._rows is None else col[self._rows]

    def num_clusters(self, k: int) -> int:
        return int(self._store.values[self._k(k)].size)

    def cluster_sizes(self, k: int) -> np.ndarray:
        i = self._k(k)
        if self._rows is None:
            return self._store.sizes[i]
        if i not in self._sizes:
            self._sizes[i] = np.bincount(self.level(k), minlength=self.num_clusters(k)).astype(np.int64)
        return self._sizes[i]

    def cluster_values(self, k: int) -> np.ndarray:
        return self._store.values[self._k(k)]

    def _slides_of(self, rows: np.ndarray) -> np.ndarray:
        st = self._store
        if not st.grouped:
            return np.asarray(st.slide[rows], dtype=np.int32)
        return (np.searchsorted(st.offsets, rows, side="right") - 1).astype(np.int32)

    def slides(self, positions: Positions) -> np.ndarray:
        """int32 slide id (into `slide_names`) of these view positions (`ALL`: every one, see its cost)."""
        st = self._store
        if self._rows is None and isinstance(positions, slice) and positions.step in (None, 1):
            a, b, _ = positions.indices(st.num_rows)  # a run of rows: no per-row ids to look up
            if not st.grouped:
                return np.asarray(st.slide[a:b], dtype=np.int32)
            if a >= b:
                return np.empty(0, np.int32)
            first, last = np.searchsorted(st.offsets, [a, b - 1], side="right") - 1  # the run's slides
            per_slide = np.diff(np.clip(st.offsets[first:last + 2], a, b))
            return np.repeat(np.arange(first, last + 1, dtype=np.int32), per_slide)
        return self._slides_of(self.row_ids(positions))

    def slide_runs(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(first view position, rows) of every slide when each slide's rows are contiguous in this view
        (an index grouped by slide), else None: per-slide work without a per-row slide column."""
        st = self._store
        if not st.grouped:
            return None
        bounds = st.offsets if self._rows is None else np.searchsorted(self._rows, st.offsets)
        bounds = np.asarray(bounds, dtype=np.int64)
        return bounds[:-1], np.diff(bounds)

    def coords(self, positions: Positions) -> tuple[np.ndarray, np.ndarray]:
        """int32 level-0 x, y of these view positions (`ALL`: every one, see its cost)."""
        xy = self._store.xy
        if self._rows is None and isinstance(positions, slice):
            return decode_xy(xy[positions])  # a slice of the memory map: reads only those rows
        return decode_xy(xy[self.row_ids(positions)])

    def tiles(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(int32 slide id into `slide_names`, x, y) of global row ids, in one vectorised lookup
        (a batch of `tile()`, without its per-call cost)."""
        rows = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        bad = (rows < 0) | (rows >= self._store.num_rows)
        if bad.any():
            raise IndexError(f"row id {int(rows[bad][0])} out of range [0, {self._store.num_rows})")
        x, y = decode_xy(self._store.xy[rows])
        return self._slides_of(rows), x, y

    def tile(self, row_id: int) -> tuple[str, int, int]:
        slide, x, y = self.tiles(np.array([row_id]))
        return self._store.slide_names[int(slide[0])], int(x[0]), int(y[0])

    # --- views ------------------------------------------------------------------------------------
    def select(self, rows: np.ndarray) -> TileIndex:
        """A view of these global row ids (sorted, unique, all in this index or view)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"row ids must be 1-D, got shape {rows.shape}")
        if rows.size:
            if (np.diff(rows) <= 0).any():
                raise ValueError("row ids must be sorted and unique")
            if rows[0] < 0 or rows[-1] >= self._store.num_rows:
                raise ValueError(f"row ids must lie in [0, {self._store.num_rows})")
            if self._rows is not None:
                pos = np.minimum(np.searchsorted(self._rows, rows), self._rows.size - 1)
                if self._rows.size == 0 or (self._rows[pos] != rows).any():
                    raise ValueError("row ids must belong to this view")
        return TileIndex(self.path, self._store, rows)

    def _slide_index(self, slide_ids: Iterable[str]) -> np.ndarray:
        lookup = {name: i for i, name in enumerate(self._store.slide_names)}
        out = []
        for sid in slide_ids:
            if sid not in lookup:
                raise UserError(f"{self.path}: unknown slide_id {sid!r} (not in this index)")
            out.append(lookup[sid])
        return np.unique(np.asarray(out, dtype=np.int64))

    def _rows_of_slides(self, slides: np.ndarray) -> np.ndarray:
        st = self._store
        if st.grouped:
            starts, ends = st.offsets[slides], st.offsets[slides + 1]
            lengths = ends - starts
            # concatenated aranges, in slide order (ascending rows: slide ranges are in slide order)
            rows = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
        else:
            rows = np.flatnonzero(np.isin(st.slide, slides))
        rows = rows.astype(np.int64)
        return rows if self._rows is None else np.intersect1d(self._rows, rows, assume_unique=True)

    def select_slides(self, slide_ids: Iterable[str]) -> TileIndex:
        return TileIndex(self.path, self._store, self._rows_of_slides(self._slide_index(slide_ids)))

    def slide_metadata(self, csv: str | Path, column: str) -> tuple[np.ndarray, list[str]]:
        """Per-slide int32 code of `column` (-1: slide absent from the CSV or its value empty), and the
        category names (sorted values among this index's slides)."""
        table = read_text_table(Path(csv))
        for name in ("slide_id", column):
            if name not in table.column_names:
                raise UserError(f"{csv}: no column {name!r}; columns are {', '.join(table.column_names)}")
        value_of: dict[str, str] = {}
        for row, (sid, value) in enumerate(zip(table["slide_id"].to_pylist(), table[column].to_pylist()), 1):
            if value_of.setdefault(sid, value) != value:
                raise UserError(
                    f"{csv}: data row {row}: slide_id {sid!r} listed again with {column}={value!r} "
                    f"(first {value_of[sid]!r})"
                )
        per_slide = [value_of.get(name, "") for name in self._store.slide_names]
        names = sorted({v for v in per_slide if v})
        code = {v: i for i, v in enumerate(names)}
        return np.array([code.get(v, -1) for v in per_slide], dtype=np.int32), names

    def metadata_codes(self, csv: str | Path, column: str) -> tuple[np.ndarray, list[str]]:
        """Per-row code of the row's slide's value in `column` (-1: missing or empty); names by code.
        The narrowest signed dtype, filled in chunks: 350M rows of 266 values take 0.7 GB, not 2.8 GB."""
        per_slide, names = self.slide_metadata(csv, column)
        per_slide = per_slide.astype(np.min_scalar_type(-max(len(names), 1)))
        out = np.empty(len(self), dtype=per_slide.dtype)
        for chunk in self.chunks():
            out[chunk] = per_slide[self.slides(chunk)]
        return out, names

    def select_metadata(self, csv: str | Path, column: str, values: Iterable[str]) -> TileIndex:
        per_slide, names = self.slide_metadata(csv, column)
        values = list(values)
        unknown = [v for v in values if v not in names]
        if unknown:
            raise UserError(
                f"{csv}: no slide of {self.path} has {column}={unknown[0]!r}; "
                f"values are {', '.join(map(repr, names))}"
            )
        wanted = np.isin(per_slide, [names.index(v) for v in values])
        return TileIndex(self.path, self._store, self._rows_of_slides(np.flatnonzero(wanted)))

    # --- summary ----------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Rows, slides, clusters and cluster-size statistics per level, storage (for `index info`)."""
        files = index_files(self._store.manifest)
        disk = sum((self.path / f).stat().st_size for f in files) if self._rows is None else None
        levels = []
        for k, name in enumerate(self.level_names, 1):
            sizes = self.cluster_sizes(k)
            nonempty = sizes[sizes > 0] if sizes.any() else np.zeros(1, np.int64)
            meta = self._store.manifest.levels[k - 1]
            levels.append(
                {
                    "name": name,
                    "clusters": self.num_clusters(k),
                    "dtype": meta.dtype,
                    "nonempty": int((sizes > 0).sum()),
                    "size_min": int(nonempty.min()),
                    "size_median": float(np.median(nonempty)),
                    "size_mean": float(nonempty.mean()),
                    "size_max": int(nonempty.max()),
                    "nesting": meta.nesting,
                }
            )
        return {
            "path": str(self.path),
            "rows": len(self),
            "slides": len(self.slide_names),
            "grouped_by_slide": self.grouped_by_slide,
            "coords": self._store.manifest.coords,
            "duplicates_dropped": self._store.manifest.duplicates_dropped,
            "source": self._store.manifest.source,
            "bytes_on_disk": disk,
            "bytes_per_row": disk / max(len(self), 1) if disk else None,
            "levels": levels,
        }


def tile_list_fingerprint(index_dir: Path) -> str:
    """sha256 over the index's slide names, coordinates and slide offsets: a changed tile list is a
    different fingerprint, whatever its row count."""
    h = hashlib.sha256()
    for name in ("slides.json", "xy.npy", "slide_offsets.npy", "slide.npy"):
        if (index_dir / name).is_file():
            h.update(sha256_file(index_dir / name).encode())
    return h.hexdigest()
