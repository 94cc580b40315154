"""The trainer end to end on the synthetic cohort: smoke (loss falls), bad input, NaN guard,
preemption stop, exact kill-and-resume, 2-process gloo DDP, export."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_patho.config_files import ConfigError
from dinov2_patho.errors import UserError
from dinov2_patho.train import trainer as trainer_mod
from dinov2_patho.train.checkpoint import find_latest, iteration_of
from dinov2_patho.train.config import load_train_config
from dinov2_patho.train.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "train" / "cpu_smoke.yaml"

# A model small enough that a step costs tens of milliseconds on one core.
TINY = [
    "student.embed_dim=48", "student.depth=2", "student.num_heads=2", "student.patch_size=16",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
    "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=2",
    "train.batch_size_per_gpu=8", "train.log_every=100", "optim.warmup_iterations=2",
    "teacher.warmup_teacher_temp_iterations=4",
]


def _data(cohort, cohort_index) -> list[str]:
    return [f"data.index={cohort_index.path}", f"data.slides={cohort.slides_dir}"]


def tiny_cfg(cohort, cohort_index, *overrides: str):
    return load_train_config(SMOKE, [*_data(cohort, cohort_index), *TINY, *overrides])


def _cli(output_dir: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dinov2_patho", "train", "--config-file", str(SMOKE), "--output-dir",
            str(output_dir), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------- smoke


@pytest.mark.slow
def test_cpu_smoke_config_trains_and_loss_falls(cohort, cohort_index, tmp_path):
    cfg = load_train_config(SMOKE, [*_data(cohort, cohort_index), "train.iterations=30",
                                    "optim.warmup_iterations=5", "teacher.warmup_teacher_temp_iterations=10"])
    summary = trainer_mod.run_training(cfg, tmp_path)
    assert summary["iteration"] == 30 and not summary["stopped"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(30))
    losses = [r["total_loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
    assert records[0]["lr"] == 0.0 and records[5]["lr"] > 0
    assert records[-1]["momentum"] > records[0]["momentum"]
    assert records[-1]["teacher_temp"] == pytest.approx(cfg.teacher.teacher_temp)
    # stratified over 4 tissue types: every batch of 16 holds all four
    assert all(r["sampler/clusters"] == 4 for r in records)
    assert all(0 <= r["data_time"] <= r["iter_time"] for r in records)
    assert iteration_of(find_latest(tmp_path / "checkpoints")) == 30
    assert (tmp_path / "config.yaml").is_file()


def test_sampler_telemetry_is_the_trained_batchs_not_the_prefetched_ones(cohort, cohort_index, tmp_path):
    # one worker, two batches in flight: the sampler's live state runs ahead of the iteration
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=4", "train.num_workers=1",
                   "train.prefetch_factor=2", "checkpoint.every_n_iterations=0")
    trainer_mod.run_training(cfg, tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["sampler/step"] for r in records] == [r["iteration"] for r in records] == list(range(4))


def test_resume_under_a_changed_config_is_refused_unless_forced(cohort, cohort_index, tmp_path):
    run = tmp_path / "run"
    first = tiny_cfg(cohort, cohort_index, "train.iterations=1", "train.num_workers=0")
    trainer_mod.run_training(first, run)
    changed = tiny_cfg(cohort, cohort_index, "train.iterations=2", "train.num_workers=0",
                       "optim.base_lr=0.01")
    with pytest.raises(ConfigError, match=r"with a changed config: optim.base_lr, train.iterations would"):
        trainer_mod.run_training(changed, run)
    assert trainer_mod.run_training(changed, run, force_resume=True)["iteration"] == 2


# ---------------------------------------------------------------------------- bad input


def test_config_errors_name_the_key(cohort, cohort_index, tmp_path):
    with pytest.raises(ConfigError, match=r"'train.batch_size_per_gp'.*'train.batch_size_per_gpu'"):
        load_train_config(SMOKE, ["train.batch_size_per_gp=4"])
    with pytest.raises(ConfigError, match="train.iterations"):
        trainer_mod.run_training(tiny_cfg(cohort, cohort_index, "train.iterations=0"), tmp_path)
    with pytest.raises(ConfigError, match="data.index is required"):
        trainer_mod.run_training(load_train_config(SMOKE), tmp_path)


def test_missing_paths_fail_before_anything_starts(cohort, cohort_index, tmp_path):
    missing = tmp_path / "no_such_index"
    cfg = tiny_cfg(cohort, cohort_index, f"data.index={missing}")
    with pytest.raises(UserError, match=f"data.index: {missing} does not exist"):
        trainer_mod.run_training(cfg, tmp_path / "out")
    cfg = tiny_cfg(cohort, cohort_index, f"data.slides={tmp_path / 'no_slides'}")
    with pytest.raises(UserError, match="data.slides: .*no_slides does not exist"):
        trainer_mod.run_training(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # failed before logging, checkpoints or workers


def test_bad_data_subset_is_a_user_error_naming_it(cohort, cohort_index, tmp_path):
    np.save(tmp_path / "rows.npy", np.array([0, len(cohort_index)]))
    cfg = tiny_cfg(cohort, cohort_index, f"data.subset={tmp_path / 'rows.npy'}")
    with pytest.raises(UserError, match=rf"data.subset .*rows.npy: row id {len(cohort_index)} is not in"):
        trainer_mod.run_training(cfg, tmp_path / "out")


def test_the_trainer_builds_its_backbone_only_through_ssl_meta_arch(cohort, cohort_index, tmp_path,
                                                                    monkeypatch):
    from dinov2_patho.train.ssl_meta_arch import SSLMetaArch

    class Built(Exception):
        pass

    def build(cfg):
        raise Built(cfg.student.embed_dim)

    monkeypatch.setattr(SSLMetaArch, "_build_backbone", staticmethod(build))
    with pytest.raises(Built, match="48"):  # TINY's custom sizes, which once took a path of their own
        trainer_mod.run_training(tiny_cfg(cohort, cohort_index, "train.iterations=1"), tmp_path)


def test_cli_prints_user_errors_as_one_line(tmp_path):
    out = subprocess.run(_cli(tmp_path, [f"data.index={tmp_path / 'nope'}"]), capture_output=True, text=True,
                         env=_env())
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"dinov2-patho train: error: data.index: {tmp_path / 'nope'} "
                                               "does not exist"]


def _patch_step(monkeypatch, action):
    """Run `action(iteration, losses)` inside each forward_backward."""
    from dinov2_patho.train.ssl_meta_arch import SSLMetaArch

    real = SSLMetaArch.forward_backward
    calls = {"n": 0}

    def step(self, batch, teacher_temp):
        losses = real(self, batch, teacher_temp)
        action(batch["step"], losses)
        calls["n"] += 1
        return losses

    monkeypatch.setattr(SSLMetaArch, "forward_backward", step)
    return calls


def test_nan_loss_names_iteration_and_last_checkpoint(cohort, cohort_index, tmp_path, monkeypatch):
    def poison(step, losses):
        if step == 3:
            losses["total_loss"] = float("nan")

    _patch_step(monkeypatch, poison)
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=6", "checkpoint.every_n_iterations=2",
                   "train.num_workers=0")
    with pytest.raises(trainer_mod.NonFiniteLossError,
                       match=r"iteration 3 .*total_loss=nan.*last good checkpoint: .*iter_00000002"):
        trainer_mod.run_training(cfg, tmp_path)
    assert iteration_of(find_latest(tmp_path / "checkpoints")) == 2


def test_request_stop_checkpoints_and_returns_at_the_boundary(cohort, cohort_index, tmp_path, monkeypatch):
    def preempt(step, losses):
        if step == 2:
            trainer_mod.request_stop()

    _patch_step(monkeypatch, preempt)
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=10", "checkpoint.every_n_iterations=100",
                   "train.num_workers=0")
    summary = trainer_mod.run_training(cfg, tmp_path)
    assert summary["stopped"] and summary["iteration"] == 3
    assert iteration_of(find_latest(tmp_path / "checkpoints")) == 3
    assert not trainer_mod._STOP.is_set()  # honoured, so a later run in this process is not stopped
    monkeypatch.undo()
    summary = trainer_mod.run_training(cfg, tmp_path)  # resumes and finishes
    assert summary["iteration"] == 10 and not summary["stopped"]
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(10))


def test_evaluation_hook_runs_benchmarks_on_the_teacher(cohort, cohort_index, tmp_path, monkeypatch):
    calls = []

    def fake_run_benchmarks(backbone, benchmarks, cfg, output_dir):
        calls.append((backbone, list(benchmarks), cfg, Path(output_dir), backbone.training))
        score = len(calls) / 10
        return {"bach": {"linear": {"balanced_accuracy": score}, "knn": {20: {"balanced_accuracy": score}}}}

    monkeypatch.setattr(trainer_mod, "run_benchmarks", fake_run_benchmarks)
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=4", "train.num_workers=0",
                   "evaluation.every_n_iterations=2", "evaluation.benchmarks=[bach]",
                   "checkpoint.every_n_iterations=2")
    trainer_mod.run_training(cfg, tmp_path)
    # the initialisation first: the learning curve's first point
    assert [c[3].name for c in calls] == ["iter_00000000", "iter_00000002", "iter_00000004"]
    assert all(c[1] == ["bach"] and c[2] is None and not c[4] for c in calls)
    assert calls[0][0] is not None and calls[0][0].embed_dim == 48
    # the learning curve is in metrics.jsonl, filed under the step before each evaluation...
    curve = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_iteration" in r]
    assert [(r["iteration"], r["eval_iteration"], r["eval/bach/knn_20"]) for r in curve] \
        == [(-1, 0, 0.1), (1, 2, 0.2), (3, 4, 0.3)]
    # ...and the report reads it apart from the iterations
    from dinov2_patho.report.run import read_metrics as report_metrics

    metrics = report_metrics(tmp_path)
    assert len(metrics) == 4 and list(metrics.evals["iteration"]) == [0, 2, 4]
    assert list(metrics.evals["eval/bach/linear"]) == [0.1, 0.2, 0.3]
    # a resume from iteration 2 keeps the points up to 2 and adds 4's again, once
    (tmp_path / "checkpoints" / "latest").write_text("iter_00000002")
    calls.clear()
    trainer_mod.run_training(cfg, tmp_path)
    curve = [r["eval_iteration"] for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_iteration" in r]
    assert curve == [0, 2, 4] and [c[3].name for c in calls] == ["iter_00000004"]


def test_evaluation_hook_runs_slide_tasks_on_the_teacher(cohort, cohort_index, tmp_path, monkeypatch):
    from dinov2_patho.eval.slide import runner as slide_runner

    calls = []

    def fake_run_slide_tasks(backbone, tasks, cfg, output_dir, backbone_name):
        calls.append((list(tasks), cfg, Path(output_dir), backbone_name, backbone.training,
                      backbone.embed_dim))
        return {}

    monkeypatch.setattr(slide_runner, "run_slide_tasks", fake_run_slide_tasks)
    slide_cfg = tmp_path / "slide.yaml"
    slide_cfg.write_text("cross_validation:\n  folds: 3\n")
    labels = tmp_path / "labels.csv"  # a labels CSV task is checked to exist before training
    labels.write_text("slide_id,label\n")
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=2", "train.num_workers=0",
                   "evaluation.every_n_iterations=2", f"evaluation.slide_tasks=[{labels}]",
                   f"evaluation.slide_config_file={slide_cfg}")
    trainer_mod.run_training(cfg, tmp_path / "run")  # slide tasks alone turn the hook on
    out = tmp_path / "run" / "eval" / "iter_00000002" / "slide"
    folds = {"cross_validation": {"folds": 3}}
    at_init = out.parent.parent / "iter_00000000" / "slide"
    assert calls == [([str(labels)], folds, at_init, "teacher iter_00000000", False, 48),
                     ([str(labels)], folds, out, "teacher iter_00000002", False, 48)]
    with pytest.raises(UserError, match=r"evaluation\.slide_config_file: .*absent\.yaml does not exist"):
        trainer_mod.run_training(tiny_cfg(cohort, cohort_index, "evaluation.slide_tasks=[labels.csv]",
                                          f"evaluation.slide_config_file={tmp_path / 'absent.yaml'}"),
                                 tmp_path / "other")


def test_logs_hold_one_pseudo_epoch_and_the_step_flops(cohort, cohort_index, tmp_path):
    # B = 8, 12 samples: 2 batches per pseudo-epoch, where floor(it * B / L) would say epoch 2 at it 3
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=5", "train.num_workers=0",
                   "sampler.pseudo_epoch_samples=12")
    trainer_mod.run_training(cfg, tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    logged = [(r["pseudo_epoch"], r["sampler/pseudo_epoch"]) for r in records]
    assert logged == [(e, e) for e in (0, 0, 1, 1, 2)]
    # FLOPs counted on the first step: achieved TFLOP/s = FLOPs / iteration time; no MFU on a CPU
    step_flops = {round(r["tflops"] * 1e12 * r["iter_time"]) for r in records}
    assert len(step_flops) == 1 and step_flops.pop() > 0 and "mfu" not in records[0]
    with pytest.raises(ConfigError, match="train.pseudo_epoch_length is now sampler.pseudo_epoch_samples"):
        load_train_config(SMOKE, ["train.pseudo_epoch_length=12"])


# ---------------------------------------------------------------------------- exact resume


def _run(args, output_dir):
    return subprocess.run(_cli(output_dir, args), capture_output=True, text=True, env=_env(), timeout=300)


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_batches_and_losses(cohort, cohort_index, tmp_path):
    """A run killed with SIGKILL at a random iteration and resumed gives the same batches and the
    same losses as an uninterrupted run (CPU, fixed seed, DataLoader workers prefetching ahead)."""
    # stochastic depth: the model's own RNG stream must also continue exactly
    args = [*_data(cohort, cohort_index), *TINY, "train.iterations=12", "checkpoint.every_n_iterations=3",
            "checkpoint.keep_last=2", "train.num_workers=2", "train.log_every=1",
            "student.drop_path_rate=0.2"]
    full = _run(args, tmp_path / "full")
    assert full.returncode == 0, full.stderr
    reference = read_metrics(tmp_path / "full" / "metrics.jsonl")

    kill_after = random.Random().randint(4, 10)  # iterations logged before the kill
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline = time.monotonic() + 240
        while len(read_metrics(out / "metrics.jsonl")) < kill_after:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = len(read_metrics(out / "metrics.jsonl"))
    latest = find_latest(out / "checkpoints")
    assert latest is not None and iteration_of(latest) <= killed_at

    resumed = _run(args, out)
    assert resumed.returncode == 0, resumed.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(12))
    keys = ["batch_digest", "total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss",
            "koleo_loss", "lr", "teacher_temp"]
    for got, want in zip(records, reference):
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, (killed_at, got["iteration"])


# ---------------------------------------------------------------------------- distributed

_WORKER = '''
import gc, json, os, sys, torch
from torch.nn.parallel import DistributedDataParallel
from dinov2_patho.train import trainer
from dinov2_patho.train.config import load_train_config

seen = []
check = trainer.Trainer._check_batch
def record(self, batch, iteration):
    seen.append(batch["row_ids"].tolist())
    return check(self, batch, iteration)
trainer.Trainer._check_batch = record
save = trainer.Trainer.save
def keep_weights(self, iteration):
    path = save(self, iteration)
    torch.save(self._state_dict(), os.path.join(sys.argv[2], f"weights{os.environ['RANK']}.pt"))
    return path
trainer.Trainer.save = keep_weights
# DDP objects still alive when the process group is destroyed (one would hold its last reference)
live_ddp = []
destroy = torch.distributed.destroy_process_group
def counting_destroy(*args, **kwargs):
    live_ddp.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
    return destroy(*args, **kwargs)
torch.distributed.destroy_process_group = counting_destroy

cfg = load_train_config(sys.argv[1], sys.argv[3:])
summary = trainer.run_training(cfg, os.path.join(sys.argv[2], "run"))
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"rows": seen, "summary": summary, "initialized": torch.distributed.is_initialized(),
               "live_ddp": live_ddp}, f)
'''


@pytest.mark.slow
def test_two_process_gloo_ranks_take_disjoint_slices_and_stay_identical(cohort, cohort_index, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    args = [*_data(cohort, cohort_index), *TINY, "train.iterations=4", "train.num_workers=0",
            "train.batch_size_per_gpu=4", "checkpoint.every_n_iterations=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(SMOKE), str(tmp_path), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(not r["initialized"] for r in ranks)  # torn down on the way out
    assert all(r["live_ddp"] == [0] for r in ranks)  # no DDP reducer destroys the group (a deadlock)
    assert ranks[0]["summary"]["losses"] == ranks[1]["summary"]["losses"]  # averaged over ranks
    global_batches = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(global_batches) == 4
    for step in range(4):
        a, b = ranks[0]["rows"][step], ranks[1]["rows"][step]
        assert len(a) == len(b) == 4 and not set(a) & set(b)
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(k.startswith("teacher.") for k in w0) and any(k.startswith("student.") for k in w0)


# ---------------------------------------------------------------------------- export


def test_export_teacher_loads_in_timm_and_dinov2_format(cohort, cohort_index, tmp_path):
    from dinov2_patho.backbones.teacher import export_teacher, teacher_backbone
    from dinov2_patho.models import load_pretrained
    from dinov2_patho.models.student import build_student_backbone
    from dinov2_patho.models.weights import import_timm

    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=2", "train.num_workers=0")
    trainer_mod.run_training(cfg, tmp_path / "run")
    written = export_teacher(tmp_path / "run", tmp_path / "export")
    teacher = teacher_backbone(tmp_path / "run")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = teacher(x)
        ours = build_student_backbone(cfg).eval()
        load_pretrained(ours, str(written["dinov2"]), format="dinov2")
        timm_kwargs = json.loads(written["timm_kwargs"].read_text())
        timm_vit = import_timm().models.vision_transformer.VisionTransformer(**timm_kwargs).eval()
        timm_vit.load_state_dict(torch.load(written["timm"], weights_only=True))
        assert torch.allclose(ours(x), want, atol=1e-6)
        assert torch.allclose(timm_vit(x), want, atol=1e-5)
    # the teacher is the EMA of a trained student, not the initial weights
    model = torch.load(find_latest(tmp_path / "run" / "checkpoints") / "state.pt", weights_only=True)["model"]
    assert any(not torch.equal(model[f"teacher.backbone.{k}"], model[f"student.backbone.{k}"])
               for k in teacher.state_dict())
