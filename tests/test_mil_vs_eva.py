"""benchmarks/mil_vs_eva.py without eva (never a CI dependency): the Gaussian bags, the bag files
eva's MultiEmbeddingsClassificationDataset reads, and our attention-MIL head on the quick task."""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mil_vs_eva.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # as when run: the script imports its neighbour eva_session
    try:
        spec = importlib.util.spec_from_file_location("mil_vs_eva", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 12), low=st.integers(4, 10), extra=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_gaussian_bags_are_balanced_sized_and_seeded(bench, n, low, extra, seed):
    sizes = {"train": n, "val": n + 1, "test": n + 2}
    bags, _ = bench.gaussian_bags(sizes, dim=8, length=(low, low + extra), witnesses=(0, 2), seed=seed)
    again, _ = bench.gaussian_bags(sizes, dim=8, length=(low, low + extra), witnesses=(0, 2), seed=seed)
    for split, count in sizes.items():
        xs, y = bags[split]
        assert len(xs) == len(y) == count
        assert int(y.sum()) == count // 2  # half of the bags positive, the odd one negative
        assert all(x.dtype == np.float32 and x.shape[1] == 8 and low <= len(x) <= low + extra for x in xs)
        assert all(np.array_equal(a, b) for a, b in zip(xs, again[split][0]))


def test_witnesses_are_planted_in_positive_bags_only(bench):
    # one witness far along the planted direction in every positive bag: the reference ranks perfectly
    _, reference = bench.gaussian_bags({"test": 40}, dim=16, witnesses=(1, 1), shift=50.0)
    assert reference == 1.0
    _, blind = bench.gaussian_bags({"test": 400}, dim=16, witnesses=(0, 0), shift=50.0)
    assert 0.4 < blind < 0.6  # no witness anywhere: nothing to find


def test_eva_bag_files_hold_each_bag_once(bench, tmp_path):
    bags, _ = bench.gaussian_bags({"train": 4, "val": 3, "test": 3}, dim=8, length=(2, 9), seed=1)
    pad = bench.write_eva_bags(bags, tmp_path)
    with open(tmp_path / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows] == ["train"] * 4 + ["val"] * 3 + ["test"] * 3
    assert len({r["wsi_id"] for r in rows}) == len(rows)  # eva groups a bag's files by wsi_id
    for split, (xs, y) in bags.items():
        mine = [r for r in rows if r["split"] == split]
        for x, label, row in zip(xs, y, mine, strict=True):
            assert int(row["target"]) == label
            assert torch.equal(torch.load(tmp_path / row["embeddings"]), torch.from_numpy(x))
    assert pad == max(len(x) for xs, _ in bags.values() for x in xs)


def test_eva_driver_is_valid_python(bench):
    compile(bench.EVA_DRIVER, "eva_driver", "exec")


def test_main_without_eva_reports_our_head_and_skips_eva(bench, tmp_path, capsys, monkeypatch):
    # the benchmark's main on the small, clear task (its own 400-bag task takes a minute on a busy CPU)
    gaussian_bags = bench.gaussian_bags
    monkeypatch.setattr(bench, "gaussian_bags", lambda sizes: gaussian_bags(
        {"train": 120, "val": 60, "test": 200}, dim=32, length=(8, 24), witnesses=(1, 3), seed=0))
    assert bench.main(["--quick", "--runs", "1", "--eva-python", str(tmp_path / "absent")]) == 0
    out = capsys.readouterr().out
    assert "eva: not run" in out
    auroc = float(re.search(r"ours: test balanced accuracy [\d.]+ ± [\d.]+, AUROC ([\d.]+)", out).group(1))
    assert auroc > 90  # chance is 50
