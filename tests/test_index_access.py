"""Bounded access to a TileIndex (chunks, positions, batch lookup) and the bounded sampler strata cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dinov2_patho.cli import main
from dinov2_patho.data.index import TileIndex, build_index
from dinov2_patho.samplers import SamplerError, build_sampler
from dinov2_patho.samplers.strata import build_strata, cache_entries, clear_cache, load_or_build

_settings = settings(max_examples=25, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


def _view(index, data) -> object:
    """The full index, or a random sorted subset of it."""
    if data.draw(st.booleans(), label="full"):
        return index
    keep = data.draw(st.lists(st.booleans(), min_size=len(index), max_size=len(index)), label="keep")
    return index.select(np.flatnonzero(keep))


def _columns(view, positions) -> list[np.ndarray]:
    """row ids, slides, x, y of these view positions."""
    return [view.row_ids(positions), view.slides(positions), *view.coords(positions)]


@pytest.fixture(scope="module")
def ungrouped(tmp_path_factory) -> TileIndex:
    """A small index whose slides interleave: a per-row slide column, not slide offsets."""
    rng = np.random.default_rng(1)
    csv = tmp_path_factory.mktemp("ungrouped") / "tiles.csv"
    rows = [f"s{i % 3},{224 * i},{rng.integers(0, 10**6)},{rng.integers(0, 5)}" for i in range(90)]
    csv.write_text("slide_id,tile_x,tile_y,level_1\n" + "\n".join(rows) + "\n")
    index = build_index(csv, csv.parent / "index", progress=False)
    assert not index.grouped_by_slide
    return index


@pytest.mark.parametrize("accessor", ["row_ids", "slides", "coords"])
def test_a_whole_column_must_be_asked_for(cohort_index, accessor):
    for index in (cohort_index, cohort_index.select(np.arange(0, len(cohort_index), 3))):
        with pytest.raises(TypeError, match="positions"):
            getattr(index, accessor)()


@_settings
@given(data=st.data(), size=st.integers(1, 400), grouped=st.booleans())
def test_chunks_concatenate_to_the_explicit_full_columns(cohort_index, ungrouped, data, size, grouped):
    view = _view(cohort_index if grouped else ungrouped, data)
    chunks = list(view.chunks(size))
    n = len(view)
    assert [(c.start, c.stop) for c in chunks] == [(a, min(a + size, n)) for a in range(0, n, size)]
    whole = _columns(view, TileIndex.ALL)
    assert [len(col) for col in whole] == [n] * 4
    for parts, want in zip(zip(*(_columns(view, c) for c in chunks)), whole):
        np.testing.assert_array_equal(np.concatenate(parts), want)


@_settings
@given(data=st.data(), grouped=st.booleans())
def test_selections_read_the_rows_of_the_explicit_full_columns(cohort_index, ungrouped, data, grouped):
    """Position arrays (negative too), slices (any start, stop, step) and a selection read in two pieces."""
    view = _view(cohort_index if grouped else ungrouped, data)
    n = len(view)
    pos = np.array(data.draw(st.lists(st.integers(-n, n - 1), max_size=50), label="positions") if n else [],
                   dtype=np.int64)
    bound = st.none() | st.integers(-n - 3, n + 3)
    part = slice(data.draw(bound, label="start"), data.draw(bound, label="stop"),
                 data.draw(st.sampled_from([None, 1, 2, 7, -1, -3]), label="step"))
    cut = data.draw(st.integers(0, len(pos)), label="cut")
    whole = _columns(view, TileIndex.ALL)
    for got, want in zip(_columns(view, pos), whole):
        np.testing.assert_array_equal(got, want[pos])
    for got, want in zip(_columns(view, part), whole):
        np.testing.assert_array_equal(got, want[part])
    for head, tail, want in zip(_columns(view, pos[:cut]), _columns(view, pos[cut:]), whole):
        np.testing.assert_array_equal(np.concatenate([head, tail]), want[pos])


def test_position_out_of_range_is_an_index_error(cohort_index):
    with pytest.raises(IndexError, match="out of range"):
        cohort_index.row_ids(np.array([len(cohort_index)]))
    with pytest.raises(IndexError, match="out of range"):
        cohort_index.tiles(np.array([0, len(cohort_index)]))


@_settings
@given(picks=st.lists(st.integers(0, 10**9), max_size=40))
def test_batch_lookup_equals_tile_per_row(cohort_index, picks):
    rows = np.array(picks, dtype=np.int64) % len(cohort_index)
    slides, xs, ys = cohort_index.tiles(rows)
    got = [(cohort_index.slide_names[s], int(x), int(y)) for s, x, y in zip(slides, xs, ys)]
    assert got == [cohort_index.tile(int(r)) for r in rows]


def _entry(cache, labels_seed: int, keep: int):
    labels = np.random.default_rng(labels_seed).integers(0, 5, 200)
    return load_or_build(cache, {"labels": labels, "num_labels": 5},
                         lambda: build_strata(200, 5, lambda a, b: labels[a:b]), keep)


def test_strata_cache_keeps_the_most_recently_used(tmp_path):
    cache = tmp_path / ".sampler_cache"
    for seed in range(5):
        _entry(cache, seed, keep=3)
        assert len(cache_entries(cache)) == min(seed + 1, 3)
    _entry(cache, 2, keep=3)  # a hit: entry 2 becomes the most recently used
    names = [e.name for e in cache_entries(cache)]
    _entry(cache, 9, keep=3)  # a build evicts the least recently used (entry 3), never entry 2
    after = [e.name for e in cache_entries(cache)]
    assert names[0] in after and names[-1] not in after and len(after) == 3


def test_strata_cache_clear_and_list_from_the_cli(tmp_path, capsys):
    index = tmp_path / "index"
    cache = index / ".sampler_cache"
    _entry(cache, 0, keep=4)
    _entry(cache, 1, keep=4)
    assert main(["sampler", "cache", "--index", str(index), "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(e.name in listed for e in cache_entries(cache)) and "MiB" in listed
    assert main(["sampler", "cache", "--index", str(index), "--clear"]) == 0
    assert "removed 2" in capsys.readouterr().out
    assert cache_entries(cache) == [] and clear_cache(cache) == 0
    assert main(["sampler", "cache", "--index", str(tmp_path / "absent"), "--list"]) == 2


class _CoordSource:
    """A tile whose pixels spell out (slide, x, y) read, so a misplaced lookup shows."""

    def __init__(self, slide_names: list[str]):
        self.code = {name: i for i, name in enumerate(slide_names)}

    def read(self, slide_id: str, x: int, y: int) -> np.ndarray:
        tile = np.zeros((224, 224, 3), np.uint8)
        tile[0, :3, 0] = self.code[slide_id] % 256, x % 256, y % 256
        tile[0, :3, 1] = self.code[slide_id] // 256, x // 256 % 256, y // 256 % 256
        return tile


@_settings
@given(picks=st.lists(st.integers(0, 10**9), min_size=1, max_size=16))
def test_dataset_batch_equals_items_one_by_one(cohort_index, picks):
    from dinov2_patho.data.dataset import TileDataset

    ds = TileDataset(cohort_index, _CoordSource(cohort_index.slide_names))
    rows = [p % len(cohort_index) for p in picks]
    batch = ds.__getitems__(rows)
    assert [row for _, row in batch] == rows
    for (tensor, _), expected in zip(batch, rows):
        slide, x, y = cohort_index.tile(expected)
        want = _CoordSource(cohort_index.slide_names).read(slide, x, y)
        np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), want)


def test_sampler_keeps_cache_keep_entries_and_rejects_zero(cohort_index, tmp_path):
    shutil.copytree(cohort_index.path, tmp_path / "index", ignore=shutil.ignore_patterns(".sampler_cache"))
    index = TileIndex.open(tmp_path / "index")
    for level in range(1, index.num_levels + 1):
        build_sampler({"name": "cluster_stratified", "level": level, "cache_keep": 1}, index, 8)
        assert len(cache_entries(tmp_path / "index" / ".sampler_cache")) == 1
    with pytest.raises(SamplerError, match=r"sampler\.cache_keep=0: must be an integer >= 1"):
        build_sampler({"name": "cluster_stratified", "level": 1, "cache_keep": 0}, index, 8)
