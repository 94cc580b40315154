"""The sampler interface: a stream of global batches of index row ids, one per step.

Every rank computes the same global batch from (seed, state) with no communication
and takes its contiguous slice. State is small (a step and per-stratum counters), so
`load_state_dict` restores the exact future stream, under any world size that divides
the unchanged global batch size.

A DataLoader draws batches ahead of the training step (workers x prefetch factor), so
the sampler keeps an undo record of its last `HISTORY` batches: `state_dict(step=s)`
returns the state as of `s` batches drawn, which is what a checkpoint at step s needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dinov2_patho.errors import UserError


class SamplerError(UserError):
    """A bad sampler option or state."""


def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of a global batch."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise SamplerError(f"rank {rank} is not in [0, world_size={world_size})")
    if len(batch) % world_size:
        raise SamplerError(f"global batch size {len(batch)} is not divisible by world size {world_size}")
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


HISTORY = 256


class GlobalBatchSampler(ABC):
    """Yields global batches (int64 global row ids) for steps 0, 1, 2, ..."""

    name: str = ""

    def __init__(self, batch_size: int, seed: int, pseudo_epoch_samples: int):
        if int(batch_size) < 1:
            raise SamplerError(f"global batch size must be >= 1, got {batch_size}")
        if int(pseudo_epoch_samples) < 1:
            raise SamplerError(f"sampler.pseudo_epoch_samples must be >= 1, got {pseudo_epoch_samples}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        # a pseudo-epoch is a whole number of batches, ceil(samples / B): the one formula that
        # the slide cap, the telemetry and the trainer's logs all use (via `pseudo_epoch`)
        self.epoch_batches = -(-int(pseudo_epoch_samples) // self.batch_size)
        self.step = 0
        self._undo: deque[Any] = deque(maxlen=HISTORY)

    @abstractmethod
    def _batch(self, step: int) -> tuple[np.ndarray, Any]:
        """The batch of `step` (called with step == self.step), advancing any internal
        counters, and the record that `_extra_state` needs to undo that advance."""

    def next_batch(self) -> np.ndarray:
        batch, undo = self._batch(self.step)
        self._undo.append(undo)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    def rank_slice(self, batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
        return rank_slice(batch, rank, world_size)

    def pseudo_epoch(self, step: int) -> int:
        """The pseudo-epoch holding global batch `step`."""
        return int(step) // self.epoch_batches

    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must agree on to be loadable here."""
        return {"name": self.name, "seed": self.seed, "batch_size": self.batch_size}

    @abstractmethod
    def _extra_state(self, undo: Sequence[Any]) -> dict[str, Any]:
        """State beyond the step, rolled back over the `undo` records (newest last)."""

    @abstractmethod
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `_extra_state` saved (validated)."""

    def state_dict(self, step: int | None = None) -> dict[str, Any]:
        """The state after `step` batches (default: all drawn so far); `step` may lag the
        batches drawn by up to HISTORY (a prefetching DataLoader's lead)."""
        step = self.step if step is None else int(step)
        back = self.step - step
        if not 0 <= back <= len(self._undo):
            raise SamplerError(f"cannot give the sampler state at step {step}: {self.step} batches drawn, "
                               f"undo history covers steps {self.step - len(self._undo)}..{self.step}")
        undo = list(self._undo)[len(self._undo) - back:] if back else []
        return {"fingerprint": self.fingerprint(), "step": step, **self._extra_state(undo)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, here = state.get("fingerprint"), self.fingerprint()
        if saved != here:
            diff = sorted(k for k in set(here) | set(saved or {}) if (saved or {}).get(k) != here.get(k))
            raise SamplerError(f"sampler state does not match this sampler (differs in {', '.join(diff)}): "
                               f"saved {saved}, here {here}")
        self._load_extra_state(state)
        self.step = int(state["step"])
        self._undo.clear()

    @abstractmethod
    def telemetry(self, batch: np.ndarray, step: int | None = None) -> dict[str, Any]:
        """Per-batch statistics (see telemetry.py) of `batch`, drawn at `step`: by default the
        last batch drawn, but a prefetching DataLoader runs ahead, so a trainer names the step."""

    def _telemetry_step(self, step: int | None) -> int:
        return max(self.step - 1, 0) if step is None else int(step)

