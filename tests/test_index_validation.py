"""Bad clustering CSVs: each error names the file, the row (data row and line) and the problem; the CLI
exits non-zero and never leaves a half-written index."""

from __future__ import annotations

import json

import pytest

from dinov2_patho.cli import main
from dinov2_patho.data.index import build_index
from dinov2_patho.data.index import source as index_source
from dinov2_patho.errors import UserError

HEADER = "slide_id,tile_x,tile_y,level_1,level_2\n"
GOOD = "a,0,0,1,0\na,224,0,2,0\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", r"empty file"),
        (HEADER, r"no data rows \(header only\)"),
        ("slide_id,tile_x,level_1\na,0,1\n", r"missing column\(s\) 'tile_y'"),
        ("slide_id,tile_x,tile_y,level_2\na,0,0,1\n", r"missing column\(s\) 'level_1'"),
        ("slide_id,tile_x,tile_y,level_3\na,0,0,1\n", r"missing column\(s\) 'level_1', 'level_2'"),
        ("slide_id,tile_x,tile_y,level_1,extra\na,0,0,1,x\n", r"unknown column\(s\) 'extra'"),
        ("slide_id,tile_x,tile_y,level_1,level_1\na,0,0,1,1\n", r"duplicate column\(s\) 'level_1'"),
        (HEADER + GOOD + "a,1.5,0,1,0\n", r"data row 3 \(line 4\): tile_x is '1.5', not an integer"),
        (HEADER + GOOD + "a,abc,0,1,0\n", r"data row 3 \(line 4\): tile_x is 'abc', not an integer"),
        (HEADER + GOOD + "a,0,-224,1,0\n", r"data row 3 \(line 4\): tile_y is negative"),
        (HEADER + GOOD + "a,2147483648,0,1,0\n", r"data row 3 \(line 4\): tile_x exceeds 2147483647"),
        (HEADER + GOOD + "a,0,448,,0\n", r"data row 3 \(line 4\): level_1 is empty or NaN"),
        (HEADER + GOOD + "a,0,448,1,NaN\n", r"data row 3 \(line 4\): level_2 is empty or NaN"),
        (HEADER + GOOD + ",0,448,1,0\n", r"data row 3 \(line 4\): empty slide_id"),
        (HEADER + GOOD + "\na,0,448,1,0\n", r"data row 3 \(line 4\): blank line"),
        (HEADER + GOOD + "a,0,448,1,0,9\n", r"data row 3 \(line 4\): 6 fields, expected 5"),
        (HEADER + GOOD + "a,0,448,1", r"data row 3 \(line 4\): truncated last line: 4 of 5 fields"),
        (
            HEADER + GOOD + "b,0,0,1,0\na,0,0,3,0\n",
            r"data row 4 \(line 5\): duplicate tile \(slide_id='a', "
            r"tile_x=0, tile_y=0\), first at data row 1",
        ),
    ],
)
def test_errors_name_file_row_and_problem(tmp_path, text, error):
    src = tmp_path / "clusters.csv"
    src.write_text(text)
    with pytest.raises(UserError, match=r"clusters\.csv: " + error):
        build_index(src, tmp_path / "idx", progress=False)
    assert list(tmp_path.iterdir()) == [src]  # nothing half-written, no temp dir left


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.csv: no such file"):
        build_index(tmp_path / "nope.csv", tmp_path / "idx", progress=False)


def test_a_complete_last_line_without_newline_is_fine(tmp_path):
    (tmp_path / "c.csv").write_text(HEADER + GOOD + "a,0,448,1,0")
    assert len(build_index(tmp_path / "c.csv", tmp_path / "idx", progress=False)) == 3


def test_error_rows_are_counted_across_blocks(tmp_path, monkeypatch):
    """A bad value many read blocks in still gets its exact row number."""
    monkeypatch.setattr(index_source, "CSV_BLOCK_SIZE", 1 << 12)
    n = 2000
    rows = [f"slide-{i // 300},{224 * i},0,{i % 7},1\n" for i in range(n)]
    src = tmp_path / "c.csv"
    src.write_text(HEADER + "".join(rows))
    assert src.stat().st_size > 10 * index_source.CSV_BLOCK_SIZE
    assert len(build_index(src, tmp_path / "ok", progress=False)) == n
    for bad, error in (
        ("slide-6,x,0,1,1\n", "tile_x is 'x'"),
        (f"slide-6,{224 * 1995},0,1,\n", "level_2 is empty"),
        (f"slide-6,{224 * 1995},0,1,1,1\n", "6 fields, expected 5"),
    ):
        src.write_text(HEADER + "".join(rows[: n - 5]) + bad + "".join(rows[n - 4 :]))
        with pytest.raises(UserError, match=rf"data row {n - 4} \(line {n - 3}\): {error}"):
            build_index(src, tmp_path / "idx", progress=False)


def test_cli_build_info_and_exit_codes(tmp_path, capsys):
    src = tmp_path / "c.csv"
    src.write_text(HEADER + GOOD + "b,0,0,3,1\na,0,0,1,0\n")
    out = tmp_path / "idx"
    assert main(["index", "build", "--csv", str(src), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "dinov2-patho index: error:" in err and "c.csv: data row 4 (line 5): duplicate tile" in err
    assert "--dedupe" in err and not out.exists()
    assert main(["index", "build", "--csv", str(src), "--out", str(out), "--dedupe", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "rows       3 (1 duplicates dropped)" in text and "slides     2" in text
    assert main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["rows"] == 3 and info["slides"] == 2 and info["grouped_by_slide"]
    )  # once the repeat is dropped
    assert [lv["clusters"] for lv in info["levels"]] == [3, 2]
    assert info["levels"][0]["size_max"] == 1 and info["levels"][1]["size_max"] == 2
    assert main(["index", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rows grouped by slide" in text and "level_2" in text
    assert main(["index", "info", str(tmp_path / "missing")]) == 2
    assert "not a tile index" in capsys.readouterr().err


def test_cli_reports_non_tree_nesting(tmp_path, capsys):
    src = tmp_path / "c.csv"
    src.write_text(HEADER + "a,0,0,1,0\na,224,0,1,1\na,448,0,2,1\n")
    assert main(["index", "build", "--csv", str(src), "--out", str(tmp_path / "idx"), "--no-progress"]) == 0
    assert "warning: level_1 -> level_2 is not a tree: 1 of 2 level_1 clusters" in capsys.readouterr().out


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    src = tmp_path / "c.csv"
    src.write_bytes(b"\xef\xbb\xbf" + (HEADER + GOOD).replace("\n", "\r\n").encode())
    index = build_index(src, tmp_path / "idx", progress=False)
    assert index.tile(1) == ("a", 224, 0)
