"""Submit a job callable to SLURM with submitit, recording how it was launched.

The output directory is `<output_root>/<name>_<jobid>`; submitit's files (sbatch script,
pickles, per-task stdout/stderr) go to its `logs/`, beside which `launch.yaml` records
the command line and resources and `config.yaml` the resolved config.
"""

from __future__ import annotations

import datetime
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinov2_patho.config_files import save_config
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_write_text
from dinov2_patho.logging import get_logger
from dinov2_patho.run.jobs import JOB_ID

log = get_logger(__name__)

LOGS = "logs"


class LaunchError(UserError):
    pass


@dataclass(frozen=True)
class SlurmResources:
    """What to ask SLURM for: one task per GPU, or `tasks_per_node` tasks on a CPU partition."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None  # default: 8 with GPUs, 1 without
    partition: str | None = None
    timeout_min: int = 60
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: time to checkpoint
    max_timeouts: int = 10  # requeues after hitting the time limit (preemptions are not counted)
    extra: dict[str, str] = field(default_factory=dict)  # any other sbatch option

    def __post_init__(self) -> None:
        for name, flag in (("nodes", "--nodes"), ("timeout_min", "--timeout")):
            if getattr(self, name) < 1:
                raise LaunchError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise LaunchError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise LaunchError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node "
                              f"{self.gpus_per_node}: jobs run one task per GPU")
        for name in ("tasks_per_node", "cpus_per_task"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LaunchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def ncpus_per_task(self) -> int:
        return self.cpus_per_task or (8 if self.gpus_per_node else 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def executor_parameters(self) -> dict[str, Any]:
        """Keyword arguments of `submitit.SlurmExecutor.update_parameters`."""
        params: dict[str, Any] = {
            "nodes": self.nodes,
            "ntasks_per_node": self.ntasks_per_node,
            "cpus_per_task": self.ncpus_per_task,
            "time": self.timeout_min,
            "signal_delay_s": self.signal_delay_s,
            # one intra-op thread pool per task, sized to its CPUs (as torchrun does)
            "setup": [f"export OMP_NUM_THREADS={self.ncpus_per_task}"],
        }
        optional = {"gpus_per_node": self.gpus_per_node or None, "partition": self.partition,
                    "mem": f"{round(self.mem_gb * 1024)}M" if self.mem_gb else None, "account": self.account,
                    "qos": self.qos, "constraint": self.constraint,
                    "additional_parameters": dict(self.extra) or None}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


def parse_sbatch_options(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (sbatch long options without the dashes) as a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise LaunchError(f"--sbatch {item!r} is not of the form OPTION=VALUE (e.g. mail-type=END)")
        out[key] = value
    return out


def output_dir_pattern(output_root: str | Path, name: str) -> Path:
    return Path(output_root).expanduser().absolute() / f"{name}_{JOB_ID}"


def submit(job: Callable[[], Any], resources: SlurmResources, output_root: str | Path, name: str, *,
           config: DictConfig | None = None, argv: Sequence[str] | None = None):
    """Submit `job` and return `(submitit.Job, output_dir)`; `job` must already know
    `output_dir_pattern(output_root, name)` (the `%j` in it is the job id)."""
    import submitit

    pattern = output_dir_pattern(output_root, name)
    try:
        executor = submitit.SlurmExecutor(folder=pattern / LOGS, max_num_timeout=resources.max_timeouts)
    except RuntimeError as e:  # submitit's "Could not detect srun"
        raise LaunchError(f"cannot submit to SLURM here: {e}") from e
    executor.update_parameters(job_name=name, **resources.executor_parameters())
    try:
        submitted = executor.submit(job)
    except (submitit.core.utils.FailedJobError, OSError) as e:
        reason = " | ".join(line for line in str(e).splitlines() if line.strip())
        raise LaunchError(f"sbatch refused the job: {reason}") from e
    output_dir = Path(str(pattern).replace(JOB_ID, submitted.job_id))
    record = {
        "job_id": submitted.job_id,
        "command_line": shlex.join(argv if argv is not None else sys.argv),
        "cwd": os.getcwd(),
        "python": sys.executable,
        "submitted_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "output_dir": str(output_dir),
        "resources": asdict(resources),
    }
    atomic_write_text(output_dir / LOGS / "launch.yaml", OmegaConf.to_yaml(OmegaConf.create(record)))
    if config is not None:
        save_config(config, output_dir / LOGS / "config.yaml")
    log.info("submitted SLURM job %s (%d task(s)); output %s", submitted.job_id, resources.world_size,
             output_dir)
    return submitted, output_dir
