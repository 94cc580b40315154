import csv

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dinov2_patho.cli import main
from dinov2_patho.errors import UserError
from dinov2_patho.eval.runner import group_folds, mean_over_folds, run_benchmarks

TINY = ["preprocess.size=28", "backbone.model.img_size=28", "heads.linear.n_runs=2",
        "heads.linear.max_steps=60", "heads.knn.k=[1,3]", "heads.logreg.C=[0.1,1.0]", "progress=false"]


def folder_benchmark(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for c, colour in (("pink", (230, 120, 200)), ("blue", (60, 60, 200))):
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_cli_writes_tables_and_plot_and_reuses_cached_features(tmp_path, capsys):
    folder_benchmark(tmp_path / "data" / "folder")
    out = tmp_path / "out"
    args = ["eval", "run", "--benchmarks", "folder", "--data-root", str(tmp_path / "data"),
            "--output-dir", str(out), *TINY]
    assert main(args) == 0
    assert "| folder | linear |" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [r["head"] for r in rows] == ["linear", "knn_k1", "knn_k3", "logreg"]
    assert all(r["eval_split"] == "test" and r["n_eval"] == "8" for r in rows)
    assert (out / "results.png").stat().st_size > 0 and (out / "results.md").is_file()
    cls = np.load(out / "features" / "folder" / "test" / "cls.npy")
    assert cls.shape == (8, 384)
    # a second run reads the cache: same features, same scores
    assert main(args) == 0
    assert list(csv.DictReader((out / "results.csv").read_text().splitlines())) == rows


def test_cli_missing_dataset_is_one_line_error(tmp_path, capsys):
    args = ["eval", "run", "--benchmarks", "mhist", "--data-root", str(tmp_path),
            "--output-dir", str(tmp_path / "o"), *TINY]
    assert main(args) == 2
    assert "mhist/annotations.csv" in capsys.readouterr().err


def test_run_benchmarks_on_the_synthetic_cohort(cohort, tmp_path):
    pytest.importorskip("dinov2_patho.data.readers")
    from dinov2_patho.models import build_backbone

    heads = {"linear": {"n_runs": 1, "max_steps": 30}, "knn": {"k": [5]}, "logreg": {"enabled": False}}
    cfg = {"datasets": {"synthetic": {"root": str(cohort.root), "max_tiles_per_split": 12}},
           "preprocess": {"size": 28}, "heads": heads, "progress": False, "plot": False}
    vit = build_backbone("vit_small", img_size=28)
    results = run_benchmarks(vit, ["synthetic"], cfg, tmp_path)
    res = results["synthetic"]
    assert res["classes"] == ["adipose", "mucus", "stroma", "tumor"] and res["eval_split"] == "test"
    assert 0.0 <= res["linear"]["balanced_accuracy"] <= 1.0 and set(res["knn"]) == {5}
    assert vit.training  # the trainer's model comes back in the mode it was in


# ---------------------------------------------------------------------------- cross-validation


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=3, max_size=200), st.integers(3, 6), st.integers(0, 2**31))
def test_group_folds_keep_each_group_in_one_fold_and_balance_groups(groups, folds, seed):
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    fold = group_folds(groups, folds, seed)
    assert fold.shape == groups.shape and fold.min() >= 0 and fold.max() < folds
    for g in np.unique(groups):
        assert len(np.unique(fold[groups == g])) == 1
    groups_per_fold = [len(np.unique(groups[fold == f])) for f in range(folds)]
    assert max(groups_per_fold) - min(groups_per_fold) <= 1 and sum(groups_per_fold) == n_groups
    np.testing.assert_array_equal(fold, group_folds(groups, folds, seed))


def test_mean_over_folds_averages_metrics_and_reports_the_spread_over_folds():
    folds = [{"linear": {"balanced_accuracy": 0.6, "balanced_accuracy_std": 0.5, "runs": [1, 2],
                         "per_class_recall": {"a": 1.0, "b": float("nan")}},
              "logreg": {"balanced_accuracy": 0.5, "C": 0.1, "sweep": {0.1: 0.4}}},
             {"linear": {"balanced_accuracy": 0.8, "balanced_accuracy_std": 0.5, "runs": [3],
                         "per_class_recall": {"a": 0.5, "b": 0.25}},
              "logreg": {"balanced_accuracy": 0.7, "C": 10.0, "sweep": {0.1: 0.6}}}]
    mean = mean_over_folds(folds)
    assert mean["linear"]["balanced_accuracy"] == pytest.approx(0.7)
    assert mean["linear"]["balanced_accuracy_std"] == pytest.approx(0.1)  # over folds, not within
    assert mean["linear"]["per_class_recall"] == pytest.approx({"a": 0.75, "b": 0.25})  # absent class skipped
    assert "runs" not in mean["linear"] and "C" not in mean["logreg"]
    assert mean["logreg"]["sweep"][0.1] == pytest.approx(0.5)


def test_run_benchmarks_cross_validates_by_slide(cohort, tmp_path):
    pytest.importorskip("dinov2_patho.data.readers")
    from dinov2_patho.models import build_backbone

    heads = {"linear": {"n_runs": 1, "max_steps": 30}, "knn": {"k": [5]}, "logreg": {"C": [1.0]}}
    cfg = {"datasets": {"synthetic": {"root": str(cohort.root), "max_tiles_per_split": 12}},
           "preprocess": {"size": 28}, "heads": heads, "progress": False, "plot": False,
           "cross_validation": {"folds": 4}}
    res = run_benchmarks(build_backbone("vit_small", img_size=28), ["synthetic"], cfg, tmp_path)["synthetic"]
    assert res["cv_folds"] == 4 and len(res["folds"]) == 4
    assert sum(res["sizes"].values()) == 36  # every tile of the three splits, in train, val or test
    for head in ("linear", "logreg"):
        scores = [f[head]["balanced_accuracy"] for f in res["folds"]]
        assert res[head]["balanced_accuracy"] == pytest.approx(np.mean(scores))
        assert res[head]["balanced_accuracy_std"] == pytest.approx(np.std(scores))
    assert "| synthetic | linear |" in (tmp_path / "results.md").read_text()


def test_cross_validation_needs_slides_per_image_and_enough_of_them(cohort, tmp_path):
    folder_benchmark(tmp_path / "data" / "folder")
    cfg = {"data_root": str(tmp_path / "data"), "cross_validation": {"folds": 3}, "progress": False}
    with pytest.raises(UserError, match="benchmark folder: cross_validation.folds needs the slide or"):
        run_benchmarks(torch.nn.Identity(), ["folder"], cfg, tmp_path / "o1")
    for folds in (9, 2, "four"):
        cfg = {"datasets": {"synthetic": {"root": str(cohort.root)}}, "cross_validation": {"folds": folds}}
        expected = rf"folds={folds!r} must be an integer between 3 and its number of slides/patients \(8\)"
        with pytest.raises(UserError, match=expected):
            run_benchmarks(torch.nn.Identity(), ["synthetic"], cfg, tmp_path / "o2")
