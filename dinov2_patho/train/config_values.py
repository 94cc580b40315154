"""Value domains of the training config: a value outside its domain (a zero learning rate, a
momentum above 1) is a one-line error naming the key, before any model or worker starts.

Keys are the config's business (train/config.py); this module only says which values each
numeric key may take (the domains and their checker are config_files.py's, shared with evaluation and
curation). Crops and augmentation are checked by `AugmentConfig` itself. On resume,
`check_resume_config` names the keys whose values changed since the checkpoint.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinov2_patho.config_files import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    UNIT_HALF_OPEN,
    UNIT_OPEN,
    ConfigError,
    Domain,
    check_domains,
)
from dinov2_patho.data.augment import AugmentConfig
from dinov2_patho.logging import get_logger
from dinov2_patho.models import BACKBONES
from dinov2_patho.models.student import SIZE_KEYS
from dinov2_patho.train.config_schema import migrate

log = get_logger(__name__)

NUMBERS: dict[str, Domain] = {
    "optim.base_lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.weight_decay_end": NON_NEGATIVE,
    "optim.clip_grad": NON_NEGATIVE,
    "optim.layerwise_decay": UNIT_HALF_OPEN,
    "optim.patch_embed_lr_mult": NON_NEGATIVE,
    "optim.adamw_beta1": UNIT_OPEN,
    "optim.adamw_beta2": UNIT_OPEN,
    "teacher.momentum_teacher": UNIT,
    "teacher.final_momentum_teacher": UNIT,
    "teacher.warmup_teacher_temp": POSITIVE,
    "teacher.teacher_temp": POSITIVE,
    "dino.loss_weight": NON_NEGATIVE,
    "dino.koleo_loss_weight": NON_NEGATIVE,
    "ibot.loss_weight": NON_NEGATIVE,
    "student.drop_path_rate": UNIT_OPEN,
}
OPTIONAL_NUMBERS: dict[str, Domain] = {
    "student.layerscale": POSITIVE,
    "data.mpp_override": POSITIVE,
}
INTEGERS: dict[str, int] = {  # key: minimum
    "optim.warmup_iterations": 0,
    "optim.freeze_last_layer_iterations": 0,
    "teacher.warmup_teacher_temp_iterations": 0,
    "student.patch_size": 1,
    "student.num_register_tokens": 0,
    "dino.head_n_prototypes": 1,
    "dino.head_bottleneck_dim": 1,
    "dino.head_nlayers": 1,
    "dino.head_hidden_dim": 1,
    "ibot.head_n_prototypes": 1,
    "ibot.head_bottleneck_dim": 1,
    "ibot.head_nlayers": 1,
    "ibot.head_hidden_dim": 1,
    "data.cache_size": 1,
}
OPTIONAL_INTEGERS: dict[str, int] = {
    "data.max_skipped": 0,
}


def check_values(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value outside its domain."""
    check_domains(cfg, {**NUMBERS, **OPTIONAL_NUMBERS}, {**INTEGERS, **OPTIONAL_INTEGERS},
                  optional=(*OPTIONAL_NUMBERS, *OPTIONAL_INTEGERS))
    arch = cfg.student.arch
    if arch is not None and arch not in BACKBONES:
        raise ConfigError(f"student.arch={arch!r} is unknown (valid: {', '.join(BACKBONES.names())}; or null "
                          f"with student.embed_dim, depth and num_heads)")
    sizes = [k for k in SIZE_KEYS if cfg.student[k] is not None]
    if sizes and cfg.student.arch is not None:
        raise ConfigError(f"student.arch={cfg.student.arch} and student.{sizes[0]} are both set: explicit "
                          f"sizes build their own ViT, so set student.arch=null for them, or drop the sizes")
    dim, heads = cfg.student.embed_dim, cfg.student.num_heads
    if dim is not None and heads and dim % heads:  # attention splits embed_dim over the heads
        raise ConfigError(f"student.embed_dim={dim} is not divisible by student.num_heads={heads}")
    AugmentConfig.from_config(cfg)  # crops and augmentation


# Keys that may change on resume without changing what is computed: how fast, where from, how
# often logged or saved. Any other change breaks exact resume (batches, schedules, numerics).
RESUME_SAFE = ("train.num_workers", "train.prefetch_factor", "train.log_every", "train.cpu_threads",
               "train.resume", "train.distributed", "checkpoint.", "evaluation.", "data.slides",
               "data.backend", "data.fallback", "data.tile_store", "data.cache_size", "data.on_error",
               "data.max_skipped")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(saved: dict[str, Any], cfg: DictConfig, source: str) -> tuple[list[str], str]:
    """The keys changed from `saved` (of `source`, in any schema: compared under today's names) to `cfg`
    outside RESUME_SAFE, and every change listed ("" if none)."""
    saved = OmegaConf.to_container(migrate(OmegaConf.create(saved), None, source))
    old, new = _flat(saved), _flat(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    return ([k for k in changed if not k.startswith(RESUME_SAFE)],
            ", ".join(f"{k} ({old[k]!r} -> {new[k]!r})" for k in changed))


def check_resume_config(saved: dict[str, Any], cfg: DictConfig, source: str, *, force: bool) -> None:
    """Compare the config a checkpoint was written under with this run's: a changed key is
    named in a warning; a changed key outside RESUME_SAFE is refused unless `force`."""
    unsafe, listed = config_changes(saved, cfg, source)
    if not listed:
        return
    if unsafe and not force:
        raise ConfigError(f"resuming {source} with a changed config: {', '.join(unsafe)} would break exact "
                          f"resume (changed: {listed}); use the run's config, another --output-dir, or "
                          f"--force-resume")
    log.warning("resuming %s with a changed config: %s%s", source, listed,
                " (forced: not an exact resume)" if unsafe else "")
