"""Training on a real SLURM (started here when none runs): `dinov2-patho launch train`
as a 2-task gloo job; a job preempted mid-run (SIGUSR2, as before a time limit) that
checkpoints, requeues itself and ends with the same weights as the uninterrupted job;
a job killed without warning (`scontrol requeue`) that resumes from its last periodic
checkpoint and ends the same; `launch eval` on the trained run; `launch curate kmeans` on two
tasks; the plain sbatch template."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from slurm_cluster import SlurmCluster, SlurmUnavailable, local_slurm

from dinov2_patho.train.checkpoint import find_latest, iteration_of, load_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CPU_SMOKE = REPO / "configs" / "train" / "cpu_smoke.yaml"
ITERATIONS = 12
# cpu_smoke, smaller still: two ranks share two cores
SMOKE_OVERRIDES = [f"train.iterations={ITERATIONS}", "checkpoint.every_n_iterations=4", "train.num_workers=0",
                   "train.batch_size_per_gpu=2", "crops.local_crops_number=2", "train.log_every=1"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
DEADLINE_S = 300  # against hangs only: a job takes ~10 s, a loaded 2-core machine is slower


@pytest.fixture(scope="module")
def slurm() -> SlurmCluster:
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(local_slurm())
        except SlurmUnavailable as e:
            pytest.skip(f"no SLURM here: {e}")
        env = stack.enter_context(pytest.MonkeyPatch.context())
        if "SLURM_CONF" in cluster.env:
            env.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
        yield cluster


def _data_overrides(cohort, cohort_index) -> list[str]:
    return [f"data.index={cohort_index.path}", f"data.slides={cohort.slides_dir}"]


def _submit(slurm: SlurmCluster, *launch_args: str) -> tuple[str, Path]:
    """`dinov2-patho launch ...` on the test cluster: (job id, output directory)."""
    cmd = [sys.executable, "-m", "dinov2_patho", "launch", *launch_args]
    env = {**slurm.env, "PYTHONFAULTHANDLER": "1"}  # the job inherits it: stacks on SIGABRT
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    match = re.search(r"submitted job (\d+): output (\S+)", out.stdout)
    assert match, out.stdout
    return match.group(1), Path(match.group(2))


def _launch(slurm: SlurmCluster, root: Path, overrides: list[str]) -> tuple[str, Path]:
    return _submit(slurm, "train", "--tasks-per-node", "2", "--cpus-per-task", "1", "--partition",
                   slurm.partition, "--timeout", "30", "--output-root", str(root), "--config-file",
                   str(CPU_SMOKE), *overrides)


def _job_logs(output_dir: Path, tail: int = 3000) -> str:
    """The tasks' stdout and stderr (submitit's own messages included), each cut to its tail."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                     for p in sorted((output_dir / "logs").glob("*_log.*")))


def _wait_end(slurm: SlurmCluster, job_id: str, output_dir: Path) -> None:
    try:
        state = slurm.wait_state(job_id, ENDED, timeout=DEADLINE_S)
    except TimeoutError as e:  # a hang: SIGABRT makes each task's faulthandler write its stacks to its log
        slurm.run("scancel", "--signal=ABRT", job_id, check=False)
        time.sleep(5)
        slurm.run("scancel", job_id, check=False)  # the node is free for the next test
        raise TimeoutError(f"{e}\n{_job_logs(output_dir)}") from None
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{_job_logs(output_dir)}\n{slurm.diagnostics()}"


def _task_results(output_dir: Path, job_id: str, ntasks: int) -> list[dict]:
    results = []
    for task in range(ntasks):
        with open(output_dir / "logs" / f"{job_id}_{task}_result.pkl", "rb") as f:
            outcome, value = pickle.load(f)
        assert outcome == "success", value
        results.append(value)
    return results


def _final_model(output_dir: Path) -> dict[str, torch.Tensor]:
    latest = find_latest(output_dir / "checkpoints")
    assert latest is not None and iteration_of(latest) == ITERATIONS
    shared, _ = load_checkpoint(latest, rank=0)
    return shared["model"]


def _wait_training(slurm: SlurmCluster, job_id: str, output_dir: Path, iterations: int) -> None:
    """Until metrics.jsonl exists and logs `iterations` iterations (the job still running)."""
    metrics, deadline = output_dir / "metrics.jsonl", time.monotonic() + DEADLINE_S
    while not metrics.exists() or len(metrics.read_text().splitlines()) < iterations:
        assert slurm.job_state(job_id) not in ENDED, _job_logs(output_dir)
        assert time.monotonic() < deadline, f"job {job_id} stuck before {iterations}\n{_job_logs(output_dir)}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def smoke_job(slurm, cohort, cohort_index, tmp_path_factory) -> tuple[str, Path]:
    """cpu_smoke as an uninterrupted 2-task job: (job id, output directory)."""
    job_id, output_dir = _launch(slurm, tmp_path_factory.mktemp("launch"), SMOKE_OVERRIDES
                                 + _data_overrides(cohort, cohort_index))
    _wait_end(slurm, job_id, output_dir)
    return job_id, output_dir


def test_launch_trains_cpu_smoke_as_a_two_task_gloo_job(smoke_job, cohort_index):
    job_id, output_dir = smoke_job
    assert output_dir.name == f"dinov2-patho-train_{job_id}"
    launch = OmegaConf.load(output_dir / "logs" / "launch.yaml")
    assert launch.job_id == job_id and "launch train" in launch.command_line
    assert launch.resources.tasks_per_node == 2
    config = OmegaConf.load(output_dir / "logs" / "config.yaml")
    assert config.train.iterations == ITERATIONS and config.data.index == str(cohort_index.path)

    log = (output_dir / "log.txt").read_text()
    assert "global batch 4 over 2 rank(s)" in log  # DDP over SLURM's two tasks, gloo on CPU
    results = _task_results(output_dir, job_id, 2)
    assert [r["iteration"] for r in results] == [ITERATIONS, ITERATIONS]
    assert not any(r["stopped"] for r in results)
    assert results[0]["losses"] == results[1]["losses"]  # averaged over the ranks: identical
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(ITERATIONS))
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)
    assert _final_model(output_dir)  # the last checkpoint holds the trained model


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm, smoke_job, cohort, cohort_index,
                                                                 tmp_path):
    job_id, output_dir = _launch(slurm, tmp_path, SMOKE_OVERRIDES + _data_overrides(cohort, cohort_index))
    _wait_training(slurm, job_id, output_dir, 0)  # metrics.jsonl exists: the signal handler is in place
    # what SLURM sends before the time limit (submitit's --signal=USR2@delay), or an admin's preemption
    slurm.run("scancel", "--signal=USR2", job_id)
    _wait_end(slurm, job_id, output_dir)

    log = (output_dir / "log.txt").read_text()
    stop = re.search(r"stop requested: checkpoint \S+iter_(\d+) written", log)
    resumed = re.search(r"resumed from \S+iter_(\d+) at iteration (\d+)", log)
    assert stop and resumed, log
    assert int(stop.group(1)) == int(resumed.group(1)) == int(resumed.group(2))
    assert 0 < int(resumed.group(2)) < ITERATIONS, "the signal came too late to interrupt the run"
    submitit_log = _job_logs(output_dir, tail=10**6)
    assert "Calling checkpoint method" in submitit_log and f"Requeued job {job_id}" in submitit_log
    assert re.search(r"\bRestarts=1\b", slurm.run("scontrol", "show", "job", job_id))
    assert [r["iteration"] for r in _task_results(output_dir, job_id, 2)] == [ITERATIONS, ITERATIONS]

    reference, resumed_model = _final_model(smoke_job[1]), _final_model(output_dir)
    assert reference.keys() == resumed_model.keys()
    assert {k.split(".")[0] for k in reference} >= {"student", "teacher"}
    different = [k for k in reference if not torch.equal(reference[k], resumed_model[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def test_hard_requeue_resumes_from_the_last_periodic_checkpoint_exactly(slurm, smoke_job, cohort,
                                                                        cohort_index, tmp_path):
    job_id, output_dir = _launch(slurm, tmp_path, SMOKE_OVERRIDES + _data_overrides(cohort, cohort_index))
    _wait_training(slurm, job_id, output_dir, 6)  # past the periodic checkpoint of iteration 4
    # requeued, then killed at once like a node failure: `scontrol requeue` alone sends SIGTERM
    # (which the trainer ignores) and SIGKILL only KillWait seconds later, by when this short job is done
    pids = [int(line.split()[0]) for line in slurm.run("scontrol", "listpids", job_id).splitlines()
            if line.split()[:1] and line.split()[0].isdigit()]
    assert pids, f"no processes listed for job {job_id}"
    slurm.run("scontrol", "requeue", job_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_end(slurm, job_id, output_dir)

    log = (output_dir / "log.txt").read_text()
    assert "stop requested" not in log, "the kill was not hard: the trainer saw a stop request"
    resumed = re.search(r"resumed from \S+iter_(\d+) at iteration (\d+)", log)
    assert resumed, log
    assert int(resumed.group(1)) == int(resumed.group(2)) and int(resumed.group(2)) in (4, 8)
    assert re.search(r"\bRestarts=1\b", slurm.run("scontrol", "show", "job", job_id))
    assert [r["iteration"] for r in _task_results(output_dir, job_id, 2)] == [ITERATIONS, ITERATIONS]
    reference, resumed_model = _final_model(smoke_job[1]), _final_model(output_dir)
    different = [k for k in reference if not torch.equal(reference[k], resumed_model[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def test_launch_eval_runs_the_trained_run_as_a_slurm_job(slurm, smoke_job, tmp_path):
    from test_eval_backbone import TINY_EVAL
    from test_eval_run import folder_benchmark

    folder_benchmark(tmp_path / "data" / "folder")
    job_id, output_dir = _submit(slurm, "eval", "--cpus-per-task", "1", "--partition", slurm.partition,
                                 "--timeout", "30", "--output-root", str(tmp_path), "--", "run", "--backbone",
                                 str(smoke_job[1]), "--benchmarks", "folder", "--data-root",
                                 str(tmp_path / "data"), *TINY_EVAL)
    _wait_end(slurm, job_id, output_dir)
    assert output_dir.name == f"dinov2-patho-eval_{job_id}"
    embed_dim = OmegaConf.load(CPU_SMOKE).student.embed_dim
    assert np.load(output_dir / "features" / "folder" / "test" / "cls.npy").shape == (8, embed_dim)


def test_launch_curate_kmeans_as_a_two_task_job_builds_the_single_process_tree(slurm, tmp_path):
    from test_curation_kmeans import planted_blobs, tree_arrays

    from dinov2_patho.cli import main

    np.save(tmp_path / "x.npy", planted_blobs(seed=3)[0])
    config = tmp_path / "levels.yaml"
    levels = [{"clusters": 12, "resampling_steps": 2, "sample_per_cluster": 4}, {"clusters": 3}]
    config.write_text(OmegaConf.to_yaml({"kmeans": {"levels": levels}}))
    args = ["kmeans", "--embeddings", str(tmp_path / "x.npy"), "--config-file", str(config), "--no-progress"]
    assert main(["curate", *args, "--out", str(tmp_path / "local")]) == 0
    job_id, output_dir = _submit(slurm, "curate", "--tasks-per-node", "2", "--cpus-per-task", "1",
                                 "--partition", slurm.partition, "--timeout", "30", "--output-root",
                                 str(tmp_path), "--", *args, "--out", str(tmp_path / "tree_%j"))
    _wait_end(slurm, job_id, output_dir)
    assert "2 rank(s)" in _job_logs(output_dir)  # one gloo group, not two independent builds
    local, job = tree_arrays(tmp_path / "local"), tree_arrays(tmp_path / f"tree_{job_id}")
    assert local and local.keys() == job.keys()
    for name in local:  # two gloo ranks sharding the points build the single process's tree
        np.testing.assert_array_equal(job[name], local[name], err_msg=name)


def test_plain_sbatch_template_trains_without_submitit(slurm, cohort, cohort_index, tmp_path):
    output_dir = tmp_path / "run"
    overrides = ["train.iterations=2", "checkpoint.every_n_iterations=0", *SMOKE_OVERRIDES[2:],
                 *_data_overrides(cohort, cohort_index)]
    env = {**slurm.env, "PYTHON": sys.executable, "OUTPUT_DIR": str(output_dir)}
    job_id = slurm.run("sbatch", "--parsable", f"--partition={slurm.partition}", "--ntasks-per-node=2",
                       "--cpus-per-task=1", "--time=30", f"--output={tmp_path / 'job.out'}",
                       str(REPO / "launch" / "sbatch_train.sh"), "--config-file", str(CPU_SMOKE), *overrides,
                       env=env).strip().split(";")[0]
    state = slurm.wait_state(job_id, ENDED, timeout=DEADLINE_S)
    job_out = (tmp_path / "job.out").read_text(errors="replace") if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED", f"{job_out}\n{slurm.diagnostics()}"
    assert "global batch 4 over 2 rank(s)" in (output_dir / "log.txt").read_text()
    assert f"job {job_id} restart 0" in (output_dir / "logs" / "command.txt").read_text()
    assert f"{output_dir}: iteration 2 of 2" in job_out  # the status probe: finished, no requeue
