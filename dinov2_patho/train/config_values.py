"""A resume under a changed training config: `check_resume_config` names the keys whose values changed
since the checkpoint, and refuses those that would break exact resume. (The values themselves are
checked by each section's dataclass, train/config.py.)
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinov2_patho.config_files import ConfigError
from dinov2_patho.logging import get_logger
from dinov2_patho.train.config_schema import migrate

log = get_logger(__name__)


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
