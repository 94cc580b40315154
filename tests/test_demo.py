"""The README's quick start: `make demo` runs `dinov2-patho demo` end to end."""

import json

import pytest

from dinov2_patho.cli import main


@pytest.mark.slow
def test_demo_runs_the_whole_job_and_reports_both_probes(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--output-dir", str(out), "--num-slides", "4", "train.iterations=4",
                 "checkpoint.every_n_iterations=4", "train.num_workers=0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cpu_smoke: 4 iterations" in printed
    for name in ("trained", "random_init"):
        assert f"  {name}" in printed
        results = json.loads((out / "eval" / name / "results.json").read_text())
        assert 0.0 <= results["synthetic"]["linear"]["balanced_accuracy"] <= 1.0
    assert (out / "index" / "manifest.json").is_file()
    assert (out / "train" / "checkpoints" / "latest").exists()
    assert (out / "train" / "metrics.jsonl").read_text().count("\n") == 4


def test_demo_rejects_a_bad_override(tmp_path, capsys):
    code = main(["demo", "--output-dir", str(tmp_path / "demo"), "--num-slides", "2", "train.iteratons=4"])
    assert code == 2
    assert "train.iteratons" in capsys.readouterr().err
