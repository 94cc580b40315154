"""Every JSON / JSON-lines file the project reads back (dinov2_patho.jsonfile): a missing, truncated,
non-UTF-8, non-JSON or wrong-shaped file is one UserError naming the file, never a traceback; a
metrics.jsonl whose last line a kill cut short is read (and resumed) without it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.backbones.features import MANIFEST, check_cache_manifest, rows_done, write_rows_done
from dinov2_patho.curation import embed, tree
from dinov2_patho.data import folders
from dinov2_patho.data.index import TileIndex, build_index
from dinov2_patho.data.index.format import Manifest
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_write_text
from dinov2_patho.jsonfile import JsonFileError, read_json
from dinov2_patho.report import run as report_run
from dinov2_patho.train import metrics_log


@dataclass
class Case:
    path: Path                  # the JSON file, as the project wrote it
    read: Callable[[], Any]     # the project's reader of it, returning what it read
    lines: bool = False         # JSON lines: a cut-short last line is left out, not an error


def _index(tmp: Path) -> Path:
    csv = tmp / "c.csv"
    csv.write_text("slide_id,tile_x,tile_y,level_1,level_2\n" +
                   "".join(f"s{i % 3},{224 * i},0,{i % 4},{i % 2}\n" for i in range(12)))
    return build_index(csv, tmp / "index", progress=False).path


def _metrics(tmp: Path) -> Path:
    writer = metrics_log.MetricsWriter(tmp, start_iteration=0, total_iterations=3, log_every=100,
                                       tensorboard=False)
    for it in range(3):  # the keys of its progress line, a string, a float, an int
        writer.write({"iteration": it, "total_loss": 10.0 / (it + 1), "lr": 1e-3 * it, "wd": 0.04,
                      "momentum": 0.99, "teacher_temp": 0.04, "samples_per_s": 8.0, "data_time": 0.1,
                      "iter_time": 0.2, "name": "x" * it, "sampler/slides": it + 2})
    writer.close()
    return tmp / metrics_log.METRICS_FILE


SETTINGS = {"backbone": {"path": None, "arch": "vit_small", "seed": 0}, "tiles": {"num_rows": 2}, "dim": 4}


def _case(name: str, tmp: Path) -> Case:
    if name == "index manifest":
        index = _index(tmp)
        return Case(Path(index) / "manifest.json", lambda: Manifest.read(index).as_dict())
    if name == "index slides":
        index = _index(tmp)
        return Case(Path(index) / "slides.json", lambda: TileIndex.open(index).slide_names)
    if name == "tree manifest":
        tree.write_manifest(tmp, 6, [3, 2], embeddings="e.npy", dim=4, objectives=[0.5, 0.25], seed=0)
        return Case(tmp / tree.MANIFEST, lambda: tree.ClusterTree.open(tmp).manifest)
    if name == "tree level":
        tree.write_level(tmp, 1, np.zeros((3, 4)), np.arange(6) % 3, np.ones(6), objective=0.5, seconds=1.0)
        return Case(tree.level_dir(tmp, 1) / tree.LEVEL_DONE, lambda: tree.read_level_done(tmp, 1))
    if name == "embed run":
        embed._prepare(tmp, SETTINGS, 2, 4)
        return Case(tmp / embed.RUN, lambda: embed.check_settings(tmp, SETTINGS))
    if name == "tile settings":
        atomic_write_text(tmp / folders.SETTINGS, json.dumps(
            {"slides": "/data/slides", "tiles": 40, "mpp_override": None, "backend": "openslide",
             "fallback": "tiffslide", "workers": 2}, indent=1))
        return Case(tmp / folders.SETTINGS, lambda: folders.read_settings(tmp))
    if name == "feature progress":
        write_rows_done(tmp / "progress.json", 5)
        return Case(tmp / "progress.json", lambda: rows_done(tmp / "progress.json", 8))
    if name == "bag manifest":
        manifest = {"backbone": "b", "weights_sha256": "0" * 8, "token": "cls", "max_tiles": None}
        check_cache_manifest(tmp, manifest, "bags")  # the first call writes it
        return Case(tmp / MANIFEST, lambda: check_cache_manifest(tmp, manifest, "bags"))
    if name == "metrics (train)":
        path = _metrics(tmp)
        return Case(path, lambda: metrics_log.read_metrics(path), lines=True)
    if name == "metrics (report)":
        path = _metrics(tmp)
        return Case(path, lambda: _columns(report_run.read_metrics(tmp)), lines=True)
    raise KeyError(name)


def _columns(metrics: report_run.Metrics) -> list[dict[str, float]]:
    """The report's columns as records (the numeric keys), to compare with the records written."""
    keys = sorted(metrics.columns)
    return [{k: float(metrics.columns[k][i]) for k in keys} for i in range(len(metrics))]


def _as_read(name: str, records: list[dict[str, Any]]) -> Any:
    """What the reader of a JSON-lines case returns for these records."""
    if name == "metrics (report)":
        return [{k: float(v) for k, v in r.items() if not isinstance(v, str)} for r in records]
    return records


CASES = ["index manifest", "index slides", "tree manifest", "tree level", "embed run", "tile settings",
         "feature progress", "bag manifest", "metrics (train)", "metrics (report)"]


def _outcome(case: Case, data: bytes) -> tuple[bool, Any]:
    """(True, what the reader returned) or (False, the message of its UserError) for the file `data`;
    any other exception fails the test."""
    case.path.write_bytes(data)
    try:
        return True, case.read()
    except UserError as e:
        message = str(e)
        assert "\n" not in message, message
        assert str(case.path) in message, message
        return False, message


@pytest.mark.parametrize("name", CASES)
def test_truncated_at_every_offset_reads_the_same_or_names_the_file(name, tmp_path):
    case = _case(name, tmp_path)
    source = case.path.read_bytes()
    expected = case.read()
    lines = source.split(b"\n")
    for cut in range(len(source)):
        ok, got = _outcome(case, source[:cut])
        if not case.lines:
            assert not ok or got == expected, (cut, got)
            continue
        # JSON lines: the records of the complete lines, and of a last one cut after its last byte
        done = source[:cut].split(b"\n")
        kept = len(done) - 1 + (done[-1] == lines[len(done) - 1] and done[-1] != b"")
        records = [json.loads(line) for line in lines[:kept]]
        assert ok, (cut, got)
        assert got == _as_read(name, records), cut
    case.path.write_bytes(source)
    assert case.read() == expected


@pytest.mark.parametrize("name", CASES)
def test_random_bytes_and_mutations_read_or_name_the_file(name, tmp_path):
    case = _case(name, tmp_path)
    source = case.path.read_bytes()

    edits = st.lists(st.tuples(st.integers(0, len(source) - 1), st.integers(0, 255)), min_size=1, max_size=4)

    @settings(max_examples=25, deadline=None, database=None)
    @given(st.binary(max_size=64) | edits.map(lambda edits: _mutate(source, edits)))
    def check(data):
        ok, got = _outcome(case, data)
        if ok and not case.lines and got is not None:
            json.loads(data.decode("utf-8-sig"))  # accepted only when it is JSON

    check()


def _mutate(source: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(source)
    for position, byte in edits:
        data[position] = byte
    return bytes(data)


@pytest.mark.parametrize("name", ["index manifest", "tree manifest", "tree level", "feature progress",
                                  "embed run", "tile settings"])
@pytest.mark.parametrize("content, problem", [
    (b"", "empty"),
    (b'{"a": 1', "not JSON: Expecting ',' delimiter at line 1 column 8; truncated or damaged"),
    (b'{"slides": "caf\xe9"}', "not a UTF-8 text file: invalid UTF-8 byte 0xe9 at byte offset 15 (line 1)"),
    (b"[1, 2]", "the top level is a list, not an object"),
])
def test_each_kind_of_damage_is_one_line_naming_file_and_problem(name, content, problem, tmp_path):
    case = _case(name, tmp_path)
    ok, message = _outcome(case, content)
    assert not ok and message.startswith(str(case.path)) and problem in message, message


def test_wrong_shapes_name_the_key(tmp_path):
    case = _case("index manifest", tmp_path)
    good = json.loads(case.path.read_text())
    for change, problem in [
        ({"num_rows": "12"}, "the top level.num_rows is a string, not an integer"),
        ({"num_rows": True}, "num_rows is true/false, not an integer"),
        ({"levels": [{"name": "level_1"}]}, "no key 'num_clusters' in the top level.levels[0]"),
        ({"extra": 1}, "unexpected key 'extra' in the top level"),
        ({"format_version": 7}, "tile index manifest of format 7, this code reads 1; rebuild the index"),
    ]:
        ok, message = _outcome(case, json.dumps({**good, **change}).encode())
        assert not ok and problem in message, message
    del good["duplicates_dropped"]
    ok, message = _outcome(case, json.dumps(good).encode())
    assert not ok and "no key 'duplicates_dropped'" in message, message


def test_slide_list_must_match_the_manifest(tmp_path):
    case = _case("index slides", tmp_path)
    ok, message = _outcome(case, b'["s0", "s1"]')
    assert not ok and "2 slide ids, the manifest says 3" in message, message
    ok, message = _outcome(case, b'["s0", "s1", 2]')
    assert not ok and "the top level[2] is an integer, not a string" in message, message


def test_missing_files_are_named(tmp_path):
    for name in ("tree level", "feature progress"):
        case = _case(name, tmp_path / name)
        case.path.unlink()
        with pytest.raises(JsonFileError, match=f"{case.path}: missing, no "):
            case.read()
    assert folders.read_settings(tmp_path) == {} and metrics_log.read_metrics(tmp_path / "none.jsonl") == []


def test_optional_keys_and_numbers(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1, "c": 2}')
    shape = {"a": float, "b": str | None, "c": int | None}
    assert read_json(path, "thing", "fix it", shape=shape) == {"a": 1, "c": 2}
    path.write_text('{"a": null}')
    with pytest.raises(JsonFileError, match=r"x.json: not a thing \(the top level.a is null, not a number\); "
                                            "fix it"):
        read_json(path, "thing", "fix it", shape=shape)
    path.write_text("[" * 100_000)
    with pytest.raises(JsonFileError, match="x.json: not a thing"):
        read_json(path, "thing", "fix it", shape=list)


# ---------------------------------------------------------------------------- metrics.jsonl


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = _metrics(tmp_path)
    lines = path.read_bytes().split(b"\n")
    for bad, problem in [(b'{"iteration": 1, "lr": 0.1', "not JSON: Expecting ',' delimiter at column 27"),
                         (b'{"lr": 0.1}', "no key 'iteration'"), (b'{"iteration": 1.0}', "not an integer"),
                         (b"\xff\xfe", "invalid UTF-8 byte 0xff at byte offset")]:
        path.write_bytes(b"\n".join([lines[0], bad, *lines[2:]]))
        for read in (lambda: metrics_log.read_metrics(path), lambda: report_run.read_metrics(tmp_path)):
            with pytest.raises(UserError) as raised:
                read()
            message = str(raised.value)
            assert message.startswith(str(path)) and "line 2" in message and problem in message, message
        # the same line, last and with its line break: written whole, so not a kill's cut
        path.write_bytes(b"\n".join([*lines[:2], bad, b""]))
        with pytest.raises(UserError, match="line 3"):
            metrics_log.read_metrics(path)


def test_resume_after_a_kill_mid_line_drops_that_line_with_a_warning(cohort, cohort_index, tmp_path,
                                                                     monkeypatch):
    """A job SIGKILLed (a SLURM hard requeue) while appending to metrics.jsonl leaves a cut-short last
    line; before, the resumed run died on it (json.JSONDecodeError: Unterminated string, in
    MetricsWriter.__init__) at every requeue."""
    from test_train import _patch_step, tiny_cfg

    from dinov2_patho.train import trainer as trainer_mod

    class Killed(Exception):
        pass

    def kill(step, losses):
        if state["armed"] and step == 2:
            raise Killed

    state = {"armed": True}
    _patch_step(monkeypatch, kill)
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=4", "checkpoint.every_n_iterations=1",
                   "train.num_workers=0")
    with pytest.raises(Killed):
        trainer_mod.run_training(cfg, tmp_path)
    path = tmp_path / metrics_log.METRICS_FILE
    whole = path.read_bytes()
    path.write_bytes(whole + whole.split(b"\n")[1][:30])  # the kill cut the record of iteration 2
    report = report_run.read_metrics(tmp_path)
    assert report.columns["iteration"].tolist() == [0, 1]
    assert report.notes == [f"{path}: last line 3 is incomplete (a run killed while writing it); left out"]

    state["armed"] = False
    result = trainer_mod.run_training(cfg, tmp_path)
    assert result["start_iteration"] == 2 and result["iteration"] == 4
    assert f"WARNING [rank0] dinov2_patho.jsonfile: {path}: last line 3 is incomplete" in \
        (tmp_path / "log.txt").read_text()
    records = metrics_log.read_metrics(path)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert path.read_bytes().startswith(whole) and path.read_bytes().endswith(b"}\n")


def test_report_and_trainer_read_the_same_records(tmp_path):
    records = metrics_log.read_metrics(_metrics(tmp_path))
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert _columns(report_run.read_metrics(tmp_path)) == _as_read("metrics (report)", records)
