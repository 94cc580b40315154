"""Consumers of a TileIndex hold one chunk of its per-row columns, never a whole one (issue 18 item 5).

numpy's allocations are traced by tracemalloc (memory-mapped files are not): each consumer runs over an
index of 2**20 rows read in chunks of 2**13, and its peak (or what it keeps) is compared with the bytes
of the whole column it used to build, whatever that is for this index.
"""

from __future__ import annotations

import csv
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dinov2_patho.curation import embed
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.index import tile_index as index_module
from dinov2_patho.data.index.format import (
    SLIDE_OFFSETS,
    SLIDES,
    UINT24,
    XY,
    LevelMeta,
    Manifest,
    encode_xy,
    level_file,
    level_sizes_file,
)
from dinov2_patho.data.tilestore import _slide_coords
from dinov2_patho.samplers import build_sampler

ROWS, NUM_SLIDES, CLUSTERS, CHUNK = 1 << 20, 4096, 62, 1 << 13


@pytest.fixture(scope="module")
def big_index(tmp_path_factory) -> TileIndex:
    """A slide-grouped index written straight in the on-disk format (an ingest of the CSV takes seconds)."""
    root = tmp_path_factory.mktemp("big") / "index"
    root.mkdir()
    rng = np.random.default_rng(0)
    counts = rng.multinomial(ROWS, np.full(NUM_SLIDES, 1 / NUM_SLIDES))
    np.save(root / SLIDE_OFFSETS, np.concatenate(([0], np.cumsum(counts))))
    (root / SLIDES).write_text(json.dumps([f"slide{i}" for i in range(NUM_SLIDES)]))
    np.save(root / XY, encode_xy(UINT24, rng.integers(0, 50_000, ROWS), rng.integers(0, 50_000, ROWS)))
    level = rng.integers(0, CLUSTERS, ROWS).astype(np.uint8)
    np.save(root / level_file(1), level)
    np.save(root / level_sizes_file(1), np.bincount(level, minlength=CLUSTERS))
    Manifest(num_rows=ROWS, num_slides=NUM_SLIDES, grouped_by_slide=True, coords=UINT24, slide_dtype=None,
             levels=[LevelMeta("level_1", CLUSTERS, "uint8", False)], level_names=["level_1"],
             source="tests/test_index_memory.py", duplicates_dropped=0).write(root)
    return TileIndex.open(root)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(index_module, "_ROW_CHUNK", CHUNK)


def _traced(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """fn's result, the peak of the allocations while it ran, and what stays allocated with its result;
    from a second run, so one-off imports (numpy.ma on a first np.unique) are not counted."""
    fn()
    tracemalloc.start()
    try:
        out = fn()
        kept, peak = tracemalloc.get_traced_memory()
        return out, peak, kept
    finally:
        tracemalloc.stop()


def test_tile_store_coordinates_of_a_slide_take_a_chunk(big_index, small_chunks):
    name = big_index.slide_names[NUM_SLIDES // 2]
    slide_column = big_index.slides(TileIndex.ALL).nbytes
    got, peak, _ = _traced(lambda: _slide_coords(big_index, [name]))
    x, y = big_index.select_slides([name]).coords(TileIndex.ALL)
    keys = np.unique((y.astype(np.int64) << 32) | x)
    assert list(got) == [name]
    np.testing.assert_array_equal(got[name], np.stack([keys & 0xFFFFFFFF, keys >> 32], 1))
    assert peak < slide_column / 4, f"peak {peak:,} B for a {slide_column:,}-byte slide column"


def test_embedding_slide_ranges_take_a_chunk(big_index, small_chunks, tmp_path):
    out = tmp_path / "emb"

    def finish() -> None:  # of a finished single-rank run
        (out / embed.PROGRESS).mkdir(parents=True)
        (out / embed.PROGRESS / f"rows_0_{ROWS}.json").write_text(json.dumps({"rows": ROWS}))
        (out / embed.PARTIAL).write_bytes(b"")
        (out / embed.RUN).write_text("{}")
        embed._finish(out, big_index, {"tiles": {"num_rows": ROWS}, "dim": 1}, 1)

    slide_column = big_index.slides(TileIndex.ALL).nbytes
    _, peak, _ = _traced(finish)
    with open(out / embed.SLIDES, newline="") as f:
        got = [(r["slide_id"], int(r["start_row"]), int(r["end_row"])) for r in csv.DictReader(f)]
    start, length = big_index.slide_runs()
    assert got == [(big_index.slide_names[s], int(start[s]), int(start[s] + length[s]))
                   for s in np.flatnonzero(length)]
    assert peak < slide_column / 4, f"peak {peak:,} B for a {slide_column:,}-byte slide column"


def test_slide_capped_sampler_keeps_no_slide_column(big_index, small_chunks):
    """The cap's strata are cached next to the index and memory-mapped, so what the sampler keeps
    allocated is its per-stratum state, not a per-row column."""
    spec = {"name": "cluster_stratified", "level": 1, "max_slides_per_epoch": 800, "cache": True}
    slide_column = big_index.slides(TileIndex.ALL).nbytes
    sampler, _, kept = _traced(lambda: build_sampler(spec, big_index, 64))  # the first run caches the strata
    summary = sampler.telemetry(sampler.next_batch())
    assert summary["slides"] <= 64
    assert kept < slide_column / 4, f"kept {kept:,} B for a {slide_column:,}-byte slide column"

