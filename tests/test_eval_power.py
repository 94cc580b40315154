"""eval.power: slide-resampled intervals, paired differences, minimum detectable effects."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.eval.metrics import balanced_accuracy
from dinov2_patho.eval.power import (
    bootstrap_balanced_accuracy,
    minimum_detectable_effect,
    paired_bootstrap_difference,
    paired_seed_differences,
)


@st.composite
def scored_tiles(draw):
    n = draw(st.integers(4, 60))
    classes = draw(st.integers(2, 4))
    y = np.array(draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)))
    pred = np.array(draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)))
    groups = np.array(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)))
    return y, pred, groups, classes


@settings(max_examples=60, deadline=None)
@given(scored_tiles())
def test_the_point_estimate_is_balanced_accuracy_and_lies_in_its_interval(data):
    y, pred, groups, classes = data
    ci = bootstrap_balanced_accuracy(y, pred, groups, classes, n_boot=200)
    assert ci.value == pytest.approx(balanced_accuracy(y, pred, classes))
    assert ci.low <= ci.high and ci.se >= 0


@settings(max_examples=40, deadline=None)
@given(scored_tiles())
def test_a_backbone_against_itself_differs_by_exactly_zero(data):
    y, pred, groups, classes = data
    diff = paired_bootstrap_difference(y, pred, pred, groups, classes, n_boot=200)
    assert (diff.value, diff.low, diff.high, diff.se) == (0.0, 0.0, 0.0, 0.0)


def test_slides_are_resampled_whole():
    # 20 slides, each all right or all wrong: tiles are not independent, so the interval over slides
    # must be much wider than one that treats each tile as its own slide
    rng = np.random.default_rng(0)
    slide_right = rng.random(20) < 0.7
    groups = np.repeat(np.arange(20), 50)
    y = rng.integers(0, 2, len(groups))
    pred = np.where(slide_right[groups], y, 1 - y)
    by_slide = bootstrap_balanced_accuracy(y, pred, groups, 2, n_boot=1000)
    by_tile = bootstrap_balanced_accuracy(y, pred, np.arange(len(y)), 2, n_boot=1000)
    assert by_slide.se > 4 * by_tile.se
    assert by_slide.low < by_slide.value < by_slide.high


def test_pairing_removes_what_slides_share():
    # b is a with 10 % of tiles flipped to wrong: the paired interval is tight around the true
    # difference even though each score alone varies a lot from slide to slide
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), 40)
    y = rng.integers(0, 3, len(groups))
    easy = rng.random(30)[groups]
    a = np.where(rng.random(len(y)) < easy, y, (y + 1) % 3)
    worse = (a == y) & (rng.random(len(y)) < 0.1)
    b = np.where(worse, (y + 2) % 3, a)
    diff = paired_bootstrap_difference(y, a, b, groups, 3, n_boot=1000)
    alone = bootstrap_balanced_accuracy(y, a, groups, 3, n_boot=1000)
    assert diff.low > 0 and diff.se < alone.se / 2


def test_minimum_detectable_effect():
    # (z_0.975 + z_0.8) = 1.960 + 0.842
    assert minimum_detectable_effect(1.0) == pytest.approx(2.8016, abs=1e-3)
    # with few seeds the t quantiles make it larger
    assert minimum_detectable_effect(1.0, dof=5) > minimum_detectable_effect(1.0, dof=50) > 2.80


def test_paired_seed_differences():
    d = paired_seed_differences([0.8, 0.7, 0.9], [0.6, 0.65, 0.85])
    assert d["n"] == 3 and d["all_positive"] and not d["all_negative"]
    assert d["mean"] == pytest.approx(0.1) and d["min"] == pytest.approx(0.05)
    assert d["low"] < d["mean"] < d["high"] and d["mde"] > 0
    assert not paired_seed_differences([0.1, 0.3], [0.2, 0.2])["all_positive"]
