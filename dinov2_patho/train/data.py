"""The training data stream: global batches from the sampler, this rank's slice (through
`samplers.StepBatchSampler`), tiles read and augmented in DataLoader workers, collated with
iBOT masks.

Every random draw of the data path is seeded from (seed, step, position) rather than from
a worker's RNG stream, so batch `step` is the same tensors whichever worker builds it,
with or without a resume in between.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from dinov2_patho.data.augment import MultiCropAugmentation
from dinov2_patho.data.collate import collate_multicrop
from dinov2_patho.data.masking import MaskingGenerator
from dinov2_patho.errors import UserError
from dinov2_patho.samplers import StepBatchSampler

# Streams of the seed derivation: one per kind of draw, so none shares another's seeds
# (2 is the trainer's per-rank model RNG).
_AUGMENT, _MASKS, _LOADER = 0, 1, 3


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*keys))


class SeededAugmentDataset(torch.utils.data.Dataset):
    """Reads tile `row` through `tiles` (a TileDataset without transform) and augments it
    with a generator seeded from (seed, step, position)."""

    def __init__(self, tiles: torch.utils.data.Dataset, augment: MultiCropAugmentation, seed: int):
        self.tiles, self.augment, self.seed = tiles, augment, seed

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[tuple[dict, int] | UserError, int]:
        step, pos, row = key
        try:
            image, row_id = self.tiles[row]
        except UserError as e:
            # Carried to the main process in the batch: raised in a worker, it would reach the
            # user as a worker traceback (DataLoader re-raises a re-typed copy, message and all).
            return UserError(str(e)), step
        crops = self.augment(image, generator=_generator(self.seed, _AUGMENT, step, pos))
        return (crops, row_id), step


def collate_seeded(items: list[tuple[tuple[dict, int], int]], *, seed: int,
                   **collate_kw: Any) -> dict[str, Any]:
    """`collate_multicrop` with its masks drawn from a generator seeded by the batch's step;
    the batch dict gains "step". A sample that failed with a UserError makes the batch
    {"step", "error"}: the trainer raises it, as the same one line."""
    steps = {step for _, step in items}
    if len(steps) != 1:
        raise RuntimeError(f"a batch mixes steps {sorted(steps)}")
    step = steps.pop()
    failed = next((sample for sample, _ in items if isinstance(sample, UserError)), None)
    if failed is not None:
        return {"step": step, "error": failed}
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
