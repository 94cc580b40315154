"""The run report and `tiles preview`: every panel from a real tiny run, one-line errors on bad input,
the tile grids' rows, and the page rendered in a real headless Chromium (console, screenshot, a click
on the map)."""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_train import _patch_step, tiny_cfg

from dinov2_patho.cli import main
from dinov2_patho.data import mosaic
from dinov2_patho.data.index import TileIndex
from dinov2_patho.errors import UserError
from dinov2_patho.eval.report import COLUMNS, write_tables
from dinov2_patho.report import batches, write_report
from dinov2_patho.report.figures import MAX_POINTS, downsample
from dinov2_patho.report.page import PANELS, Panel, render
from dinov2_patho.samplers import build_sampler
from dinov2_patho.train import trainer as trainer_mod

ITERATIONS = 6
MAP_POINTS = 120


class _Page(HTMLParser):
    """Sections by id, with the tags and attributes inside each, and every src/href of the page."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, list[tuple[str, dict]]] = {}
        self.urls: list[str] = []
        self._section: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = []
        elif self._section is not None:
            self.sections[self._section].append((tag, attrs))
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v is not None]

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None

    def tags(self, section: str, tag: str) -> list[dict]:
        return [a for t, a in self.sections[section] if t == tag]


def parse(path: Path) -> tuple[_Page, str]:
    text = path.read_text()
    page = _Page()
    page.feed(text)
    return page, text


def map_data(text: str) -> dict:
    match = re.search(r'<script type="application/json" id="map-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("<!-/>scriptSCRIPT\\ u"), max_size=20), min_size=1,
                max_size=4))
def test_map_data_holds_no_markup_whatever_its_strings(values):
    # a slide id `<!--<script>` once made the parser swallow the page's own script after the map
    panel = Panel("embedding")
    panel.embedding_map({"x": [0.0], "y": [0.0], "method": "pca", "colorings": {"slide": values}})
    page = render("t", "s", {"embedding": panel})
    payload = re.search(r'id="map-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in payload
    assert map_data(page)["colorings"]["slide"] == values
    assert page.count("<script") == 2 and page.endswith("</script></body></html>\n")


@pytest.fixture(scope="module")
def run_dir(cohort, cohort_index, tmp_path_factory) -> Path:
    """A real tiny run asked to stop during iteration 3 (checkpoint at 4), resumed to 6; eval results."""
    out = tmp_path_factory.mktemp("report_run") / "run"
    cfg = tiny_cfg(cohort, cohort_index, f"train.iterations={ITERATIONS}", "train.num_workers=0",
                   "checkpoint.every_n_iterations=100")

    def preempt(step, losses):
        if step == 3:
            trainer_mod.request_stop()

    with pytest.MonkeyPatch.context() as mp:
        _patch_step(mp, preempt)
        assert trainer_mod.run_training(cfg, out)["stopped"]
    assert not trainer_mod.run_training(cfg, out)["stopped"]
    rows = [{**dict.fromkeys(COLUMNS, ""), "benchmark": "synthetic", "head": "linear",
             "balanced_accuracy": 0.8125, "balanced_accuracy_std": 0.01, "macro_f1": 0.8, "auroc": 0.9,
             "n_train": 40, "n_eval": 20, "eval_split": "test"}]
    (out / "eval").mkdir()
    write_tables(rows, out / "eval")
    return out


@pytest.fixture(scope="module")
def embeddings(cohort_index, tmp_path_factory) -> Path:
    """An EMB_DIR as `curate embed` leaves it: random float16 [N, 16] aligned with the index rows, and
    manifest.json (written last, so its presence marks a finished run)."""
    emb_dir = tmp_path_factory.mktemp("emb")
    np.save(emb_dir / "embeddings.npy",
            np.random.default_rng(0).standard_normal((len(cohort_index), 16)).astype(np.float16))
    (emb_dir / "manifest.json").write_text(json.dumps({"num_rows": len(cohort_index), "dim": 16}))
    return emb_dir


@pytest.fixture(scope="module")
def report(run_dir, embeddings, cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    write_report(run_dir, out, embeddings=embeddings, metadata=cohort.metadata_csv, map_points=MAP_POINTS,
                 mosaic_clusters=2, tiles_per_cluster=3, batch_steps=5, progress=False)
    return out


# ---------------------------------------------------------------------------- structure


@pytest.mark.slow  # shares the module's real training run and report (setup 27 s on the loaded 2 cores)
def test_every_panel_is_there_and_nothing_is_fetched(report):
    page, text = parse(report)
    assert [key for key, _ in PANELS] == list(page.sections)
    assert len(page.tags("training", "img")) == 3  # losses, schedules, throughput
    assert page.tags("training", "details")  # the resolved config
    assert re.search(r"<td>started [\d:]+</td><td>at iteration 0,", text)
    assert re.search(r"<td>stopped \(requested\) [\d:]+</td><td>at iteration 4</td>", text)
    assert re.search(r"<td>resumed [\d:]+</td><td>at iteration 4,", text)
    assert "<td>checkpoints</td><td>iter_00000004, iter_00000006</td>" in text
    assert f"iterations logged</td><td>{ITERATIONS} (last {ITERATIONS - 1})" in text
    assert len(page.tags("batches", "img")) == 2  # telemetry as logged, and the replay vs uniform
    assert "uniform" in text and "trained: cluster_stratified" in text
    assert len(page.tags("tree", "img")) == 3  # sizes, largest and smallest clusters' mosaics
    assert page.tags("embedding", "canvas") and page.tags("embedding", "select")
    assert page.tags("evaluation", "table") and "81.25" in text
    assert page.urls and all(u.startswith(("data:image/", "#")) for u in page.urls)
    assert "http" not in " ".join(page.urls) and "<link" not in text
    assert not re.search(r"<script[^>]*\bsrc=", text)


@pytest.mark.slow  # shares the module's real training run and report (setup 27 s on the loaded 2 cores)
def test_map_points_carry_their_own_clusters_slides_and_tiles(report, cohort_index):
    data = map_data(report.read_text())
    rows = np.array(data["row"])
    assert len(rows) == MAP_POINTS == len(np.unique(rows)) == len(data["thumbs"]) == len(data["x"])
    assert all(t.startswith("data:image/jpeg;base64,") for t in data["thumbs"])
    for k, name in enumerate(cohort_index.level_names, 1):
        coloring = data["colorings"][name]
        values = cohort_index.cluster_values(k)[cohort_index.level(k)[rows]]
        assert [coloring["names"][c] for c in coloring["codes"]] == [str(v) for v in values]
    slides = [cohort_index.slide_names[s] for s in cohort_index.slides(TileIndex.ALL)[rows]]
    assert [data["slide_names"][s] for s in data["slide"]] == slides
    assert {"tissue", "tissue_diagnosis"} <= set(data["colorings"])
    assert data["method"] in ("PCA", "UMAP") and min(data["x"]) >= 0 and max(data["x"]) <= 1


# ---------------------------------------------------------------------------- bad and partial input


@pytest.mark.slow  # shares the module's real training run and report (setup 27 s on the loaded 2 cores)
def test_bad_input_is_one_line(run_dir, embeddings, cohort_index, tmp_path, capsys):
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        write_report(tmp_path, tmp_path / "r.html", progress=False)
    short = tmp_path / "short.npy"
    np.save(short, np.zeros((len(cohort_index) - 1, 4), np.float16))
    with pytest.raises(UserError, match=rf"{len(cohort_index) - 1:,} rows but the index .* has "
                                        rf"{len(cohort_index):,}"):
        write_report(run_dir, tmp_path / "r.html", embeddings=short, batch_steps=1, mosaic_clusters=1,
                     progress=False)
    unfinished = tmp_path / "emb"
    unfinished.mkdir()
    np.save(unfinished / "embeddings.partial.npy", np.load(embeddings / "embeddings.npy"))  # a killed run
    with pytest.raises(UserError, match="no embeddings.npy: not a `curate embed` folder, or it has not"):
        write_report(run_dir, tmp_path / "r.html", embeddings=unfinished, progress=False)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html"), "--level", "level_9",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "level 'level_9' does not exist" in err and "1..4" in err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow  # shares the module's real training run and report (setup 27 s on the loaded 2 cores)
def test_a_partial_run_gets_a_report_of_what_exists(run_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # killed while writing its fourth record: no config, no index, no checkpoints
    (partial / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    page, text = parse(write_report(partial, tmp_path / "r.html", progress=False))
    assert len(page.tags("training", "img")) == 3
    assert "last line 4 is incomplete" in text and "3 (last 2)" in text
    assert "no tile index" in text and "no embeddings given" in text
    (partial / "metrics.jsonl").write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(UserError, match="metrics.jsonl: line 2 is not a metrics record"):
        write_report(partial, tmp_path / "r.html", progress=False)


# ---------------------------------------------------------------------------- pieces


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=3 * MAX_POINTS))
def test_downsampled_buckets_bound_their_means(values):
    y = np.array(values)
    x, mean, lo, hi = downsample(np.arange(len(y)), y)
    assert len(x) == min(len(y), MAX_POINTS)
    assert (np.diff(x) > 0).all()
    assert (lo <= mean + 1e-6 * (1 + abs(mean))).all() and (mean <= hi + 1e-6 * (1 + abs(mean))).all()
    assert lo.min() == y.min() and hi.max() == y.max()


@settings(max_examples=25, deadline=None)
@given(level=st.integers(1, 4), per_group=st.integers(1, 30), chunk=st.integers(1, 300),
       seed=st.integers(0, 9), pick=st.integers(1, 4))
def test_cluster_rows_are_distinct_members_of_their_cluster(cohort_index, monkeypatch_module, level,
                                                            per_group, chunk, seed, pick):
    monkeypatch_module.setattr(mosaic, "_SCAN_CHUNK", chunk)  # merge across many chunks
    sizes = cohort_index.cluster_sizes(level)
    codes = np.random.default_rng(seed).permutation(np.flatnonzero(sizes))[:pick]
    groups = mosaic.cluster_groups(cohort_index, level, codes, per_group, seed)
    column = cohort_index.level(level)
    for code, group in zip(codes, groups):
        assert len(group.row_ids) == min(per_group, sizes[code]) == len(np.unique(group.row_ids))
        assert (column[group.row_ids] == code).all()
        assert f"{sizes[code]:,} tiles" in group.label
    again = mosaic.cluster_groups(cohort_index, level, codes, per_group, seed)
    assert all(np.array_equal(a.row_ids, b.row_ids) for a, b in zip(groups, again))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("batch", [7, 64])
def test_replayed_coverage_and_per_batch_measures(cohort_index, batch):
    n = len(cohort_index)
    steps = -(-n // batch) + 2
    sampler = build_sampler({"name": "uniform", "seed": 3}, cohort_index, batch)
    uniform = batches.replay(sampler, "u", 4, steps, progress=False)
    # one reshuffled pass covers each row once: exactly t * B rows after t batches, all after ceil(N / B)
    expected = np.minimum(np.arange(1, steps + 1) * batch, n) / n
    np.testing.assert_allclose(uniform.tile_coverage, expected)
    assert uniform.summary["batches"] == steps
    k = int((cohort_index.cluster_sizes(2) > 0).sum())
    stratified = batches.replay(build_sampler({"name": "cluster_stratified", "seed": 3, "level": 2},
                                              cohort_index, batch), "s", 2, steps, progress=False)
    # every batch spreads over min(K, B) clusters of its level, within one tile of equal shares
    assert all(b["clusters"] == min(k, batch) for b in stratified.per_batch)
    assert all(b["per_cluster_max"] - b["per_cluster_min"] <= 1 for b in stratified.per_batch)
    assert np.all(np.diff(stratified.cluster_coverage) >= 0) and stratified.cluster_coverage[-1] <= 1


def test_replay_of_a_subset_run_draws_from_its_data_subset(cohort_index, tmp_path):
    """A run trained on `data.subset` is replayed over that view, as the trainer drew it, and the
    uniform comparison over the whole index."""
    slides = cohort_index.slides(TileIndex.ALL)
    rows = np.flatnonzero(slides == slides[0])[::2]  # half the tiles of one slide
    np.save(tmp_path / "rows.npy", rows)
    batch = 4
    steps = -(-len(rows) // batch)
    replays, notes = batches.compare_samplers(cohort_index, {"name": "uniform", "seed": 1}, batch, 2, steps,
                                              progress=False, subset=str(tmp_path / "rows.npy"))
    assert not notes
    trained, uniform = replays
    assert all(b["slides"] == 1 for b in trained.per_batch)
    assert trained.tile_coverage[-1] == 1.0  # one pass over the subset's rows, not the index's
    assert uniform.tile_coverage[-1] == pytest.approx(steps * batch / len(cohort_index))
    replays, notes = batches.compare_samplers(cohort_index, {"name": "uniform"}, batch, 2, steps,
                                              progress=False, subset=str(tmp_path / "absent.npy"))
    assert [r.name for r in replays] == ["uniform"] and "absent.npy" in notes[0]


def test_largest_and_smallest_do_not_overlap():
    sizes = np.array([5, 0, 9, 1, 3, 7])
    largest, smallest = mosaic.largest_and_smallest(sizes, 2)
    assert largest.tolist() == [2, 5] and smallest.tolist() == [3, 4]
    largest, smallest = mosaic.largest_and_smallest(sizes, 4)
    assert largest.tolist() == [2, 5, 0, 4] and smallest.tolist() == [3]


@pytest.mark.parametrize("by", ["random", "slide", "cluster"])
def test_tiles_preview_draws_rows_by_slide_cluster_or_random(cohort, cohort_index, tmp_path, capsys, by):
    out = tmp_path / "grid.png"
    assert main(["tiles", "preview", "--index", str(cohort_index.path), "--slides", str(cohort.slides_dir),
                 "--out", str(out), "--by", by, "--rows", "3", "--cols", "4", "--tile-px", "32",
                 "--level", "level_4", "--no-progress"]) == 0
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (3 * 34, mosaic._LABEL_PX + 4 * 34, 3)
    tiles = image[:, mosaic._LABEL_PX:]
    assert tiles.std() > 10  # tissue, not blank
    assert f"3 rows, 12 tiles by {by}" in capsys.readouterr().out


def test_tiles_preview_rejects_an_unknown_cluster(cohort, cohort_index, tmp_path, capsys):
    assert main(["tiles", "preview", "--index", str(cohort_index.path), "--slides", str(cohort.slides_dir),
                 "--out", str(tmp_path / "g.png"), "--by", "cluster", "--cluster", "999",
                 "--no-progress"]) == 2
    assert "--cluster 999: no such cluster at level_4" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a real browser


@pytest.fixture(scope="module")
def chromium() -> str:
    from chromium import ChromiumUnavailable, find_chromium

    try:
        return find_chromium()
    except ChromiumUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.slow  # shares the module's real training run and report (setup 27 s on the loaded 2 cores)
def test_report_renders_in_chromium_and_a_click_shows_the_tile(report, chromium):
    from chromium import Browser

    with Browser(chromium) as browser:
        browser.open(report)
        assert browser.evaluate("window.reportMap.count") == MAP_POINTS
        browser.evaluate("document.getElementById('map').scrollIntoView()")
        i = 7
        point = browser.evaluate(f"window.reportMap.position({i})")
        browser.click(point["x"], point["y"])
        pinned = browser.evaluate("window.reportMap.pinned()")
        shown = browser.evaluate("(function(){var im=document.getElementById('map-tile-img');"
                                 "return [im.src.slice(0, 23), im.naturalWidth, im.style.visibility,"
                                 "document.getElementById('map-tile-info').textContent];})()")
        shot = Image.open(io.BytesIO(browser.screenshot(full_page=True))).convert("L")
        errors = browser.errors
    data = map_data(report.read_text())
    assert errors == []
    # the click landed on point i, or on one drawn within 8 px of it
    assert pinned >= 0 and np.hypot(data["x"][pinned] - data["x"][i], data["y"][pinned] - data["y"][i]) < 0.03
    assert shown[:3] == ["data:image/jpeg;base64,", 64, "visible"]
    assert f"row {data['row'][pinned]}\n" in shown[3]
    pixels = np.asarray(shot)
    assert shot.height > 2000 and pixels.std() > 20  # the whole page, with figures on it
