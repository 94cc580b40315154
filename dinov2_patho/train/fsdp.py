"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) for the largest models.

Each transformer block is a shard unit, then each student and teacher module (backbone, heads) as a
whole, so parameters are gathered one block at a time. Student and teacher are sharded alike, so
every teacher parameter's local shard matches its student's and the EMA runs on local shards.

Checkpoints hold the full (unsharded) state in the same format as under DDP: the model's state dict
and `optimizer.state_dict()`'s layout (parameters numbered in param-group order), so a checkpoint
resumes under either mode and `dinov2-patho export` reads it unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dinov2_patho.train.ssl_meta_arch import SSLMetaArch, autocast_dtype

# gathered on rank 0 only, in CPU memory: a ViT-g's full state does not fit twice on a GPU
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True)
# student modules' parameter names in the param groups are relative to `SSLMetaArch.student`
_STUDENT = "student."
_BACKBONE_VIEWS = r"FSDP2-wrapped module \(\w*VisionTransformer\) returned a view tensor"


def mixed_precision(amp: str | bool, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters for compute (when compute_precision.amp resolves to bf16) with gradients
    reduced in fp32; sharded parameters and optimizer state stay fp32 either way."""
    dtype = autocast_dtype(amp, device)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_model(model: SSLMetaArch, device: torch.device) -> None:
    """Shard the student and teacher in place over all ranks (collective). Call it before building
    the optimizer: sharding replaces the parameters with DTensors."""
    # the same starting point everywhere, as DDP's construction guarantees
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(model.amp, device)
    # FSDP2 warns that the backbone returns views (its cls, register and patch slices of x_norm, as
    # DINOv2's does): harmless, for only an in-place op on one would skip the all-gather and nothing
    # writes into them (ssl_meta_arch chunks, flattens and indexes; DDP == FSDP2 in test_train_fsdp)
    warnings.filterwarnings("ignore", message=_BACKBONE_VIEWS, category=UserWarning)
    for tower in (model.student, model.teacher):
        for module in tower.values():
            for block in getattr(module, "blocks", ()):
                fully_shard(block, mesh=mesh, mp_policy=policy)
            # FSDP keeps a root's parameters gathered after forward, for the backward that follows; the
            # teacher has none, and its EMA update needs the shards back
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=tower is model.teacher)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor's full value (collective), anything else as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s unsharded state dict on rank 0, on CPU; empty on other ranks (collective)."""
    return get_model_state_dict(module, options=_GATHER)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's unsharded state on rank 0 (collective; an empty dict elsewhere), in
    `optimizer.state_dict()`'s layout."""
    optim_state = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    return _numbered(optim_state) if optim_state else {}


def load_full_model_state(model: nn.Module, model_state: dict[str, Any]) -> None:
    """Load a full model state (every rank passes it) into the sharded model: each rank keeps its shards."""
    set_model_state_dict(model, model_state, options=_SCATTER)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              optim_state: dict[str, Any]) -> None:
    """Load a full optimizer state (every rank passes it, after the model's) into the sharded optimizer."""
    set_optimizer_state_dict(model, optimizer, _named(optim_state), options=_SCATTER)


def _numbered(state: dict[str, Any]) -> dict[str, Any]:
    """Name-keyed optimizer state (torch.distributed.checkpoint) -> `Optimizer.state_dict()`'s layout:
    parameters numbered 0, 1, ... through the param groups in order."""
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [ids.setdefault(fqn, len(ids)) for fqn in group["params"]]})
    return {"state": {ids[fqn]: v for fqn, v in state["state"].items()}, "param_groups": groups}


def _named(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_numbered`, naming parameters from each group's `names` (SSLMetaArch's
    param groups carry them, relative to the student)."""
    fqns: dict[int, str] = {}
    groups = []
    for group in state["param_groups"]:
        names = [_STUDENT + name for name in group["names"]]
        fqns.update(zip(group["params"], names))
        groups.append({**group, "params": names})
    return {"state": {fqns[i]: v for i, v in state["state"].items()}, "param_groups": groups}
