"""Read a clustering table (CSV or parquet) as validated column batches, in file order.

Row numbers in errors are 1-based data rows; for a CSV, data row r is line r + 1 (the header is
line 1, blank lines and newlines inside quotes are refused, so the two never drift apart).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from dinov2_patho.errors import UserError
from dinov2_patho.slide_files import shown, slide_id_problem
from dinov2_patho.textfile import check_text_file, decode_text, one_line

REQUIRED = ("slide_id", "tile_x", "tile_y")
_LEVEL = re.compile(r"level_([1-9][0-9]*)$")
_INT = re.compile(r"-?[0-9]+$")
_NULLS = ("", "NaN", "nan", "NA", "N/A", "NULL", "null", "None")
INT32_MAX = np.iinfo(np.int32).max
# 4 MiB blocks measured fastest here (1-16 MiB tried); larger blocks stall the reader's readahead.
CSV_BLOCK_SIZE = 4 << 20
PARQUET_BATCH_ROWS = 1 << 20


@dataclass
class Batch:
    """One block of rows; `start` is the 0-based data row of its first row."""

    start: int
    slide_keys: list[str]  # this block's distinct slide ids
    slide_codes: np.ndarray  # int32 per row, index into slide_keys
    x: np.ndarray  # int64
    y: np.ndarray  # int64
    levels: list[np.ndarray]  # int64 per level


def is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def row_error(path: Path, row: int, problem: str, *, csv_lines: bool = True) -> UserError:
    where = f"data row {row} (line {row + 1})" if csv_lines else f"row {row}"
    return UserError(f"{path}: {where}: {problem}")


def check_header(path: Path, names: list[str]) -> tuple[str, ...]:
    """Validate the columns; return the level names in level order."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{path}: duplicate column(s) {', '.join(map(repr, dupes))} in the header")
    levels = sorted((int(m.group(1)), n) for n in names if (m := _LEVEL.match(n)))
    missing = [c for c in REQUIRED if c not in names]
    missing += [
        f"level_{i}" for i in range(1, (levels[-1][0] if levels else 0) + 1) if f"level_{i}" not in names
    ]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
            "expected slide_id,tile_x,tile_y,level_1..level_k (k >= 0)"
        )
    unknown = [n for n in names if n not in REQUIRED and not _LEVEL.match(n)]
    if unknown:
        raise UserError(
            f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; "
            "expected slide_id,tile_x,tile_y,level_1..level_k (k >= 0)"
        )
    return tuple(n for _, n in levels)


def iter_batches(path: Path, on_bytes=None) -> tuple[tuple[str, ...], Iterator[Batch]]:
    """(level names, batches). `on_bytes(n)` is called with the bytes consumed, for a progress bar."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (no header, no rows)")
    if is_parquet(path):
        return _parquet(path, on_bytes)
    return _csv(path, on_bytes)


def _csv(path: Path, on_bytes) -> tuple[tuple[str, ...], Iterator[Batch]]:
    header = _header(path)
    levels = check_header(path, header)
    types = {"slide_id": pa.dictionary(pa.int32(), pa.string()), "tile_x": pa.int64(), "tile_y": pa.int64()}
    types.update({n: pa.int64() for n in levels})
    convert = pcsv.ConvertOptions(
        column_types=types,
        strings_can_be_null=False,
        null_values=list(_NULLS),
        include_columns=[*REQUIRED, *levels],
    )
    parse = pcsv.ParseOptions(newlines_in_values=False, ignore_empty_lines=False)

    def batches() -> Iterator[Batch]:
        start = 0
        with open(path, "rb") as f:
            seen = 0
            try:
                reader = pcsv.open_csv(
                    f,
                    read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_SIZE),
                    parse_options=parse,
                    convert_options=convert,
                )
                for rb in reader:
                    if on_bytes is not None:
                        pos = f.tell()
                        on_bytes(pos - seen)
                        seen = pos
                    yield _to_batch(path, rb, start, levels, csv_lines=True)
                    start += rb.num_rows
            except pa.ArrowInvalid as e:
                check_text_file(path)  # invalid UTF-8 (pyarrow does not say where): name its offset
                raise _diagnose_csv(path, header, start, e) from None
        if start == 0:
            raise UserError(f"{path}: no data rows (header only)")

    return levels, batches()


def _diagnose_csv(path: Path, header: list[str], start: int, error: Exception) -> UserError:
    """pyarrow says a block is bad but not where: re-read from that block with `csv` to name the row."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        lines = islice(f, start + 1, None)  # skip the header and the rows already accepted
        for row, line in enumerate(lines, start + 1):
            fields = next(csv.reader([line]), [])
            if not line.strip("\r\n"):
                return row_error(path, row, "blank line")
            if not line.endswith("\n") and len(fields) < len(header):
                return row_error(path, row, f"truncated last line: {len(fields)} of {len(header)} fields")
            if len(fields) != len(header):
                return row_error(
                    path, row, f"{len(fields)} fields, expected {len(header)}: {line.rstrip()!r}"
                )
            for name, value in zip(header, fields):
                if name != "slide_id" and value not in _NULLS and not _INT.match(value):
                    return row_error(path, row, f"{name} is {value!r}, not an integer")
    return UserError(f"{path}: after data row {start}: {one_line(error)}")


def _header(path: Path) -> list[str]:
    with open(path, "rb") as f:
        line = f.readline()
    try:
        return next(csv.reader([decode_text(path, line)]), [])  # pyarrow skips a BOM too
    except csv.Error as e:  # e.g. a lone carriage return inside the header
        raise UserError(f"{path}: line 1 (header): {e}") from None


def _parquet(path: Path, on_bytes) -> tuple[tuple[str, ...], Iterator[Batch]]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # "PAR1" then bytes that are not parquet
        raise UserError(f"{path}: not a readable parquet file: {e}") from None
    levels = check_header(path, pf.schema_arrow.names)
    for name in (*REQUIRED, *levels):
        typ = pf.schema_arrow.field(name).type
        ok = (
            pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_dictionary(typ)
            if name == "slide_id"
            else pa.types.is_integer(typ)
        )
        if not ok:
            want = "strings" if name == "slide_id" else "integers"
            raise UserError(f"{path}: column {name!r} has type {typ}; expected {want}")

    def batches() -> Iterator[Batch]:
        start = 0
        size = path.stat().st_size
        try:
            for rb in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[*REQUIRED, *levels]):
                yield _to_batch(path, rb, start, levels, csv_lines=False)
                start += rb.num_rows
                if on_bytes is not None:
                    on_bytes(size * rb.num_rows // max(pf.metadata.num_rows, 1))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: corrupt parquet after data row {start}: {e}") from None
        if start == 0:
            raise UserError(f"{path}: no data rows")

    return levels, batches()


def _to_batch(
    path: Path, rb: pa.RecordBatch, start: int, levels: tuple[str, ...], *, csv_lines: bool
) -> Batch:
    # (index in block, check order, message): the first row in file order is raised, the first check on a tie
    problems: list[tuple[int, int, str]] = []

    def first(mask: np.ndarray, message: str) -> None:
        hits = np.flatnonzero(mask)
        if hits.size:
            problems.append((int(hits[0]), len(problems), message))

    slide = rb.column("slide_id")
    if not pa.types.is_dictionary(slide.type):
        slide = pc.dictionary_encode(slide)
    slide = slide.cast(pa.dictionary(pa.int32(), pa.string())).fill_null("")
    keys = slide.dictionary.to_pylist()
    codes = slide.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    no_slide = codes == keys.index("") if "" in keys else np.zeros(rb.num_rows, bool)
    if csv_lines and no_slide.any():  # pyarrow reads a blank line as a row of empty fields
        blank = no_slide.copy()
        for name in ("tile_x", "tile_y", *levels):
            blank &= rb.column(name).is_null().to_numpy(zero_copy_only=False)
        first(blank, "blank line")
    first(no_slide, "empty slide_id")
    for i, key in enumerate(keys):  # a slide id names files (slide_files): pyarrow keeps NULs, '/', '..'
        problem = slide_id_problem(key) if key else None
        if problem is not None:
            first(codes == i, f"slide id {shown(key)} {problem}")
    cols = {}
    for name in ("tile_x", "tile_y", *levels):
        col = rb.column(name)
        if col.null_count:
            first(col.is_null().to_numpy(zero_copy_only=False), f"{name} is empty or NaN")
            col = col.fill_null(0)
        cols[name] = col.to_numpy().astype(np.int64, copy=False)
    for name in ("tile_x", "tile_y"):
        first(cols[name] < 0, f"{name} is negative")
        first(cols[name] > INT32_MAX, f"{name} exceeds {INT32_MAX} (int32)")
    if problems:
        i, _, message = min(problems)
        raise row_error(path, start + i + 1, message, csv_lines=csv_lines)
    return Batch(start, keys, codes, cols["tile_x"], cols["tile_y"], [cols[n] for n in levels])


def read_text_table(path: Path) -> pa.Table:
    """A small CSV with every column as text (metadata tables)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    check_text_file(path)  # pyarrow names neither the byte nor the row of invalid UTF-8, and keeps NULs
    names = _header(Path(path))
    try:
        return pcsv.read_csv(
            path,
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: {one_line(e)}") from None
