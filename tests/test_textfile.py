"""Bytes that are not a CSV (issue 18.1): every CSV reader answers a binary or non-UTF-8 file with one
UserError naming the file and the byte offset, never a traceback; fuzzed with random bytes, random
truncations and random byte mutations of a valid file, an accepted file yields exactly what its bytes say."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dinov2_patho.cli import main
from dinov2_patho.data.index.source import iter_batches, read_text_table
from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.errors import UserError
from dinov2_patho.eval.slide.tasks import read_labels
from dinov2_patho.textfile import check_text_file, read_text

CLUSTERS = "slide_id,tile_x,tile_y,level_1,level_2\n" + "".join(
    f"s{i % 3},{224 * i},{448 * i},{i % 5},{i % 2}\n" for i in range(12))
METADATA = "slide_id,tissue_diagnosis\n" + "".join(f"s{i},Lung_é{i % 3}\n" for i in range(8))
REGISTRY = "slide_id,path\n" + "".join(f"s{i},slides/s{i}.svs\n" for i in range(6))
LABELS = "slide_id,label,split\n" + "".join(f"s{i},{('normal', 'tumor')[i % 2]},train\n" for i in range(6))
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def ingest_rows(path: Path) -> list[tuple]:
    _, batches = iter_batches(path)
    return [(b.slide_keys[c], x, y, *(lv[i] for lv in b.levels))
            for b in batches for i, (c, x, y) in enumerate(zip(b.slide_codes, b.x, b.y))]


def metadata_rows(path: Path) -> list[tuple]:
    table = read_text_table(path)
    return list(zip(*(table[c].to_pylist() for c in table.column_names)))


def registry_rows(path: Path) -> list[tuple]:
    return sorted(SlideRegistry.from_csv(path)._paths.items())


def labels_rows(path: Path) -> list[tuple]:
    return [tuple(r.values()) for r in read_labels(path)]


READERS = {"clusters": (CLUSTERS, ingest_rows), "metadata": (METADATA, metadata_rows),
           "registry": (REGISTRY, registry_rows), "labels": (LABELS, labels_rows)}


def is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data


def read_or_error(reader, path: Path, data: bytes):
    path.write_bytes(data)
    try:
        return reader(path)
    except UserError as e:
        message = str(e)
        assert str(path) in message and "\n" not in message
        return None


@pytest.mark.parametrize("name", list(READERS))
@pytest.mark.parametrize(("bad", "what"), [(b"\xff", "invalid UTF-8 byte 0xff"), (b"\0", "NUL byte")])
def test_bad_byte_named_with_offset_and_line(tmp_path: Path, name: str, bad: bytes, what: str) -> None:
    text, reader = READERS[name]
    data = text.encode()
    offset = data.index(b"\n", data.index(b"\n") + 1) + 3  # third line, third byte
    path = tmp_path / "in.csv"
    path.write_bytes(data[:offset] + bad + data[offset:])
    at_byte = rf"not a UTF-8 text file: {what}.* at byte offset {offset} \(line 3\)$"
    # the ingest names a NUL inside a slide_id by its row (the slide-id rule: a control character)
    at_row = rf"data row 2 \(line 3\): ({what}|slide id .* holds the control or invisible character)"
    with pytest.raises(UserError, match=rf"in\.csv: ({at_byte}|{at_row})"):
        reader(path)


def test_latin1_and_binary_index_build_exit_2_no_output(tmp_path: Path, capsys) -> None:
    for name, data in [("latin1", CLUSTERS.replace("s1", "sé").encode("latin-1")),
                       ("binary", bytes(range(256)) * 4)]:
        src, out = tmp_path / f"{name}.csv", tmp_path / f"{name}_index"
        src.write_bytes(data)
        assert main(["index", "build", "--csv", str(src), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1
        assert str(src) in err and "byte offset" in err
        assert not out.exists() and list(tmp_path.glob(f"{name}_index*")) == []


def test_check_text_file_across_chunks(tmp_path: Path, monkeypatch) -> None:
    """A character split by the read chunk is fine; a bad byte after the first chunk has its true offset."""
    from dinov2_patho import textfile

    monkeypatch.setattr(textfile, "_CHUNK", 4)
    path = tmp_path / "t.csv"
    path.write_bytes("aé\néé\n".encode())  # é is 2 bytes; chunks of 4 cut the second é
    check_text_file(path)
    assert read_text(path) == "aé\néé\n"
    path.write_bytes("aé\néé\n".encode() + b"x\xc3(")
    with pytest.raises(UserError, match=r"byte 0xc3 at byte offset 10 \(line 3\)$"):
        check_text_file(path)


@pytest.mark.parametrize("name", list(READERS))
@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_user_error_only(tmp_path: Path, name: str, data: bytes) -> None:
    text, reader = READERS[name]
    if read_or_error(reader, tmp_path / "in.csv", data) is not None:
        assert is_text(data)


@pytest.mark.parametrize("name", list(READERS))
@FUZZ
@given(st.data())
def test_mutations_user_error_or_text(tmp_path: Path, name: str, data) -> None:
    """A valid file with 1-3 bytes replaced by NUL or non-ASCII bytes: a one-line UserError, or (when the
    replacements still spell UTF-8, e.g. 0x80 for 0xa9 inside an é) a file that is text."""
    text, reader = READERS[name]
    raw = bytearray(text.encode())
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.sampled_from([0, 0x80, 0xC3, 0xFF, 0xE9]))
    if read_or_error(reader, tmp_path / "in.csv", bytes(raw)) is not None:
        assert is_text(bytes(raw)), f"{name}: accepted a NUL or invalid UTF-8 byte: {bytes(raw)!r}"


def prefix_lines(text: str, cut: int) -> tuple[int, str]:
    """(complete data lines in the first `cut` bytes, the partial line after them)."""
    lines = text.encode()[:cut].decode("utf-8", errors="ignore").split("\n")
    return len(lines) - 2, lines[-1]


@pytest.mark.parametrize("name", ["clusters", "metadata"])
@FUZZ
@given(st.data())
def test_truncation_never_a_silently_shorter_table(tmp_path: Path, name: str, data) -> None:
    """A cut file is accepted only with the complete rows it holds, plus a last line that still has all
    its fields (a cut inside its last value cannot be told from a shorter value); a row cut short of its
    fields is an error, and a cut at a line end keeps every row before it."""
    text, reader = READERS[name]
    (tmp_path / "full.csv").write_text(text)
    full = reader(tmp_path / "full.csv")
    cut = data.draw(st.integers(0, len(text.encode())))
    got = read_or_error(reader, tmp_path / "in.csv", text.encode()[:cut])
    complete, partial = prefix_lines(text, cut)
    if got is None:
        assert partial or complete < 1, f"cut at a line end after {complete} rows was rejected"
        return
    fields = next(csv.reader(io.StringIO(partial)), []) if partial else []
    whole = len(fields) == len(text.split("\n")[0].split(","))
    assert not partial or whole, f"accepted a last row cut to {partial!r}"
    assert len(got) == complete + bool(partial)
    assert got[:complete] == full[:complete]
    if partial:  # only its last field may differ
        assert got[-1][:-1] == full[complete][:-1]
        assert str(full[complete][-1]).startswith(str(got[-1][-1]))


def test_metadata_codes_of_real_metadata_unchanged_by_check() -> None:
    """The real TCGA metadata (UTF-8, no NUL) passes the text check whole."""
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "TCGA_tissue_metadata.csv"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    check_text_file(path)
    assert np.asarray(read_text_table(path)["slide_id"]).size > 0


@pytest.mark.parametrize("name", ["clusters", "metadata"])
@pytest.mark.parametrize("data", [b"PAR1", b"PAR1" + bytes(range(40)), b"\r\xc2\x80", b"a\rb,c\n",
                                  b"slide_id,tissue_diagnosis\ns0,Lung\n\"2,Lung\n"])
def test_fuzz_finds(tmp_path: Path, name: str, data: bytes) -> None:
    """Found by fuzzing: parquet magic then junk, a lone carriage return in the header, an open quote
    (pyarrow's message quotes the row with its line break: still one line)."""
    assert read_or_error(READERS[name][1], tmp_path / "in.csv", data) is None
