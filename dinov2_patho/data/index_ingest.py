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
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dinov2_patho.data.index_checks import HASH_RECORD, TreeCheck, find_duplicates, tile_hash
from dinov2_patho.data.index_source import Batch, is_parquet, iter_batches
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_dir
from dinov2_patho.logging import get_logger

log = get_logger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SLIDES = "slides.json"
UINT24_LIMIT = 1 << 24
_MAX_PARTITIONS = 256  # 350M rows (25 GB of CSV) -> ~1.4M (hash, row) records per partition
_PARTITION_BYTES = 64 << 20  # of input per partition
_LUT_LIMIT = 1 << 24  # cluster values in [0, 2^24) map through a lookup table, others through a sorted table
_FLUSH_ROWS = 1 << 20
_PASS2_ROWS = 1 << 20


def narrow_unsigned(max_value: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(max_value)


def narrow_signed(lo: int, hi: int) -> np.dtype:
    for dt in (np.int8, np.int16, np.int32, np.int64):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError((lo, hi))


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


class _Scratch:
    """Pass-1 output: raw columns appended to files, and (hash, row) records in hash partitions.

    Blocks are buffered to ~1M rows before writing: the partition writes of a flush stay large."""

    def __init__(self, work: Path, num_levels: int, input_bytes: int):
        self.work = work
        # a power of two, from the input size: small inputs need few files, large ones small partitions
        self.num_parts = min(_MAX_PARTITIONS, 1 << max(0, (input_bytes // _PARTITION_BYTES).bit_length()))
        self.names = ["x", "y", "slide", *[f"level{k}" for k in range(1, num_levels + 1)]]
        self.files = {n: open(work / f"{n}.raw", "wb") for n in self.names}  # noqa: SIM115 (closed in close())
        self.parts = [open(work / f"part{p:03d}.raw", "wb") for p in range(self.num_parts)]  # noqa: SIM115
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffered = 0
        self.flushed = 0  # rows written

    def append(self, columns: dict[str, np.ndarray]) -> None:
        self.buffer.append(columns)
        self.buffered += columns["x"].size
        if self.buffered >= _FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        cols = {n: np.concatenate([b[n] for b in self.buffer]) for n in self.names}
        self.buffer, self.buffered = [], 0
        for name, arr in cols.items():
            self.files[name].write(arr.tobytes())
        h = tile_hash(cols["slide"], cols["x"], cols["y"])
        part = (h >> np.uint64(56)).astype(np.uint8) & np.uint8(self.num_parts - 1)
        order = np.argsort(part, kind="stable")
        rec = np.empty(h.size, HASH_RECORD)
        rec["h"] = h[order]
        rec["row"] = order + self.flushed
        bounds = np.searchsorted(part[order], np.arange(self.num_parts + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            self.parts[p].write(rec[bounds[p] : bounds[p + 1]].tobytes())
        self.flushed += h.size

    def close(self) -> None:
        self.flush()
        for f in [*self.files.values(), *self.parts]:
            f.close()

    def reader(self, name: str, dtype: np.dtype):
        return _ChunkReader(self.work / f"{name}.raw", dtype)


class _ChunkReader:
    """Sequential chunks of a raw file with plain reads (a memmap would count its pages in RSS)."""

    def __init__(self, path: Path, dtype):
        self.f = open(path, "rb")  # noqa: SIM115 (closed by the pass that owns it)
        self.dtype = np.dtype(dtype)

    def __enter__(self) -> _ChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def read(self, n: int) -> np.ndarray:
        return np.fromfile(self.f, self.dtype, n)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        mm = np.memmap(self.f.name, self.dtype, "r")
        return np.asarray(mm[rows])


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


def encode_uint24(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.empty((x.size, 6), np.uint8)
    out[:, 0:3] = x.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
    out[:, 3:6] = y.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3]
    return out


def build(src: Path, out: Path, *, dedupe: bool = False, progress: bool = True) -> None:
    """Build the index for `src` at `out`, atomically (a temp dir beside `out`, then renames)."""
    src, out = Path(src), Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not a tile index; refusing to replace it")
    with atomic_dir(out) as tmp:
        _build_into(src, tmp, dedupe=dedupe, progress=progress)


def _build_into(src: Path, tmp: Path, *, dedupe: bool, progress: bool) -> None:
    work = tmp / "_work"
    work.mkdir()
    bar = tqdm(
        total=src.stat().st_size if src.exists() else None,
        unit="B",
        unit_scale=True,
        desc=f"index {src.name}",
        disable=not progress,
    )
    level_names, batches = iter_batches(src, on_bytes=bar.update)
    scratch = _Scratch(work, len(level_names), src.stat().st_size)
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
    csv_lines = not is_parquet(src)
    dropped, num_dropped = find_duplicates(
        src, scratch, num_rows, list(slide_ids), dedupe=dedupe, csv_lines=csv_lines
    )
    manifest = _pass2(
        tmp, scratch, maps, level_names, len(slide_ids), num_rows, max_xy, dropped, num_dropped, progress
    )
    manifest.update(
        format_version=FORMAT_VERSION,
        source=str(src.resolve()),
        level_names=list(level_names),
        duplicates_dropped=int(num_rows - manifest["num_rows"]),
    )
    shutil.rmtree(work)
    (tmp / SLIDES).write_text(json.dumps(list(slide_ids)))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: its presence marks a complete index
    if manifest["duplicates_dropped"]:
        log.info(
            "%s: dropped %d duplicate (slide_id, tile_x, tile_y) rows", src, manifest["duplicates_dropped"]
        )


def _slide_ids(b: Batch, table: dict[str, int]) -> np.ndarray:
    lut = np.empty(len(b.slide_keys), np.uint32)
    for i, key in enumerate(b.slide_keys):
        lut[i] = table.setdefault(key, len(table))
    return lut[b.slide_codes]


def _pass2(
    tmp: Path,
    scratch: _Scratch,
    maps: list[_ValueMap],
    level_names,
    num_slides: int,
    num_rows: int,
    max_xy: int,
    dropped: np.ndarray | None,
    num_dropped: int,
    progress: bool,
) -> dict:
    """Rewrite the scratch columns, minus dropped rows, in final form; return the manifest fields."""

    def chunks():
        """(kept mask or None, n) per chunk of rows, aligned to bytes of the bitmap."""
        for start in range(0, num_rows, _PASS2_ROWS):
            n = min(_PASS2_ROWS, num_rows - start)
            if dropped is None:
                yield None, n
            else:
                bits = np.unpackbits(dropped[start // 8 : (start + n + 7) // 8], bitorder="little")[:n]
                yield bits == 0, n

    kept = num_rows - num_dropped
    levels_meta, remaps, sizes = [], [], []
    for k, (name, m) in enumerate(zip(level_names, maps), 1):
        present = np.arange(m.size)
        if dropped is not None:  # a cluster may have lost all its rows with the duplicates
            counts = np.zeros(m.size, np.int64)
            with scratch.reader(f"level{k}", np.uint32) as r:
                for keep, n in chunks():
                    counts += np.bincount(r.read(n)[keep], minlength=m.size)
            present = np.flatnonzero(counts)
        values = m.all_values()[present]
        order = np.argsort(values, kind="stable")
        values = values[order]
        dtype = narrow_unsigned(max(present.size - 1, 0))
        remap = np.zeros(m.size, dtype)  # provisional id -> dense id, dense ids in value order
        remap[present[order]] = np.arange(present.size, dtype=dtype)
        if not np.array_equal(values, np.arange(values.size)):  # values 0..K-1 (the usual case): not stored
            np.save(
                tmp / f"level_{k}.values.npy", values.astype(narrow_signed(int(values[0]), int(values[-1])))
            )
        remaps.append(remap)
        sizes.append(np.zeros(present.size, np.int64))
        levels_meta.append(
            {
                "name": name,
                "num_clusters": int(present.size),
                "dtype": dtype.str,
                "values_stored": (tmp / f"level_{k}.values.npy").exists(),
            }
        )
    coords = "uint24" if max_xy < UINT24_LIMIT else "int32"
    xy_shape = (kept, 6) if coords == "uint24" else (kept, 2)
    xy_out = _NpyWriter(tmp / "xy.npy", np.uint8 if coords == "uint24" else np.int32, xy_shape)
    slide_dtype = narrow_unsigned(max(num_slides - 1, 0))
    slide_out = _NpyWriter(tmp / "slide.npy", slide_dtype, (kept,))
    level_out = [
        _NpyWriter(tmp / f"level_{k}.npy", lm["dtype"], (kept,)) for k, lm in enumerate(levels_meta, 1)
    ]
    readers = [
        scratch.reader("x", np.int32),
        scratch.reader("y", np.int32),
        scratch.reader("slide", np.uint32),
        *[scratch.reader(f"level{k}", np.uint32) for k in range(1, len(maps) + 1)],
    ]
    tree = TreeCheck([lm["num_clusters"] for lm in levels_meta])
    slide_rows = np.zeros(num_slides, np.int64)
    grouped, last_slide = True, -1
    with tqdm(total=num_rows, unit="row", unit_scale=True, desc="index write", disable=not progress) as bar:
        for keep, n in chunks():
            x, y, s, *levels = (r.read(n) for r in readers)
            if keep is not None:
                x, y, s, levels = x[keep], y[keep], s[keep], [lv[keep] for lv in levels]
            xy_out.write(encode_uint24(x, y) if coords == "uint24" else np.stack([x, y], 1))
            slide_out.write(s)
            dense = [remap[lv] for remap, lv in zip(remaps, levels)]
            for w, d, size in zip(level_out, dense, sizes):
                w.write(d)
                size += np.bincount(d, minlength=size.size)
            tree.update(dense)
            slide_rows += np.bincount(s, minlength=num_slides)
            if grouped and s.size:  # grouped: slide runs appear in slide-id order (ids are first-seen order)
                runs = s[np.r_[True, s[1:] != s[:-1]]].astype(np.int64)
                runs = runs[1:] if runs[0] == last_slide else runs
                grouped = bool(np.array_equal(runs, np.arange(last_slide + 1, last_slide + 1 + runs.size)))
                last_slide = int(s[-1])
            bar.update(n)
    for r in readers:
        r.f.close()
    for w in [xy_out, slide_out, *level_out]:
        w.close()
    for k, size in enumerate(sizes, 1):
        np.save(tmp / f"level_{k}.sizes.npy", size.astype(narrow_unsigned(int(size.max()))))
    if grouped:  # rows of slide i are offsets[i]:offsets[i+1]; the per-row column is redundant
        (tmp / "slide.npy").unlink()
        np.save(tmp / "slide_offsets.npy", np.r_[0, np.cumsum(slide_rows)].astype(np.int64))
    for lm, warning in zip(levels_meta, tree.report(level_names)):
        lm["nesting"] = warning
    return {
        "num_rows": kept,
        "num_slides": num_slides,
        "grouped_by_slide": grouped,
        "coords": coords,
        "slide_dtype": None if grouped else slide_dtype.str,
        "levels": levels_meta,
    }
