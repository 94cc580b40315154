"""`curate tiles`: tissue found and background left out on a real slide and on the synthetic cohort
(against its ground-truth masks), unreadable slides reported and skipped, the tile list and its index."""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dinov2_patho.curation import cli as curate_cli
from dinov2_patho.curation import tissue
from dinov2_patho.data.index import TileIndex
from dinov2_patho.errors import UserError


def curate_tiles(slides: Path, out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    curate_cli.add_arguments(parser)
    args = ["tiles", "--slides", str(slides), "--out", str(out), "--no-progress", *extra]
    return curate_cli.run(parser.parse_args(args))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cmu_tiles(cmu_small_region, tmp_path_factory) -> Path:
    slides = tmp_path_factory.mktemp("cmu_slides")
    os.symlink(cmu_small_region, slides / cmu_small_region.name)  # the real file stays in shared/
    out = tmp_path_factory.mktemp("cmu") / "tiles"
    assert curate_tiles(slides, out, "tiles.workers=1") == 0
    return out


def test_real_slide_tiles_tissue_not_background(cmu_tiles, cmu_small_region):
    import openslide

    rows = read_rows(cmu_tiles / "tiles.csv")
    report = read_rows(cmu_tiles / "slides.csv")
    assert [r["status"] for r in report] == ["ok"] and int(report[0]["tiles"]) == len(rows)
    assert float(report[0]["mpp"]) == pytest.approx(0.499) and int(report[0]["tile_px"]) == round(112 / 0.499)
    slide = openslide.OpenSlide(str(cmu_small_region))
    w, h = slide.dimensions
    size = round(112 / 0.499)
    grid = {(x, y) for x in range(0, w - size + 1, size) for y in range(0, h - size + 1, size)}
    tiled = {(int(r["tile_x"]), int(r["tile_y"])) for r in rows}
    assert tiled < grid and 0.15 < len(tiled) / len(grid) < 0.7  # part of the grid, not none or all

    def mean_saturation(xy) -> float:
        region = slide.read_region(xy, 0, (size, size)).convert("RGB").convert("HSV")
        return float(np.asarray(region)[..., 1].mean())

    rng = np.random.default_rng(0)
    background = sorted(grid - tiled)
    picks_in = [sorted(tiled)[i] for i in rng.choice(len(tiled), 8, replace=False)]
    picks_out = [background[i] for i in rng.choice(len(background), 8, replace=False)]
    assert min(map(mean_saturation, picks_in)) > np.median([mean_saturation(p) for p in picks_out])
    # The top-left corner of this slide is bare glass (checked on the pixels, not assumed).
    assert mean_saturation((0, 0)) < 15 and (0, 0) not in tiled


def test_real_slide_index_matches_tile_list(cmu_tiles):
    rows = read_rows(cmu_tiles / "tiles.csv")
    index = TileIndex.open(cmu_tiles / "index")
    x, y = index.coords(TileIndex.ALL)
    assert index.num_levels == 0 and index.grouped_by_slide
    assert [(index.slide_names[s], int(a), int(b)) for s, a, b in zip(index.slides(TileIndex.ALL), x, y)] == \
        [(r["slide_id"], int(r["tile_x"]), int(r["tile_y"])) for r in rows]
    assert json.loads((cmu_tiles / "tiles.json").read_text())["tiles"] == len(rows)


@pytest.fixture(scope="module")
def cohort_tiles(cohort, tmp_path_factory) -> tuple[Path, Path]:
    """The cohort plus one unreadable slide (a text file named .svs); two worker processes."""
    slides = tmp_path_factory.mktemp("cohort_slides")
    for sid in cohort.slide_ids:
        os.symlink(cohort.slide_path(sid), slides / cohort.slide_path(sid).name)
    (slides / "BROKEN.svs").write_text("not a slide\n")
    out = tmp_path_factory.mktemp("cohort_tiles") / "tiles"
    assert curate_tiles(slides, out, "--workers", "2") == 0
    return slides, out


def test_cohort_tiles_agree_with_tissue_masks(cohort, cohort_tiles):
    _, out = cohort_tiles
    rows = read_rows(out / "tiles.csv")
    for sid in cohort.slide_ids:
        truth = np.asarray(Image.open(cohort.masks_dir / f"{sid}.png")) > 0  # one pixel per 224-px tile
        found = np.zeros_like(truth)
        for r in rows:
            if r["slide_id"] == sid:
                found[int(r["tile_y"]) // 224, int(r["tile_x"]) // 224] = True
        iou = (found & truth).sum() / (found | truth).sum()
        assert iou >= 0.95, (sid, iou)


def test_unreadable_slide_reported_and_skipped(cohort, cohort_tiles, capsys):
    slides, out = cohort_tiles
    report = {r["slide_id"]: r for r in read_rows(out / "slides.csv")}
    ids = sorted([*cohort.slide_ids, "BROKEN"])
    assert list(report) == ids  # registry order, every slide counted
    broken = report.pop("BROKEN")
    assert broken["status"] == "error" and "BROKEN.svs" in broken["reason"] and broken["tiles"] == "0"
    assert "\n" not in broken["reason"]
    assert all(r["status"] == "ok" and int(r["tiles"]) > 0 for r in report.values())
    rows = read_rows(out / "tiles.csv")
    order = [r["slide_id"] for r in rows]
    assert order == sorted(order) and "BROKEN" not in order  # contiguous, in registry order
    settings_ = json.loads((out / "tiles.json").read_text())
    assert settings_["slides_unreadable"] == 1 and settings_["slides_total"] == len(ids)
    assert settings_["tiles"] == len(rows) == sum(int(r["tiles"]) for r in report.values())


def test_summary_names_unreadable_slides(tmp_path, cohort, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    sid = cohort.slide_ids[0]
    os.symlink(cohort.slide_path(sid), slides / cohort.slide_path(sid).name)
    (slides / "empty.svs").write_bytes(b"")
    assert curate_tiles(slides, tmp_path / "out", "tiles.workers=1") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("unreadable slide empty: ")
    assert out[-1].startswith("curate tiles: 2 slides (1 ok, 1 unreadable and skipped), ")


def test_slide_without_mpp_names_the_curation_setting(tmp_path):
    import tifffile

    (tmp_path / "slides").mkdir()
    rgb = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "slides" / "nompp.tif", rgb, tile=(256, 256), photometric="rgb",
                     compression="jpeg", metadata=None)
    with pytest.raises(UserError, match="1 unreadable"):
        curate_tiles(tmp_path / "slides", tmp_path / "out", "tiles.workers=1")
    (reason,) = [r["reason"] for r in read_rows(tmp_path / "out" / "slides.csv")]
    assert "no microns-per-pixel" in reason and reason.endswith("set tiles.mpp_override")


def test_bad_input_is_one_line_naming_the_path(tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.csv.*neither a directory nor a CSV file"):
        curate_tiles(tmp_path / "nowhere.csv", tmp_path / "out")
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.svs").write_text("x")
    with pytest.raises(UserError, match=r"only_text: no tissue tile in any of 1 slides \(1 unreadable"):
        curate_tiles(tmp_path / "only_text", tmp_path / "out", "tiles.workers=1")
    assert not (tmp_path / "out" / "index").exists()
    with pytest.raises(UserError, match=r"^tiles\.thumbnail_px_per_tile=0: must be an integer >= 1$"):
        curate_tiles(tmp_path / "only_text", tmp_path / "out", "tiles.thumbnail_px_per_tile=0")


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 200), st.integers(20, 50), st.integers(10, 100), st.integers(10, 100),
       st.integers(0, 2**32 - 1))
def test_otsu_splits_two_tight_groups_between_them(low, gap, n_low, n_high, seed):
    rng = np.random.default_rng(seed)
    lows = np.clip(low + rng.integers(0, 4, n_low), 0, 255)
    highs = np.clip(low + 3 + gap + rng.integers(0, 4, n_high), 0, 255)
    t = tissue.otsu_threshold(np.concatenate([lows, highs]).astype(np.uint8))
    assert lows.max() <= t < highs.min()  # every value of the low group <= t, every high one above


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_tile_fractions_equal_block_means(rows, cols, px, seed):
    """With a whole number of thumbnail pixels per tile, each fraction is the mean of its block."""
    mask = np.random.default_rng(seed).random((rows * px, cols * px)) < 0.5
    frac = tissue.tile_fractions(mask, 224, cols * 224, rows * 224)
    assert frac.shape == (rows, cols)
    blocks = mask.reshape(rows, px, cols, px).mean((1, 3))
    np.testing.assert_allclose(frac, blocks)
