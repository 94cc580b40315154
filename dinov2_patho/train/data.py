"""The training data stream: global batches from the sampler, this rank's slice, tiles read
and augmented in DataLoader workers, collated with iBOT masks.

Every random draw of the data path is seeded from (seed, step, position) rather than from
a worker's RNG stream, so batch `step` is the same tensors whichever worker builds it,
with or without a resume in between. The DataLoader runs ahead of the training step; the
batch sampler therefore remembers each step's global batch (for telemetry and the row-id
check) until the trainer consumes it, and the checkpoint asks the sampler for its state
as of the consumed step (`GlobalBatchSampler.state_dict(step)`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from dinov2_patho.data.augment import MultiCropAugmentation
from dinov2_patho.data.collate import collate_multicrop
from dinov2_patho.data.masking import MaskingGenerator

# Streams of the seed derivation: one per kind of draw, so none shares another's seeds
# (2 is the trainer's per-rank model RNG).
_AUGMENT, _MASKS, _LOADER = 0, 1, 3


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*keys))


class StepBatchSampler:
    """For `DataLoader(batch_sampler=...)`: this rank's slice of each global batch, as
    (step, position, row id) keys, from step `start` on; never ends (the trainer counts)."""

    def __init__(self, sampler, rank: int, world_size: int, start: int):
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        if sampler.step != start:
            raise ValueError(f"sampler is at step {sampler.step}, expected {start}")
        self._global: dict[int, np.ndarray] = {}

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        while True:
            step = self.sampler.step
            batch = self.sampler.next_batch()
            self._global[step] = batch
            rows = self.sampler.rank_slice(batch, self.rank, self.world_size)
            yield [(step, pos, int(row)) for pos, row in enumerate(rows.tolist())]

    def pop_global_batch(self, step: int) -> np.ndarray:
        """The global batch of `step`, once: the trainer calls it as it consumes the step."""
        for old in [s for s in self._global if s < step]:
            del self._global[old]
        return self._global.pop(step)


class SeededAugmentDataset(torch.utils.data.Dataset):
    """Reads tile `row` through `tiles` (a TileDataset without transform) and augments it
    with a generator seeded from (seed, step, position)."""

    def __init__(self, tiles: torch.utils.data.Dataset, augment: MultiCropAugmentation, seed: int):
        self.tiles, self.augment, self.seed = tiles, augment, seed

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[tuple[dict, int], int]:
        step, pos, row = key
        image, row_id = self.tiles[row]
        crops = self.augment(image, generator=_generator(self.seed, _AUGMENT, step, pos))
        return (crops, row_id), step


def collate_seeded(items: list[tuple[tuple[dict, int], int]], *, seed: int,
                   **collate_kw: Any) -> dict[str, Any]:
    """`collate_multicrop` with its masks drawn from a generator seeded by the batch's step;
    the batch dict gains "step"."""
    steps = {step for _, step in items}
    if len(steps) != 1:
        raise RuntimeError(f"a batch mixes steps {sorted(steps)}")
    step = steps.pop()
    batch = collate_multicrop([sample for sample, _ in items], generator=_generator(seed, _MASKS, step),
                              **collate_kw)
    batch["step"] = step
    return batch


def build_collate(cfg: DictConfig, seed: int):
    grid = int(cfg.crops.global_crops_size) // int(cfg.student.patch_size)
    masking = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    return partial(collate_seeded, seed=seed, mask_ratio_min_max=tuple(cfg.ibot.mask_ratio_min_max),
                   mask_probability=float(cfg.ibot.mask_sample_probability), mask_generator=masking)


def build_loader(dataset: torch.utils.data.Dataset, batch_sampler: StepBatchSampler, collate,
                 cfg: DictConfig, pin_memory: bool) -> torch.utils.data.DataLoader:
    workers = int(cfg.train.num_workers)
    extra = {"prefetch_factor": int(cfg.train.prefetch_factor), "persistent_workers": True} if workers else {}
    # The loader draws its workers' base seed when iterated; from its own generator, not the
    # global one, so starting the loader (fresh or resumed) leaves the model's RNG stream alone.
    generator = _generator(int(cfg.train.seed), _LOADER)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                       collate_fn=collate, pin_memory=pin_memory, generator=generator,
                                       **extra)
