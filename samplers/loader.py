"""The one bridge from a sampler to a DataLoader: this rank's slice of each global batch.

    batches = StepBatchSampler(sampler, rank, world_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=8)
    for batch in loader: ...     # the dataset gets keys (step, position in the slice, row id)

Batches are computed in the main process (the sampler's counters live there), so workers
only load tiles; a key carries its step and position, so a dataset can seed its random
draws by them and build the same tensors in whichever worker. The loader runs ahead of
the training step, so the adapter remembers each step's global batch until the consumer
takes it (`pop_global_batch`), and a checkpoint asks the sampler for its state as of the
consumed step (`GlobalBatchSampler.state_dict(step)`). Like DINOv2's infinite samplers,
iteration never ends: the consumer counts steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .base import GlobalBatchSampler, SamplerError, rank_slice


class StepBatchSampler:
    """For `DataLoader(dataset, batch_sampler=...)`: lists of (step, position, row id) keys."""

    def __init__(self, sampler: GlobalBatchSampler, rank: int, world_size: int, start: int | None = None):
        rank_slice(np.empty(sampler.batch_size), rank, world_size)  # validate once, early
        if start is not None and sampler.step != start:
            raise SamplerError(f"sampler is at step {sampler.step}, expected {start}")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self._global: dict[int, np.ndarray] = {}

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        while True:
            step = self.sampler.step
            batch = self.sampler.next_batch()
            self._global[step] = batch
            rows = self.sampler.rank_slice(batch, self.rank, self.world_size)
            yield [(step, pos, int(row)) for pos, row in enumerate(rows.tolist())]

    def pop_global_batch(self, step: int) -> np.ndarray:
        """The global batch of `step`, once (older ones are dropped): call it as the step is consumed."""
        for old in [s for s in self._global if s < step]:
            del self._global[old]
        return self._global.pop(step)
