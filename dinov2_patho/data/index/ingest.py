"""Build a tile index directory from a clustering table, streaming, in bounded memory.

Pass 1 (the table, once): validate each block, give slides and cluster values provisional ids,
append raw int32/uint32 columns to scratch files, and hash (slide, x, y) into up to 256 on-disk
partitions. Pass 2 (scratch files): find duplicates partition by partition, then rewrite every
column in its final, narrowest form. Memory is bounded by the block size, the number of
clusters and slides, and one bit per row when duplicates are dropped; never by rows x columns.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinov2_patho.data.index.checks import TreeCheck, find_duplicates
from dinov2_patho.data.index.format import (
    MANIFEST,
    SLIDE,
    SLIDE_OFFSETS,
    SLIDES,
    XY,
    LevelMeta,
    Manifest,
    coords_for,
    encode_xy,
    level_file,
    level_sizes_file,
    level_values_file,
    narrow_signed,
    narrow_unsigned,
    xy_layout,
)
from dinov2_patho.data.index.scratch import Scratch
from dinov2_patho.data.index.source import Batch, is_parquet, iter_batches
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_dir
from dinov2_patho.jsonfile import JsonFileError
from dinov2_patho.logging import get_logger
from dinov2_patho.progress import progress_bar
from dinov2_patho.slide_files import check_distinct_case

log = get_logger(__name__)

_LUT_LIMIT = 1 << 24  # cluster values in [0, 2^24) map through a lookup table, others through a sorted table
_PASS2_ROWS = 1 << 20


class _ValueMap:
    """Arbitrary int64 cluster values -> provisional uint32 ids, numbered as first seen.

    Every id numbered here is used by some row; per-cluster counts are taken in pass 2, where a
    chunk holds ~1M rows, not per block (a bincount is O(clusters), 3.5M at level 1)."""

    def __init__(self) -> None:
        self.lut: np.ndarray | None = np.full(0, -1, np.int32)  # value -> id while values are small
        self.keys = np.zeros(0, np.int64)  # sorted values (after leaving the lookup table)
        self.key_ids = np.zeros(0, np.int64)
        self.values: list[np.ndarray] = []
        self.size = 0

    def ids(self, v: np.ndarray) -> np.ndarray:
        if self.lut is not None and (v.size == 0 or (v.min() >= 0 and v.max() < _LUT_LIMIT)):
            if v.size and v.max() >= self.lut.size:
                grow = max(int(v.max()) + 1, 2 * self.lut.size)
                self.lut = np.concatenate([self.lut, np.full(grow - self.lut.size, -1, np.int32)])
            ids = self.lut[v]
            new = v[ids < 0]
            if new.size:  # distinct new values without sorting: each keeps the position written last
                pos = np.arange(new.size, dtype=np.int32)
                self.lut[new] = pos
                new = new[self.lut[new] == pos]
                self.lut[new] = self._add(new)
                ids = self.lut[v]
        else:
            if self.lut is not None:  # leave the lookup table for a sorted table, once
                known = np.flatnonzero(self.lut >= 0)
                self.keys, self.key_ids, self.lut = known.astype(np.int64), self.lut[known], None
            u, inv = np.unique(v, return_inverse=True)
            pos = np.searchsorted(self.keys, u)
            found = pos < self.keys.size
            found[found] = self.keys[pos[found]] == u[found]
            if not found.all():
                new = u[~found]
                self.keys = np.insert(self.keys, pos[~found], new)
                self.key_ids = np.insert(self.key_ids, pos[~found], self._add(new))
            ids = self.key_ids[np.searchsorted(self.keys, u)][inv]
        return ids.astype(np.uint32)

    def _add(self, new: np.ndarray) -> np.ndarray:
        ids = np.arange(self.size, self.size + new.size, dtype=np.int64)
        self.values.append(new.astype(np.int64))
        self.size += new.size
        return ids

    def all_values(self) -> np.ndarray:
        return np.concatenate(self.values) if self.values else np.zeros(0, np.int64)


class _NpyWriter:
    """Writes a .npy file of known shape block by block."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.f = open(path, "wb")  # noqa: SIM115 (closed in close())
        np.lib.format.write_array_header_2_0(
            self.f,
            {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape},
        )
        self.dtype = np.dtype(dtype)

    def write(self, arr: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(arr, self.dtype).tobytes())

    def close(self) -> None:
        self.f.close()


def build(src: Path, out: Path, *, dedupe: bool = False, progress: bool = True) -> None:
    """Build the index for `src` at `out`, atomically (a temp dir beside `out`, then renames)."""
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _check_replaceable(out)
    with atomic_dir(out) as tmp:
        _build_into(src, tmp, dedupe=dedupe, progress=progress)


def _check_replaceable(out: Path) -> None:
    """A UserError unless `out` is a tile index, whose whole directory a rebuild replaces: its manifest
    reads as an index's, or, damaged or of another format, sits beside the index's own coordinates. A
    `curate embed` output, a k-means tree or an eval cache also has a manifest.json, and is kept."""
    try:
        Manifest.read(out)
        return
    except JsonFileError:
        if (out / XY).is_file():
            return
        why = f"its {MANIFEST} is another command's"
    except UserError:
        why = f"no {MANIFEST}"
    raise UserError(f"{out}: exists and is not a tile index; refusing to replace it ({why}): give a new "
                    "--out or remove it")


def _build_into(src: Path, tmp: Path, *, dedupe: bool, progress: bool) -> None:
    work = tmp / "_work"
    work.mkdir()
    # the file and its header are checked first: a bad path is its one-line error, with no bar drawn
    level_names, batches = iter_batches(src, on_bytes=lambda n: bar.update(n))
    bar = progress_bar(total=src.stat().st_size, unit="B", unit_scale=True, desc=f"index {src.name}",
               disable=not progress)
    scratch = Scratch(work, len(level_names), src.stat().st_size)
    slide_ids: dict[str, int] = {}
    maps = [_ValueMap() for _ in level_names]
    num_rows, max_xy = 0, 0
    try:
        for b in batches:
            slide = _slide_ids(b, slide_ids)
            cols = {"x": b.x.astype(np.int32), "y": b.y.astype(np.int32), "slide": slide}
            for k, (m, v) in enumerate(zip(maps, b.levels), 1):
                cols[f"level{k}"] = m.ids(v)
            scratch.append(cols)
            num_rows += b.x.size
            max_xy = max(max_xy, int(b.x.max()), int(b.y.max()))
    finally:
        scratch.close()
        bar.close()
    check_distinct_case(slide_ids, str(src))
    csv_lines = not is_parquet(src)
    dropped, num_dropped = find_duplicates(
        src, scratch, num_rows, list(slide_ids), dedupe=dedupe, csv_lines=csv_lines
    )
    # pass 2, in steps: number the clusters, write the columns, then what the counts give
    chunks = _KeptChunks(num_rows, dropped, num_dropped)
    remaps, levels = _dense_levels(tmp, scratch, maps, level_names, chunks)
    coords = coords_for(max_xy)
    written = _write_columns(tmp, scratch, remaps, levels, coords, len(slide_ids), chunks, progress)
    _write_sizes(tmp, written.sizes)
    _write_slide_ranges(tmp, written)
    for meta, warning in zip(levels, written.tree.report(level_names)):
        meta.nesting = warning
    manifest = Manifest(
        num_rows=chunks.kept,
        num_slides=len(slide_ids),
        grouped_by_slide=written.grouped,
        coords=coords,
        slide_dtype=None if written.grouped else narrow_unsigned(max(len(slide_ids) - 1, 0)).str,
        levels=levels,
        level_names=list(level_names),
        source=str(src.resolve()),
        duplicates_dropped=num_dropped,
    )
    shutil.rmtree(work)
    (tmp / SLIDES).write_text(json.dumps(list(slide_ids)))
    manifest.write(tmp)  # last: its presence marks a complete index
    if num_dropped:
        log.info("%s: dropped %d duplicate (slide_id, tile_x, tile_y) rows", src, num_dropped)


def _slide_ids(b: Batch, table: dict[str, int]) -> np.ndarray:
    lut = np.empty(len(b.slide_keys), np.uint32)
    for i, key in enumerate(b.slide_keys):
        lut[i] = table.setdefault(key, len(table))
    return lut[b.slide_codes]


class _KeptChunks:
    """Chunks of rows for pass 2: (kept mask or None, n) each, aligned to bytes of the dropped bitmap."""

    def __init__(self, num_rows: int, dropped: np.ndarray | None, num_dropped: int):
        self.num_rows, self.dropped, self.kept = num_rows, dropped, num_rows - num_dropped

    def __iter__(self) -> Iterator[tuple[np.ndarray | None, int]]:
        for start in range(0, self.num_rows, _PASS2_ROWS):
            n = min(_PASS2_ROWS, self.num_rows - start)
            if self.dropped is None:
                yield None, n
            else:
                bits = np.unpackbits(self.dropped[start // 8 : (start + n + 7) // 8], bitorder="little")[:n]
                yield bits == 0, n


def _dense_levels(tmp: Path, scratch: Scratch, maps: list[_ValueMap], level_names,
                  chunks: _KeptChunks) -> tuple[list[np.ndarray], list[LevelMeta]]:
    """Per level: provisional id -> dense id of the clusters that kept rows, numbered in value order,
    and its metadata; the original values are stored when they are not 0..K-1."""
    remaps, metas = [], []
    for k, (name, m) in enumerate(zip(level_names, maps), 1):
        present = np.arange(m.size)
        if chunks.dropped is not None:  # a cluster may have lost all its rows with the duplicates
            counts = np.zeros(m.size, np.int64)
            with scratch.reader(f"level{k}") as r:
                for keep, n in chunks:
                    counts += np.bincount(r.read(n)[keep], minlength=m.size)
            present = np.flatnonzero(counts)
        values = m.all_values()[present]
        order = np.argsort(values, kind="stable")
        values = values[order]
        dtype = narrow_unsigned(max(present.size - 1, 0))
        remap = np.zeros(m.size, dtype)
        remap[present[order]] = np.arange(present.size, dtype=dtype)
        stored = not np.array_equal(values, np.arange(values.size))  # 0..K-1, the usual case: not stored
        if stored:
            np.save(tmp / level_values_file(k), values.astype(narrow_signed(int(values[0]), int(values[-1]))))
        remaps.append(remap)
        metas.append(LevelMeta(name=name, num_clusters=int(present.size), dtype=dtype.str,
                               values_stored=stored))
    return remaps, metas


class _SlideOrder:
    """Do the rows list each slide's tiles contiguously, slides in id order (ids are first-seen order)?"""

    def __init__(self) -> None:
        self.grouped, self.last = True, -1

    def update(self, s: np.ndarray) -> None:
        if self.grouped and s.size:
            runs = s[np.r_[True, s[1:] != s[:-1]]].astype(np.int64)
            runs = runs[1:] if runs[0] == self.last else runs
            self.grouped = bool(np.array_equal(runs, np.arange(self.last + 1, self.last + 1 + runs.size)))
            self.last = int(s[-1])


@dataclass
class _Written:
    sizes: list[np.ndarray]  # rows per dense cluster, per level
    slide_rows: np.ndarray   # rows per slide
    grouped: bool
    tree: TreeCheck


class _NpyWriters:
    """The per-row column files of pass 2, written chunk by chunk."""

    def __init__(self, tmp: Path, coords: str, num_rows: int, num_slides: int, levels: list[LevelMeta]):
        xy_dtype, xy_shape = xy_layout(coords, num_rows)
        self.xy = _NpyWriter(tmp / XY, xy_dtype, xy_shape)
        self.slide = _NpyWriter(tmp / SLIDE, narrow_unsigned(max(num_slides - 1, 0)), (num_rows,))
        self.levels = [_NpyWriter(tmp / level_file(k), meta.dtype, (num_rows,))
                       for k, meta in enumerate(levels, 1)]

    def close(self) -> None:
        for w in [self.xy, self.slide, *self.levels]:
            w.close()


def _write_columns(tmp: Path, scratch: Scratch, remaps: list[np.ndarray], levels: list[LevelMeta],
                   coords: str, num_slides: int, chunks: _KeptChunks, progress: bool) -> _Written:
    """Stream the kept rows into xy, slide and level columns in final form; count rows per cluster
    and per slide, check the levels nest, and see whether slides come grouped."""
    out = _NpyWriters(tmp, coords, chunks.kept, num_slides, levels)
    readers = [scratch.reader(name) for name in scratch.names]  # x, y, slide, level1..levelK
    sizes = [np.zeros(meta.num_clusters, np.int64) for meta in levels]
    slide_rows = np.zeros(num_slides, np.int64)
    tree, order = TreeCheck([meta.num_clusters for meta in levels]), _SlideOrder()
    try:
        with progress_bar(total=chunks.num_rows, unit="row", unit_scale=True, desc="index write",
                  disable=not progress) as bar:
            for keep, n in chunks:
                x, y, s, *raw = (r.read(n) for r in readers)
                if keep is not None:
                    x, y, s, raw = x[keep], y[keep], s[keep], [lv[keep] for lv in raw]
                out.xy.write(encode_xy(coords, x, y))
                out.slide.write(s)
                dense = [remap[lv] for remap, lv in zip(remaps, raw)]
                for w, d, size in zip(out.levels, dense, sizes):
                    w.write(d)
                    size += np.bincount(d, minlength=size.size)
                tree.update(dense)
                slide_rows += np.bincount(s, minlength=num_slides)
                order.update(s)
                bar.update(n)
    finally:
        for r in readers:
            r.close()
        out.close()
    return _Written(sizes, slide_rows, order.grouped, tree)


def _write_sizes(tmp: Path, sizes: list[np.ndarray]) -> None:
    for k, size in enumerate(sizes, 1):
        np.save(tmp / level_sizes_file(k), size.astype(narrow_unsigned(int(size.max(initial=0)))))


def _write_slide_ranges(tmp: Path, written: _Written) -> None:
    """Grouped rows: slide i is rows offsets[i]:offsets[i+1], and the per-row column is redundant."""
    if written.grouped:
        (tmp / SLIDE).unlink()
        np.save(tmp / SLIDE_OFFSETS, np.r_[0, np.cumsum(written.slide_rows)].astype(np.int64))
