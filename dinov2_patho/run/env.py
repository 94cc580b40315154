"""torch.distributed's env:// variables from SLURM's, so no torchrun is needed.

SLURM starts one task per GPU (or per CPU slot); each task derives RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from its SLURM variables.
Every task of a job computes the same master address (the first node) and port (from
the job id, so a requeued job, which keeps its id, keeps its port too).
"""

from __future__ import annotations

from collections.abc import Sequence

from dinov2_patho.errors import UserError

# Ports below 20000 are often taken by services; the job id spreads jobs sharing a node.
PORT_BASE = 20000
PORT_SPAN = 20000


def master_port(job_id: str) -> int:
    digits = "".join(c for c in job_id if c.isdigit())
    return PORT_BASE + int(digits or 0) % PORT_SPAN


def distributed_env(*, global_rank: int, local_rank: int, num_tasks: int, num_nodes: int,
                    hostnames: Sequence[str], job_id: str) -> dict[str, str]:
    """The env:// variables of one task of a SLURM job."""
    if num_tasks % num_nodes:
        raise UserError(f"SLURM job {job_id}: {num_tasks} tasks do not split evenly over {num_nodes} nodes")
    if not 0 <= global_rank < num_tasks:
        raise UserError(f"SLURM job {job_id}: rank {global_rank} outside [0, {num_tasks})")
    return {
        "RANK": str(global_rank),
        "WORLD_SIZE": str(num_tasks),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(num_tasks // num_nodes),
        "MASTER_ADDR": hostnames[0],
        "MASTER_PORT": str(master_port(job_id)),
    }


def submitit_distributed_env() -> dict[str, str]:
    """`distributed_env` for the current task of a submitit job."""
    import submitit

    job = submitit.JobEnvironment()
    return distributed_env(global_rank=job.global_rank, local_rank=job.local_rank, num_tasks=job.num_tasks,
                           num_nodes=job.num_nodes, hostnames=job.hostnames, job_id=job.job_id)
