"""Text (CSV) files that must be UTF-8: bytes that are not text get one line naming the file,
the byte offset and the line, instead of a UnicodeDecodeError traceback or a NUL inside a value."""

from __future__ import annotations

import io
from pathlib import Path

from dinov2_patho.errors import UserError

_CHUNK = 1 << 22
BOM = b"\xef\xbb\xbf"


def _first_bad(data: bytes, final: bool) -> tuple[int, str] | None | int:
    """(offset, what) of the first NUL or invalid UTF-8 byte in `data`; or, when `data` only ends in
    the first bytes of a character and more follows (not `final`), the offset where that tail starts."""
    nul = data.find(b"\0")
    limit = len(data) if nul < 0 else nul
    try:
        data[:limit].decode("utf-8")
    except UnicodeDecodeError as e:
        if not final and e.reason == "unexpected end of data" and nul < 0:
            return e.start  # a character cut by the chunk boundary: decide with the next chunk
        return e.start, f"invalid UTF-8 byte 0x{data[e.start]:02x}"
    return None if nul < 0 else (nul, "NUL byte (binary data)")


def one_line(error: Exception) -> str:
    """A library's message (pyarrow quotes the bad row, line breaks included) fit for a one-line error."""
    return str(error).replace("\r", "\\r").replace("\n", "\\n")


def _error(path: Path, offset: int, line: int, what: str) -> UserError:
    return UserError(f"{path}: not a UTF-8 text file: {what} at byte offset {offset} (line {line})")


def check_text_file(path: str | Path) -> None:
    """Raise UserError at the first NUL or invalid UTF-8 byte of `path`, read in chunks."""
    path = Path(path)
    with open(path, "rb") as f:
        pos, line, tail = 0, 1, b""
        while True:
            chunk = f.read(_CHUNK)
            data = tail + chunk
            bad = _first_bad(data, final=not chunk)
            if isinstance(bad, tuple):
                offset, what = bad
                raise _error(path, pos + offset, line + data.count(b"\n", 0, offset), what)
            cut = len(data) if bad is None else bad
            line += data.count(b"\n", 0, cut)
            pos, tail = pos + cut, data[cut:]
            if not chunk:
                return


def decode_text(path: str | Path, data: bytes) -> str:
    """`data`, the whole file `path` or its first lines, as UTF-8 text, a leading BOM dropped;
    UserError naming `path` and the byte offset and line of a NUL or invalid UTF-8 byte."""
    bad = _first_bad(data, final=True)
    if bad is not None:
        offset, what = bad
        raise _error(Path(path), offset, data.count(b"\n", 0, offset) + 1, what)
    return data.removeprefix(BOM).decode("utf-8")


def read_text(path: str | Path) -> str:
    """The whole (small) file as UTF-8 text (see decode_text)."""
    return decode_text(path, Path(path).read_bytes())


def open_text(path: str | Path) -> io.StringIO:
    """`open(path, newline="")` for a small CSV, checked to be UTF-8 text first (see read_text)."""
    return io.StringIO(read_text(path), newline="")
