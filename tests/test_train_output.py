"""What `train` tells people: a short human summary at the end (JSON behind --json), and a
`--dry-run` that shows the resolved config, the first batch's telemetry and the data source."""

from __future__ import annotations

import json

import pytest
from test_train import SMOKE, TINY, _data

from dinov2_patho.cli import main
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
