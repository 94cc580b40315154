"""Block-wise masks for iBOT (BEiT's generator, as used by DINOv2).

A mask is grown from random rectangles (area, log-uniform aspect ratio) until it covers the
requested number of patches, so masked regions are blobs rather than scattered patches.
All randomness comes from torch (the global generator or the one passed), so a DataLoader
worker seeded by torch gives reproducible masks.
"""

from __future__ import annotations

import math

import torch

from dinov2_patho.errors import UserError


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator).item())


class MaskingGenerator:
    def __init__(self, input_size: int | tuple[int, int], max_num_patches: float | None = None,
                 min_num_patches: int = 4, min_aspect: float = 0.3, max_aspect: float | None = None,
                 attempts: int = 10):
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if height < 1 or width < 1:
            raise UserError(f"masking: patch grid {height}x{width} is empty")
        if not 0 < min_aspect <= (max_aspect or 1 / min_aspect):
            raise UserError(f"masking: bad aspect range min_aspect={min_aspect}, max_aspect={max_aspect}")
        self.height, self.width = height, width
        self.num_patches = height * width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
        self.attempts = attempts

    def __repr__(self) -> str:
        return (f"MaskingGenerator({self.height}x{self.width}, "
                f"block {self.min_num_patches}..{self.max_num_patches} patches, "
                f"log-aspect {self.log_aspect[0]:.2f}..{self.log_aspect[1]:.2f})")

    def _add_block(self, mask: torch.Tensor, budget: float, generator: torch.Generator | None) -> int:
        """Mask one rectangle that adds between 1 and `budget` new patches; return how many it added."""
        for _ in range(self.attempts):
            area = _uniform(self.min_num_patches, budget, generator)
            aspect = math.exp(_uniform(*self.log_aspect, generator))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = _randint(0, self.height - h, generator)
            left = _randint(0, self.width - w, generator)
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block.fill_(True)
                return new
        return 0

    def __call__(self, num_masking_patches: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool mask [height, width] with at most `num_masking_patches` True (fewer when the
        rectangles stop fitting; DINOv2 behaves the same)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), generator)
            if added == 0:
                break
            count += added
        return mask
