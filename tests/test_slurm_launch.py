"""The SLURM launcher's pure parts: env:// from SLURM variables, resources, CLI checks
made before anything is queued, the batch scripts' finished/not-finished probe."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dinov2_patho.cli import main
from dinov2_patho.errors import UserError
from dinov2_patho.run.cli import eval_command
from dinov2_patho.run.env import PORT_BASE, PORT_SPAN, distributed_env, master_port, submitit_distributed_env
from dinov2_patho.run.jobs import CommandJob
from dinov2_patho.run.status import NOT_FINISHED, training_progress
from dinov2_patho.run.status import main as status_main
from dinov2_patho.run.submit import SlurmResources, parse_sbatch_options, submit


@given(nodes=st.integers(1, 8), per_node=st.integers(1, 8), job=st.integers(1, 10**9))
def test_every_task_gets_a_distinct_rank_and_the_same_rendezvous(nodes, per_node, job):
    hosts = [f"node{i:03d}" for i in range(nodes)]
    envs = [distributed_env(global_rank=node * per_node + local, local_rank=local, num_tasks=nodes * per_node,
                            num_nodes=nodes, hostnames=hosts, job_id=str(job))
            for node in range(nodes) for local in range(per_node)]
    assert sorted(int(e["RANK"]) for e in envs) == list(range(nodes * per_node))
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs} == {
        ("node000", str(master_port(str(job))), str(nodes * per_node), str(per_node))}
    assert {e["LOCAL_RANK"] for e in envs} == {str(r) for r in range(per_node)}


@given(job=st.integers(0, 10**12))
def test_master_port_is_in_range_and_follows_the_job(job):
    port = master_port(str(job))
    assert PORT_BASE <= port < PORT_BASE + PORT_SPAN
    assert master_port(str(job + 1)) != port
    assert master_port(f"{job}_3") == master_port(f"{job}3")  # array task ids count too


def test_inconsistent_slurm_geometry_is_an_error():
    with pytest.raises(UserError, match="7 tasks do not split evenly over 2 nodes"):
        distributed_env(global_rank=0, local_rank=0, num_tasks=7, num_nodes=2, hostnames=["a", "b"],
                        job_id="5")
    with pytest.raises(UserError, match=r"rank 4 outside \[0, 4\)"):
        distributed_env(global_rank=4, local_rank=0, num_tasks=4, num_nodes=1, hostnames=["a"], job_id="5")


@pytest.fixture
def in_submitit_task(monkeypatch):
    """The variables of task 11 of 16 of SLURM job 4242 under submitit; the env:// variables
    a job sets are restored afterwards."""
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "11",
                       "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_JOB_NODELIST": "gpu[007-008]"}.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")


def test_env_from_a_submitit_task(in_submitit_task):
    env = submitit_distributed_env()
    assert env == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu007", "MASTER_PORT": str(master_port("4242"))}


def test_command_job_substitutes_the_job_id_and_fails_loudly(in_submitit_task, tmp_path):
    job = CommandJob(["train", "--output-dir", str(tmp_path / "out_%j"),
                      "--config-file", str(tmp_path / "c_%j.yaml")])
    with pytest.raises(RuntimeError, match=r"c_4242\.yaml exited with status 2"):
        job()
    assert os.environ["RANK"] == "11" and os.environ["MASTER_ADDR"] == "gpu007"
    assert job.checkpoint().function is job  # requeued as it is


def test_resources_one_task_per_gpu_or_per_cpu_slot():
    gpu = SlurmResources(nodes=2, gpus_per_node=8, partition="gpu", timeout_min=90,
                         extra={"mail-type": "END"})
    params = gpu.executor_parameters()
    assert (params["nodes"], params["ntasks_per_node"], params["gpus_per_node"]) == (2, 8, 8)
    assert params["cpus_per_task"] == 8 and params["time"] == 90 and params["partition"] == "gpu"
    assert params["additional_parameters"] == {"mail-type": "END"}
    assert gpu.world_size == 16
    cpu = SlurmResources(tasks_per_node=2, timeout_min=5)
    params = cpu.executor_parameters()
    assert "gpus_per_node" not in params and params["ntasks_per_node"] == 2 and params["cpus_per_task"] == 1
    assert params["setup"] == ["export OMP_NUM_THREADS=1"]


def test_resources_render_as_sbatch_options():
    from submitit.slurm.slurm import _make_sbatch_string

    resources = SlurmResources(nodes=2, gpus_per_node=8, partition="gpu", timeout_min=90, mem_gb=7.5,
                               account="lab", extra={"mail-type": "END"})
    script = _make_sbatch_string(command="python -m x", folder="/tmp/logs", **resources.executor_parameters())
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--time=90",
                 "--mem=7680M", "--partition=gpu", "--account=lab", "--mail-type=END", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script
    assert "export OMP_NUM_THREADS=8" in script


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "--nodes must be at least 1"),
    ({"timeout_min": 0}, "--timeout must be at least 1"),
    ({"gpus_per_node": -1}, "--gpus-per-node must be >= 0"),
    ({"gpus_per_node": 4, "tasks_per_node": 2}, "one task per GPU"),
    ({"cpus_per_task": 0}, "--cpus-per-task must be at least 1"),
])
def test_bad_resources_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        SlurmResources(**kwargs)


def test_sbatch_options():
    assert parse_sbatch_options(["mail-type=END", "--exclusive="]) == {"mail-type": "END", "exclusive": ""}
    with pytest.raises(UserError, match="'mail-type' is not of the form OPTION=VALUE"):
        parse_sbatch_options(["mail-type"])


def test_launch_checks_the_config_before_queueing(tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["launch", "train", "--output-root", str(root), "train.iterationz=3"]) == 2
    assert "unknown key 'train.iterationz'" in capsys.readouterr().err
    missing = str(tmp_path / "no.yaml")
    assert main(["launch", "train", "--output-root", str(root), "--config-file", missing]) == 2
    assert "no.yaml does not exist" in capsys.readouterr().err
    assert main(["launch", "train", "--output-root", str(root), "--gpus-per-node", "2",
                 "--tasks-per-node", "1"]) == 2
    assert "one task per GPU" in capsys.readouterr().err
    assert not root.exists()  # nothing was submitted


def test_eval_command_is_checked_and_gets_the_job_output_dir(tmp_path):
    pattern = tmp_path / "eval_%j"
    argv = eval_command(["--", "run", "--backbone", "b.pt", "--benchmarks", "bach"], pattern)
    assert argv == ["eval", "run", "--backbone", "b.pt", "--benchmarks", "bach", "--output-dir", str(pattern)]
    assert eval_command(["run", "--output-dir", "x_%j"], pattern) == ["eval", "run", "--output-dir", "x_%j"]
    with pytest.raises(UserError, match="arguments after `--`"):
        eval_command(["--"], pattern)
    with pytest.raises(UserError, match="not a valid command"):
        eval_command(["run", "--bogus"], pattern)


def test_submit_without_slurm_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    with pytest.raises(UserError, match="cannot submit to SLURM here"):
        submit(print, SlurmResources(), tmp_path / "runs", "job")


def _fake_run(root, iterations, latest):
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text(f"train:\n  iterations: {iterations}\n")
    if latest is not None:
        name = f"iter_{latest:08d}"
        (root / "checkpoints" / name).mkdir()
        (root / "checkpoints" / name / "state.pt").write_bytes(b"")
        (root / "checkpoints" / "latest").write_text(name + "\n")


@pytest.mark.parametrize("latest, code", [(None, NOT_FINISHED), (4, NOT_FINISHED), (10, 0)])
def test_status_tells_finished_from_stopped(tmp_path, latest, code, capsys):
    _fake_run(tmp_path / "run", 10, latest)
    assert training_progress(tmp_path / "run") == (latest or 0, 10)
    assert status_main([str(tmp_path / "run")]) == code
    assert f"iteration {latest or 0} of 10" in capsys.readouterr().out


def test_status_of_a_non_run(tmp_path, capsys):
    assert status_main([str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("sampler.levl=2", r"sampler.levl: not an option of sampler 'cluster_stratified'; did you mean 'level'"),
    ("sampler.alpha=high", r"sampler.alpha: "),
    ("sampler.pseudo_epoch_samples=0", r"sampler.pseudo_epoch_samples=0: must be an integer >= 1$"),
    ("sampler.max_slides_per_epoch=-1", r"sampler.max_slides_per_epoch=-1: must be an integer >= 1 \(or"),
])
def test_launch_checks_the_sampler_options_before_queueing(tmp_path, capsys, override, message):
    # were queued: only build_sampler, in the job, with the index, looked at them
    root = tmp_path / "runs"
    assert main(["launch", "train", "--output-root", str(root), "sampler.name=cluster_stratified",
                 override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(": error: " + message, err[0]), err
    assert not root.exists()
