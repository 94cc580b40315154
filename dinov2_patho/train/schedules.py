"""Per-iteration schedules, as in DINOv2, computed in closed form from the iteration.

Nothing is precomputed or stored: the value at iteration `it` depends only on `it` and
the config, so a resumed run needs nothing but the iteration to rejoin its schedules.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from omegaconf import DictConfig

from dinov2_patho.config_files import ConfigError
from dinov2_patho.registry import did_you_mean

_RULES = ("sqrt_wrt_1024", "linear_wrt_1024", "none")


def warmup_cosine(it: int, *, base: float, final: float, total: int, warmup: int = 0,
                  start_warmup: float = 0.0) -> float:
    """Linear warmup from `start_warmup` to `base` over `warmup` iterations (both ends
    included, as DINOv2's linspace), then a half cosine from `base` to `final` over the
    remaining `total - warmup` iterations; `final` from `total` on."""
    if it < 0:
        raise ValueError(f"iteration must be >= 0, got {it}")
    warmup = min(warmup, total)
    if it < warmup:
        if warmup == 1:
            return start_warmup
        return start_warmup + (base - start_warmup) * it / (warmup - 1)
    if it >= total:
        return final
    span = total - warmup
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * (it - warmup) / span))


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    last_layer_lr: float
    wd: float
    momentum: float
    teacher_temp: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """The peak lr for a global batch: DINOv2 scales `base_lr` (given for 1024) by sqrt."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear_wrt_1024":
        return base_lr * global_batch / 1024
    if rule == "none":
        return base_lr
    raise ConfigError(f"optim.scaling_rule: unknown rule {rule!r}{did_you_mean(rule, _RULES)}")


class Schedules:
    """lr, weight decay, teacher momentum, teacher temperature and the last-layer lr
    (zero while the last layer of the heads is frozen) at any iteration."""

    def __init__(self, cfg: DictConfig, global_batch: int):
        self.total = int(cfg.train.iterations)
        self.peak_lr = scaled_lr(float(cfg.optim.base_lr), global_batch, str(cfg.optim.scaling_rule))
        self.optim = cfg.optim
        self.teacher = cfg.teacher

    def at(self, it: int) -> ScheduleValues:
        o, t = self.optim, self.teacher
        lr = warmup_cosine(it, base=self.peak_lr, final=float(o.min_lr), total=self.total,
                           warmup=int(o.warmup_iterations))
        wd = warmup_cosine(it, base=float(o.weight_decay), final=float(o.weight_decay_end), total=self.total)
        momentum = warmup_cosine(it, base=float(t.momentum_teacher), final=float(t.final_momentum_teacher),
                                 total=self.total)
        temp_warmup = int(t.warmup_teacher_temp_iterations)
        teacher_temp = warmup_cosine(it, base=float(t.teacher_temp), final=float(t.teacher_temp),
                                     total=temp_warmup, warmup=temp_warmup,
                                     start_warmup=float(t.warmup_teacher_temp))
        last_layer_lr = 0.0 if it < int(o.freeze_last_layer_iterations) else lr
        return ScheduleValues(lr=lr, last_layer_lr=last_layer_lr, wd=wd, momentum=momentum,
                              teacher_temp=teacher_temp)
