"""What `train` tells people: a short human summary at the end (JSON behind --json), and a
`--dry-run` that shows the resolved config, the first batch's telemetry and the data source."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from test_train import SMOKE, TINY, _data

from dinov2_patho.cli import main
from dinov2_patho.data.index import build_index
from dinov2_patho.train import trainer as trainer_mod
from dinov2_patho.train.checkpoint import find_latest


@pytest.fixture
def train_cli(cohort, cohort_index, monkeypatch):
    monkeypatch.setattr(trainer_mod, "install_stop_handlers", lambda: None)  # keep pytest's own handlers

    def run(out, *extra: str) -> int:
        return main(["train", "--config-file", str(SMOKE), "--output-dir", str(out), *extra,
                     *_data(cohort, cohort_index), *TINY, "train.iterations=2", "train.num_workers=0"])
    return run


def test_train_ends_with_a_human_summary_also_when_nothing_is_left(train_cli, tmp_path, capsys):
    assert train_cli(tmp_path / "run") == 0
    lines = capsys.readouterr().out.strip().splitlines()[-4:]  # after the log lines
    assert lines[0].startswith("training done: iteration 2 (2 run in 0m")
    assert lines[1].startswith("final losses: dino_global_crops_loss ") and "total_loss" in lines[1]
    assert lines[2] == f"checkpoint:   {find_latest(tmp_path / 'run' / 'checkpoints')}"
    assert lines[3] == f"metrics:      {tmp_path / 'run' / 'metrics.jsonl'}"
    final = lines[1]
    assert train_cli(tmp_path / "run") == 0  # finished: the same losses, read back from metrics.jsonl
    again = capsys.readouterr().out.strip().splitlines()[-4:]
    assert again[0] == "training done: iteration 2 (nothing left to run)" and again[1] == final
    assert train_cli(tmp_path / "run", "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iteration"] == 2 and f"total_loss {summary['losses']['total_loss']:.4f}" in final


def test_dry_run_shows_config_batch_and_source_and_builds_nothing(train_cli, tmp_path, capsys):
    assert train_cli(tmp_path / "dry", "--dry-run") == 0
    out = capsys.readouterr().out
    assert out.startswith("# resolved config\n") and "  batch_size_per_gpu: 8\n" in out
    assert "# first batch: 8 tiles over 1 rank(s), sampler cluster_stratified" in out
    assert "\nclusters          4\n" in out and "\nstep              0\n" in out
    assert "backend      openslide (fallback tiffslide)" in out
    assert "mpp 0.5" in out and "a tile is 224 px at level 0" in out
    assert "preflight    every slide opens and holds its tiles" in out
    assert not (tmp_path / "dry").exists()


def test_train_refuses_another_runs_directory_before_writing_into_it(train_cli, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(run) == 0
    shutil.rmtree(run / "checkpoints")  # another run's config and metrics, nothing to resume
    config, metrics = ((run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl"))
    assert train_cli(run, "train.seed=5") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds another run with no checkpoint to resume" in err and "train.seed (0 -> 5)" in err
    assert (run / "config.yaml").read_bytes() == config and (run / "metrics.jsonl").read_bytes() == metrics
    (run / "config.yaml").unlink()
    assert train_cli(run) == 2
    assert "holds a metrics.jsonl but no config.yaml" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == metrics


def test_uniform_trains_on_a_tile_list_without_a_tree(cohort, cohort_index, tmp_path, monkeypatch, capsys):
    # the `curate tiles` index: slide_id,tile_x,tile_y only, the "all tissue tiles" baseline
    monkeypatch.setattr(trainer_mod, "install_stop_handlers", lambda: None)
    lines = cohort.clusters_csv.read_text().splitlines()
    (tmp_path / "tiles.csv").write_text("".join(",".join(line.split(",")[:3]) + "\n" for line in lines))
    index = build_index(tmp_path / "tiles.csv", tmp_path / "index", progress=False)
    assert index.num_levels == 0
    args = ["train", "--config-file", str(SMOKE), "--output-dir", str(tmp_path / "run"),
            f"data.index={index.path}", f"data.slides={cohort.slides_dir}", *TINY, "train.iterations=2",
            "train.num_workers=0", "sampler.name=uniform", "sampler.level=null"]
    assert main([*args, "--dry-run"]) == 0
    assert re.search(r"\nclusters +none: the index has no tree levels\n", capsys.readouterr().out)
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["sampler/slides"] >= 1 and "sampler/clusters" not in records[0]


@pytest.mark.parametrize(("override", "message"), [
    ("student.embed_dim=97", "student.embed_dim=97 is not divisible by student.num_heads=3"),
    ("train.device=cuda", "train.device=cuda but no CUDA device is visible"),
])
def test_dry_run_makes_the_checks_of_the_run(cohort, cohort_index, tmp_path, capsys, monkeypatch, override,
                                             message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = ["train", "--config-file", str(SMOKE), "--output-dir", str(tmp_path / "run"),
            *_data(cohort, cohort_index), *TINY, "train.num_workers=0", "student.num_heads=3", override]
    for extra in (["--dry-run"], []):  # the dry run stops where the run would, before any step
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith(message) and "Traceback" not in "\n".join(err), err
    assert not (tmp_path / "run" / "config.yaml").exists()
