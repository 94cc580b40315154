"""AdamW over the student's parameter groups, driven by the schedules each iteration.

Groups come from `SSLMetaArch.get_params_groups()` as in DINOv2: each carries an
`lr_multiplier` (layer-wise decay, patch-embed multiplier), a `wd_multiplier` (0 for
biases and norms) and `is_last_layer` (the heads' last layer, frozen early on).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig

from dinov2_patho.train.schedules import ScheduleValues


def build_optimizer(params_groups: Iterable[dict], cfg: DictConfig) -> torch.optim.AdamW:
    groups = [dict(g) for g in params_groups]
    for g in groups:
        g.setdefault("lr_multiplier", 1.0)
        g.setdefault("wd_multiplier", 1.0)
        g.setdefault("is_last_layer", False)
    # lr and weight decay are overwritten by apply_schedule before every step
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0,
                             betas=(float(cfg.optim.adamw_beta1), float(cfg.optim.adamw_beta2)))


def apply_schedule(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    for g in optimizer.param_groups:
        lr = values.last_layer_lr if g["is_last_layer"] else values.lr
        g["lr"] = lr * g["lr_multiplier"]
        g["weight_decay"] = values.wd * g["wd_multiplier"]
