"""What a training checkpoint holds besides its iteration, world size and config: the trainer's
`checkpointed()` dict, key -> an object with `state_dict()` / `load_state_dict()`, saved and resumed by
one loop each (train/checkpoint.py writes and reads the files).

`collective`: every rank takes part in `state_dict()` (FSDP gathers the shards); the other parts are
taken on rank 0 only.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from dinov2_patho.train import fsdp

_DDP_PREFIX = re.compile(r"^(student\.[^.]+\.)module\.")


class ModelState:
    """The model's state without DDP's `module.` level, as `load_state_dict` before wrapping wants.
    Under FSDP: unsharded, on rank 0 only (collective), and loaded back into each rank's shards."""

    def __init__(self, model: nn.Module, sharded: bool):
        self.model, self.collective = model, sharded

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.collective:
            return fsdp.full_state_dict(self.model)
        return {_DDP_PREFIX.sub(r"\1", k): v for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.collective:
            fsdp.load_full_model_state(self.model, state)
        else:
            self.model.load_state_dict(state)


class OptimizerState:
    """The optimizer's state in `Optimizer.state_dict()`'s layout (under FSDP: gathered, collective)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool):
        self.model, self.optimizer, self.collective = model, optimizer, sharded

    def state_dict(self) -> dict[str, Any]:
        if self.collective:
            return fsdp.full_optimizer_state(self.model, self.optimizer)
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.collective:
            fsdp.load_full_optimizer_state(self.model, self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)


class ScalerState:
    """The fp16 grad scaler's state, None for a run without one (saved as None, and a None loads as
    nothing)."""

    collective = False

    def __init__(self, scaler: Any):
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)


class SamplerState:
    """The sampler's state as of `iteration` completed iterations."""

    collective = False

    def __init__(self, sampler: Any, iteration: int):
        self.sampler, self.iteration = sampler, iteration

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict(step=self.iteration)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
