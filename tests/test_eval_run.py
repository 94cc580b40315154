import csv

import numpy as np
import pytest
from dinov2_patho.eval.runner import run_benchmarks
from PIL import Image

from dinov2_patho.cli import main

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
