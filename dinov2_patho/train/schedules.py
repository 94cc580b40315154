"""Per-iteration schedules, as in DINOv2, computed in closed form from the iteration.

Nothing is precomputed or stored: the value at iteration `it` depends only on `it` and
the config, so a resumed run needs nothing but the iteration to rejoin its schedules. What they
follow: the training config's `optim` (`OptimConfig`) and `teacher` (`TeacherConfig`) sections.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from omegaconf import DictConfig

from dinov2_patho.config_files import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    UNIT_HALF_OPEN,
    UNIT_OPEN,
    ConfigError,
    check_section,
)
from dinov2_patho.registry import did_you_mean

_RULES = ("sqrt_wrt_1024", "linear_wrt_1024", "none")


@dataclass
class OptimConfig:
    """The `optim` section of the training config: AdamW and its schedules, in iterations (DINOv2's
    100 epochs of 1,250 iterations are 125,000; its 10 epochs of lr warmup 12,500, its 1 epoch of frozen
    last layer 1,250)."""

    base_lr: float = 0.004            # for a global batch of 1024; scaled by scaling_rule
    scaling_rule: str = "sqrt_wrt_1024"
    min_lr: float = 1.0e-06
    warmup_iterations: int = 12500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0            # 0: no clipping
    freeze_last_layer_iterations: int = 1250
    layerwise_decay: float = 0.9
    token_weight_decay: bool = False  # true: cls/register/mask tokens and pos_embed decayed too, as DINOv2
    patch_embed_lr_mult: float = 0.2
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999

    def __post_init__(self) -> None:
        check_section("optim", self, numbers={
            "base_lr": POSITIVE, "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
            "weight_decay_end": NON_NEGATIVE, "clip_grad": NON_NEGATIVE, "layerwise_decay": UNIT_HALF_OPEN,
            "patch_embed_lr_mult": NON_NEGATIVE, "adamw_beta1": UNIT_OPEN, "adamw_beta2": UNIT_OPEN},
            integers={"warmup_iterations": 0, "freeze_last_layer_iterations": 0})


@dataclass
class TeacherConfig:
    """The `teacher` section of the training config: the EMA teacher's momentum and temperature
    (DINOv2's 30 epochs of temperature warmup are 37,500 iterations)."""

    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_iterations: int = 37500
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp | centering (EMA center, momentum 0.9)

    def __post_init__(self) -> None:
        check_section("teacher", self, numbers={
            "momentum_teacher": UNIT, "final_momentum_teacher": UNIT, "warmup_teacher_temp": POSITIVE,
            "teacher_temp": POSITIVE}, integers={"warmup_teacher_temp_iterations": 0})


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
