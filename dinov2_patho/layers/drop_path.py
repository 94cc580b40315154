"""Stochastic depth: a residual branch is skipped for a random subset of the samples in a batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Zero the branch output `x` for a fraction `rate` of samples, rescale the rest (timm's DropPath)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def add_residual_on_subset(x: Tensor, branch: Callable[[Tensor], Tensor], rate: float) -> Tensor:
    """`x + branch(x)` with the branch evaluated on only a random `1 - rate` of the batch.

    The same expectation as `drop_path` but the dropped samples are never computed, so a ViT-L with
    rate 0.4 spends 40% less compute in its blocks; DINOv2 does this for rates above 0.1.
    """
    b = x.shape[0]
    kept = max(int(b * (1.0 - rate)), 1)
    rows = torch.randperm(b, device=x.device)[:kept]
    residual = branch(x[rows]).to(x.dtype)
    return torch.index_add(x.flatten(1), 0, rows, residual.flatten(1), alpha=b / kept).view_as(x)
