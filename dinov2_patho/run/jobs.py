"""The callables submitit pickles and runs on every task of a SLURM job.

Each sets torch.distributed's env:// variables from SLURM's, then runs its payload.
`checkpoint()` is submitit's preemption/timeout hook: it returns the same callable,
which submitit requeues. The output directory is named by the job id, which a requeue
keeps, so the requeued training resumes from its latest checkpoint.

Training does not let submitit requeue from inside its SIGUSR2 handler, mid-iteration:
the signal asks the trainer to stop (`request_stop`), every rank agrees at the next
iteration boundary and writes a checkpoint, and only then does task 0 hand over to
submitit's handler, which calls `checkpoint()`, requeues the job and exits. A job killed
without that signal (`scontrol requeue`, a node failure) resumes from the last periodic
checkpoint instead.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import submitit

from dinov2_patho.logging import get_logger
from dinov2_patho.run.env import submitit_distributed_env

log = get_logger(__name__)

JOB_ID = "%j"  # in a path or argument: replaced by the SLURM job id when the job runs


def _job_id() -> str:
    return submitit.JobEnvironment().job_id


def resolve_job_path(pattern: str | Path) -> Path:
    return Path(str(pattern).replace(JOB_ID, _job_id()))


class TrainJob:
    """`run_training(cfg, output_dir)` on every task; `cfg` is the resolved config as a dict."""

    def __init__(self, cfg: dict[str, Any], output_dir: str | Path) -> None:
        self.cfg = cfg
        self.output_dir = str(output_dir)

    def __call__(self) -> dict[str, Any]:
        from omegaconf import OmegaConf

        from dinov2_patho.train.config import load_train_config
        from dinov2_patho.train.trainer import install_stop_handlers, run_training

        env = submitit_distributed_env()
        os.environ.update(env)
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        install_stop_handlers([signal.SIGUSR2])
        # the config as submitted: a requeue may run newer code, whose schema it is brought to
        cfg = load_train_config(OmegaConf.create(self.cfg), source=f"the config of SLURM job {_job_id()}")
        summary = run_training(cfg, resolve_job_path(self.output_dir))
        if summary["stopped"] and env["RANK"] == "0" and callable(requeue):
            log.warning("stopped at iteration %d with checkpoint %s: requeuing", summary["iteration"],
                        summary["checkpoint"])
            requeue(signal.SIGUSR2, None)  # exits this process
        return summary

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)


class CommandJob:
    """A `dinov2-patho` subcommand (`argv` without the program name) on every task; `%j` in an
    argument becomes the job id. Requeued after preemption, it runs again from the start."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        from dinov2_patho.cli import main

        os.environ.update(submitit_distributed_env())
        job_id = _job_id()
        argv = [arg.replace(JOB_ID, job_id) for arg in self.argv]
        code = main(argv)
        if code:
            raise RuntimeError(f"dinov2-patho {' '.join(argv)} exited with status {code}")
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        log.warning("preempted or out of time: requeuing `dinov2-patho %s`", " ".join(self.argv))
        return submitit.helpers.DelayedSubmission(self)
