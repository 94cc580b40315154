"""torch.distributed in one place: the rank of this process, and the process group a job joins.

The rank questions import torch only when it is already loaded: logging (which asks for the
rank) must not cost a torch import in commands that never use it, like `index build`. The
process group is joined by `distributed_context` with env:// rendezvous (torchrun, submitit),
NCCL on GPU, gloo on CPU; it is a no-op for a single process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dinov2_patho.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cuda", "cpu")


def is_initialized() -> bool:
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError as e:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from e


def uses_cuda(device: str, key: str = "train.device") -> bool:
    """Whether `device` (one of DEVICES, from config key `key`) means CUDA here; a UserError for a
    device that is not one of them, or cuda where no CUDA device is visible (also for --dry-run)."""
    import torch

    if device not in DEVICES:
        raise UserError(f"{key}: {device!r} is not one of {', '.join(DEVICES)}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but no CUDA device is visible")
    return use_cuda


@contextlib.contextmanager
def distributed_context(device: str = "auto", key: str = "train.device") -> Iterator[DistContext]:
    """Join the process group named by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT when
    WORLD_SIZE > 1 (unless the caller already did), and leave it on exit if we joined. `key`:
    the config key `device` came from, named by its errors."""
    import torch
    import torch.distributed as dist

    use_cuda = uses_cuda(device, key)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    owned = False
    if world_size > 1 and not dist.is_initialized():
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise UserError(f"WORLD_SIZE={world_size} but {name} is not set (launch with torchrun)")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
        owned = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    try:
        yield DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """`obj` from rank `src` on every rank."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

