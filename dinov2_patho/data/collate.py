"""Batch multi-crop samples and draw the iBOT masks (DINOv2's collate, without static padding).

Crops are stacked crop-major: global_crops[c * B + i] is crop c of sample i, so
`global_crops.chunk(2)` gives the two views of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dinov2_patho.data.masking import MaskingGenerator
from dinov2_patho.errors import UserError


def draw_masks(n_images: int, n_tokens: int, mask_ratio_min_max: tuple[float, float], mask_probability: float,
               mask_generator: MaskingGenerator, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool masks [n_images, n_tokens]: a fraction `mask_probability` of the images is masked, with
    ratios spread evenly over the range (stratified, as in DINOv2), the rest unmasked; shuffled."""
    lo, hi = mask_ratio_min_max
    n_masked = int(n_images * mask_probability)
    edges = torch.linspace(lo, hi, n_masked + 1).tolist()
    masks = []
    for i in range(n_masked):
        ratio = edges[i] + (edges[i + 1] - edges[i]) * torch.rand((), generator=generator).item()
        masks.append(mask_generator(int(n_tokens * ratio), generator=generator).flatten())
    masks += [torch.zeros(n_tokens, dtype=torch.bool)] * (n_images - n_masked)
    order = torch.randperm(n_images, generator=generator)
    return torch.stack(masks)[order]


def collate_multicrop(samples: Sequence[tuple[dict[str, list[torch.Tensor]], int]], *,
                      mask_ratio_min_max: tuple[float, float], mask_probability: float,
                      mask_generator: MaskingGenerator,
                      generator: torch.Generator | None = None) -> dict[str, Any]:
    """samples: (MultiCropAugmentation output, row id) pairs, as TileDataset yields them.

    Returns global_crops [2B,3,H,W], local_crops [nB,3,h,w] (empty when n = 0), masks [2B,N] bool
    for the global crops, mask_indices [M] (flat indices of the masked patches into the [2B*N]
    patch tokens), masks_weight [M] (1 / masked patches of that crop: the iBOT loss averages per
    image), n_masked_patches, row_ids [B] int64, n_global_crops, n_local_crops.
    """
    if not samples:
        raise UserError("collate: empty batch")
    first = samples[0][0]
    n_global, n_local = len(first["global_crops"]), len(first["local_crops"])
    global_crops = torch.stack([s["global_crops"][c] for c in range(n_global) for s, _ in samples])
    if n_local:
        local_crops = torch.stack([s["local_crops"][c] for c in range(n_local) for s, _ in samples])
    else:
        local_crops = global_crops.new_zeros((0, *global_crops.shape[1:]))
    n_tokens = mask_generator.num_patches
    masks = draw_masks(len(global_crops), n_tokens, mask_ratio_min_max, mask_probability, mask_generator,
                       generator)
    mask_indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
    masks_weight = (1.0 / per_image).expand_as(masks)[masks]
    return {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": int(mask_indices.numel()),
        "row_ids": torch.tensor([int(r) for _, r in samples], dtype=torch.int64),
        "n_global_crops": n_global,
        "n_local_crops": n_local,
    }

