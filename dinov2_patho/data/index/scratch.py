"""Pass 1 of `build_index`: raw columns appended to files, and (hash, row) records in hash partitions,
read back in chunks by the later passes (ingest.py) and the duplicate check (checks.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinov2_patho.hashing import splitmix64

_MAX_PARTITIONS = 256  # 350M rows (25 GB of CSV) -> ~1.4M (hash, row) records per partition
_PARTITION_BYTES = 64 << 20  # of input per partition
_FLUSH_ROWS = 1 << 20

HASH_RECORD = np.dtype([("h", "<u8"), ("row", "<u8")])


def tile_hash(slide: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A uint64 per (slide, x, y): equal tiles hash equal (a candidate duplicate, then confirmed)."""
    key = (x.astype(np.uint64) << np.uint64(32)) | y.astype(np.uint64)
    return splitmix64(key ^ splitmix64(slide))


class Scratch:
    """Pass-1 output: raw columns appended to files, and (hash, row) records in hash partitions.

    Columns are "x", "y" (int32), "slide" and "level1".."levelK" (uint32 provisional ids). Blocks are
    buffered to ~1M rows before writing: the partition writes of a flush stay large."""

    def __init__(self, work: Path, num_levels: int, input_bytes: int):
        self.work = work
        # a power of two, from the input size: small inputs need few files, large ones small partitions
        self.num_parts = min(_MAX_PARTITIONS, 1 << max(0, (input_bytes // _PARTITION_BYTES).bit_length()))
        self.dtypes = {"x": np.dtype(np.int32), "y": np.dtype(np.int32), "slide": np.dtype(np.uint32),
                       **{f"level{k}": np.dtype(np.uint32) for k in range(1, num_levels + 1)}}
        self.names = list(self.dtypes)
        self.files = {n: open(self._column(n), "wb") for n in self.names}  # noqa: SIM115 (closed in close())
        self.parts = [open(self._partition(p), "wb") for p in range(self.num_parts)]  # noqa: SIM115
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

    def _column(self, name: str) -> Path:
        return self.work / f"{name}.raw"

    def _partition(self, p: int) -> Path:
        return self.work / f"part{p:03d}.raw"

    def reader(self, name: str) -> ChunkReader:
        """Column `name` in chunks; a context manager."""
        return ChunkReader(self._column(name), self.dtypes[name])

    def partition(self, p: int) -> np.ndarray:
        """The (hash, row) records of hash partition `p`."""
        return np.fromfile(self._partition(p), HASH_RECORD)


class ChunkReader:
    """Sequential chunks of a raw file with plain reads (a memmap would count its pages in RSS)."""

    def __init__(self, path: Path, dtype):
        self.f = open(path, "rb")  # noqa: SIM115 (closed by the pass that owns it)
        self.dtype = np.dtype(dtype)

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()

    def read(self, n: int) -> np.ndarray:
        return np.fromfile(self.f, self.dtype, n)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        mm = np.memmap(self.f.name, self.dtype, "r")
        return np.asarray(mm[rows])
