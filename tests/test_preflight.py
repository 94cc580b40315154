"""Preflight: slide problems are found before training starts, all of them, in one line; a tile
that fails later inside a DataLoader worker reaches the user as the same one line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import SMOKE, TINY, _env, tiny_cfg

from dinov2_patho.data.index import build_index
from dinov2_patho.data.preflight import CACHE_DIR, PreflightError, describe, preflight_slides
from dinov2_patho.data.readers import SlideTileSource, TileReadError
from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.errors import UserError
from dinov2_patho.train import trainer as trainer_mod


@pytest.fixture(scope="module")
def broken(cohort, tmp_path_factory):
    """The cohort with three broken slides: a text file named .tiff, one absent from the slide
    directory, one with a tile far outside its bounds (an extra CSV row)."""
    root = tmp_path_factory.mktemp("broken")
    not_a_slide, absent, out_of_bounds = cohort.slide_ids[1], cohort.slide_ids[3], cohort.slide_ids[6]
    slides = root / "slides"
    slides.mkdir()
    for sid in cohort.slide_ids:
        if sid == not_a_slide:
            (slides / f"{sid}.tiff").write_text("not a slide\n")
        elif sid != absent:
            os.symlink(cohort.slide_path(sid), slides / f"{sid}.tiff")
    rows = list(csv.reader(cohort.clusters_csv.read_text().splitlines()))
    rows.append([out_of_bounds, "100000", "0", *rows[1][3:]])
    (root / "clusters.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    index = build_index(root / "clusters.csv", root / "index", progress=False)
    return index, slides, {"not a slide": not_a_slide, "absent": absent, "outside": out_of_bounds}


def test_preflight_names_every_broken_slide_in_one_line(broken, cohort):
    index, slides, bad = broken
    problems, total = preflight_slides(index, SlideTileSource(SlideRegistry.from_dir(slides)), progress=False,
                                       cache=False)
    assert total == len(cohort.slide_ids)
    assert {p.slide_id: p.kind for p in problems} == {bad["not a slide"]: "cannot open",
                                                      bad["absent"]: "not in the registry",
                                                      bad["outside"]: "tiles outside the slide"}
    line = describe(problems, total)
    assert "\n" not in line and line.startswith(f"preflight: 3 of {total} slides cannot be trained on")
    assert all(sid in line for sid in bad.values())
    assert "x 0..100224" in line  # the far tile's right edge at the slide's own mpp (224 px at 0.5 mpp)


def test_a_clean_result_is_cached_and_a_changed_slide_is_checked_again(cohort, cohort_index, tmp_path,
                                                                       monkeypatch):
    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in cohort.slide_ids:
        os.symlink(cohort.slide_path(sid), slides / f"{sid}.tiff")
    opened: list[str] = []
    probe = SlideTileSource.probe
    monkeypatch.setattr(SlideTileSource, "probe", lambda self, sid: opened.append(sid) or probe(self, sid))

    def run():
        opened.clear()
        return preflight_slides(cohort_index, SlideTileSource(SlideRegistry.from_dir(slides)), progress=False)

    assert run() == ([], len(cohort.slide_ids)) and sorted(opened) == sorted(cohort.slide_ids)
    assert list((Path(cohort_index.path) / CACHE_DIR).glob("*.json"))
    assert run() == ([], len(cohort.slide_ids)) and opened == []  # cached
    (slides / f"{cohort.slide_ids[0]}.tiff").unlink()
    (slides / f"{cohort.slide_ids[0]}.tiff").write_text("now broken\n")
    problems, _ = run()
    assert opened and [p.slide_id for p in problems] == [cohort.slide_ids[0]]


def test_training_stops_before_the_model_is_built(broken, cohort, tmp_path, monkeypatch):
    index, slides, bad = broken
    monkeypatch.setattr(trainer_mod.Trainer, "_build_model", lambda self: pytest.fail("model built"))
    cfg = tiny_cfg(cohort, index, f"data.slides={slides}")
    with pytest.raises(PreflightError, match="3 of 8 slides cannot be trained on"):
        trainer_mod.run_training(cfg, tmp_path / "out")


def test_cli_reports_preflight_as_one_line_with_exit_2(broken, tmp_path):
    index, slides, bad = broken
    cmd = [sys.executable, "-m", "dinov2_patho", "train", "--config-file", str(SMOKE), "--output-dir",
           str(tmp_path / "out"), f"data.index={index.path}", f"data.slides={slides}", *TINY]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("dinov2-patho train: error: preflight: 3 of 8 slides")
    assert "Traceback" not in out.stderr


def _fail_reads_of(monkeypatch, slide_id: str) -> None:
    """Reads of one slide fail (in the forked DataLoader workers too); opening it still works."""
    read = SlideTileSource.read

    def flaky(self, sid, x, y):
        if sid == slide_id:
            raise TileReadError(sid, x, y, "openslide read failed: corrupt tile")
        return read(self, sid, x, y)

    monkeypatch.setattr(SlideTileSource, "read", flaky)


def test_a_worker_read_error_is_the_same_one_line(cohort, cohort_index, tmp_path, monkeypatch):
    _fail_reads_of(monkeypatch, cohort.slide_ids[2])
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=3", "train.num_workers=1")
    with pytest.raises(UserError) as info:
        trainer_mod.run_training(cfg, tmp_path / "raise")
    message = str(info.value)
    assert message.startswith(f"slide '{cohort.slide_ids[2]}', tile at level-0 (x=")
    assert message.endswith("openslide read failed: corrupt tile") and "\n" not in message
    # on_error=skip: the same failures are substituted, and training goes on
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=3", "train.num_workers=1", "data.on_error=skip")
    assert trainer_mod.run_training(cfg, tmp_path / "skip")["iteration"] == 3


def test_dry_run_reports_the_broken_slides_in_one_line(broken, cohort, tmp_path, capsys):
    from dinov2_patho.cli import main

    index, slides, bad = broken
    code = main(["train", "--config-file", str(SMOKE), "--output-dir", str(tmp_path / "out"), "--dry-run",
                 f"data.index={index.path}", f"data.slides={slides}", *TINY])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert len(err) == 1 and err[0].startswith("dinov2-patho train: error: preflight: 3 of 8 slides")
