"""The metadata baseline's draw (issue 18.3): per-slide runs give the same subset as the per-row pass,
values are drawn in proportion to equal total weight, and TileIndex.slide_runs matches slides()."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.data.index import TileIndex, build_index
from dinov2_patho.samplers.metadata import inverse_frequency_subset, inverse_frequency_subset_of_runs


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 5), st.integers(0, 40)), min_size=1, max_size=30),
       st.integers(0, 2**31), st.data())
def test_runs_draw_equals_per_row_draw(runs, seed, data):
    code = np.array([c for c, _ in runs])
    length = np.array([n for _, n in runs])
    start = np.r_[0, np.cumsum(length)[:-1]]
    per_row = np.repeat(code, length)
    eligible = int((per_row >= 0).sum())
    if eligible == 0:
        return
    target = data.draw(st.integers(1, eligible))
    subset = inverse_frequency_subset_of_runs(code, start, length, target, seed)
    assert np.array_equal(subset, inverse_frequency_subset(per_row, target, seed))
    assert len(np.unique(subset)) == target and (per_row[subset] >= 0).all()


def test_equal_weight_per_value_and_saturation():
    """Inverse-frequency weights: a value with fewer rows than its share is drawn whole; the others
    share the rest about equally (Efraimidis-Spirakis expectation, not a fixed split)."""
    sizes = np.array([100, 20_000, 60_000, 200_000])
    codes = np.repeat(np.arange(4), sizes)
    got = np.array([np.bincount(codes[inverse_frequency_subset(codes, 40_000, seed)], minlength=4)
                    for seed in range(5)])
    assert (got[:, 0] == 100).all()
    # ES with weights 1/f_c: rows of c drawn = f_c (1 - exp(-t / f_c)) at the threshold t; solve for t
    f = sizes.astype(float)
    lo, hi = 0.0, 1e7
    for _ in range(100):
        t = (lo + hi) / 2
        lo, hi = (t, hi) if (f * -np.expm1(-t / f)).sum() < 40_000 else (lo, t)
    expected = f * -np.expm1(-t / f)
    assert np.all(np.abs(got.mean(0) - expected) < 0.02 * expected + 5)


def test_slide_runs_match_slides(tmp_path):
    rows = [(s, 224 * i, 0, i % 3) for s, n in (("a", 5), ("c", 7), ("d", 3)) for i in range(n)]
    csv = tmp_path / "c.csv"
    for name, order in (("grouped", rows), ("mixed", rows[1:] + rows[:1])):  # mixed: slide a twice apart
        lines = "".join(f"{s},{x},{y},{k}\n" for s, x, y, k in order)
        csv.write_text("slide_id,tile_x,tile_y,level_1\n" + lines)
        index = build_index(csv, tmp_path / name, progress=False)
        if name == "mixed":
            assert not index.grouped_by_slide and index.slide_runs() is None
            continue
        assert index.grouped_by_slide
        for view in (index, index.select(np.array([1, 2, 6, 7, 8, 14]))):
            start, length = view.slide_runs()
            assert np.array_equal(np.repeat(np.arange(len(start)), length), view.slides(TileIndex.ALL))
            assert np.array_equal(start, np.r_[0, np.cumsum(length)[:-1]])
