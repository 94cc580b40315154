"""The README's quick start: `make demo` runs `dinov2-patho demo`, the paper's method end to end
(long-tailed cohort -> curation -> stratified training -> re-curation -> stratified training again on
the re-curated tree -> tile and slide evaluation -> report)."""

import json

from dinov2_patho.cli import main

ARGS = ["--num-slides", "8", "--grid", "10", "--lesion-tiles", "4", "--no-progress", "train.iterations=4",
        "checkpoint.every_n_iterations=4", "train.num_workers=0"]


def test_demo_runs_the_whole_method_and_reports_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert printed.count("cpu_smoke training done: iteration 4 (4 run in") == 2  # both rounds
    table = (out / "comparison.md").read_text()
    assert table in printed
    # both trees scored at each of the cpu_smoke tree's 3 levels
    for embedding in ("random-init ViT-Ti", "round-1 teacher"):
        assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith(f"| {embedding} |")] \
            == ["1", "2", "3"]
    assert "4 cross-validation folds by slide" in table and "rare (mucus, necrosis)" in table
    # the headline probe carries its intervals, the paired difference and the detectable effect
    trained = next(line for line in table.splitlines() if line.startswith("| trained |"))
    assert trained.count("[") == 3 and "| trained − random_init | " in table and "80 % power" in table
    for name in ("trained", "random_init"):
        tiles = json.loads((out / "eval" / name / "results.json").read_text())["synthetic"]
        assert 0.0 <= tiles["linear"]["balanced_accuracy"] <= 1.0
        assert set(tiles["linear"]["per_class_recall"]) == {"adipose", "mucus", "necrosis", "stroma", "tumor"}
        slides = json.loads((out / "eval" / name / "slide" / "results.json").read_text())["synthetic"]
        assert 0.0 <= slides["abmil"]["auroc"] <= 1.0
    # round 1 trained on the first curation's tree, round 2 on the tree its teacher re-curated
    for run, tree in (("round_1", "curation"), ("round_2", "recuration")):
        config = (out / run / "config.yaml").read_text()
        assert str(out / tree / "clusters" / "index") in config and "cluster_stratified" in config
    assert "recuration" not in (out / "round_1" / "config.yaml").read_text()
    records = [json.loads(line) for line in (out / "round_2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "eval_iteration" not in r] == [0, 1, 2, 3]
    # the learning curve's first point, the initialisation's kNN on held-out slides
    curve = [r for r in records if "eval_iteration" in r]
    assert [r["eval_iteration"] for r in curve] == [0] and 0 < curve[0]["eval/synthetic/knn_20"] <= 1
    assert (out / "recuration" / "tree" / "manifest.json").is_file()
    assert "<html" in (out / "report.html").read_text()[:200].lower()
    # a second run reuses every stage and prints the same table
    assert main(["demo", "--output-dir", str(out), *ARGS]) == 0
    again = capsys.readouterr().out
    assert "iteration 4 (nothing left to run)" in again and "final losses: dino_global_crops_loss" in again
    assert (out / "comparison.md").read_text() == table


def test_demo_rejects_a_bad_override_before_any_work(tmp_path, capsys):
    code = main(["demo", "--output-dir", str(tmp_path / "demo"), "--num-slides", "2", "train.iteratons=4"])
    assert code == 2
    assert "train.iteratons" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "cohort").exists()


def test_random_init_is_the_weights_its_training_starts_from(tmp_path, cohort, cohort_index):
    """The baseline a trained teacher is compared with is its own initialisation, not another draw: after
    one iteration (the learning rate is 0 at the first step) the teacher still holds those weights."""
    import torch

    from dinov2_patho.backbones.teacher import teacher_backbone
    from dinov2_patho.demo.method import random_init, train_config
    from dinov2_patho.train.trainer import run_training

    cfg = train_config(cohort_index.path, cohort.slides_dir, 3, ["train.iterations=1", "train.num_workers=0",
                                                                 "checkpoint.every_n_iterations=1"])
    teacher = teacher_backbone(run_training(cfg, tmp_path / "run", progress=False)["checkpoint"])
    torch.manual_seed(0)  # whatever the global generator holds before, the draw is train.seed's
    torch.randn(100)
    init = random_init(cfg)
    assert not init.training
    trained, initial = teacher.state_dict(), init.state_dict()
    assert list(trained) == list(initial)
    for key, value in initial.items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=1e-6, msg=key)
