"""The training config's schema version, and the migration of configs written under older ones.

Every config a run saves (config.yaml, the checkpoint's, a SLURM job's) records `schema_version`; a
config without one is of schema 1 (written before versioning). A resume or a requeue of an older
config moves its renamed keys to their new homes, with one line saying so, and stops with one line
naming every key that no longer exists; a config of a newer schema than this code's is refused.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinov2_patho.config_files import ConfigError, unknown_keys
from dinov2_patho.logging import get_logger

log = get_logger(__name__)

SCHEMA_VERSION = 2
KEY = "schema_version"
# version v: the keys that configs of schema v - 1 spelled otherwise (old dotted key -> new one)
RENAMED: dict[int, dict[str, str]] = {
    2: {"train.pseudo_epoch_length": "sampler.pseudo_epoch_samples", "sampler.subset": "data.subset"},
}
_ABSENT = object()


def _pop(tree: dict[str, Any], key: str) -> Any:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return _ABSENT
    return tree.pop(leaf, _ABSENT)


def _get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _put(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def schema_of(layer: DictConfig, source: str) -> int:
    version = layer.get(KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{source}: {KEY}={version!r} is not a schema version (1..{SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise ConfigError(f"{source}: written under config schema {version}, newer than this dinov2_patho's "
                          f"({SCHEMA_VERSION}): run it with the version that wrote it")
    return version


def migrate(layer: DictConfig, defaults: DictConfig | None, source: str,
            open_keys: tuple[str, ...] = ("sampler",)) -> DictConfig:
    """`layer` in today's schema. With `defaults`, the keys of a config declaring an older schema that
    they no longer have are one error naming them all (an undeclared config, a recipe as much as an
    old run's, gets check_keys's 'unknown key ..., did you mean' for its first: a typo, most likely)."""
    version = schema_of(layer, source)
    if version == SCHEMA_VERSION:
        return layer
    tree = OmegaConf.to_container(layer, resolve=False)
    moves = []
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for old, new in RENAMED[step].items():
            value = _pop(tree, old)
            if value is _ABSENT:
                continue
            present = _get(tree, new)
            if present is not _ABSENT and present != value:
                raise ConfigError(f"{source}: {old}={value!r} (schema {version}) and {new}={present!r} "
                                  "disagree; keep one of them")
            _put(tree, new, value)
            moves.append(f"{old} -> {new}")
    tree[KEY] = SCHEMA_VERSION
    migrated = OmegaConf.create(tree)
    if defaults is not None and KEY in layer:
        gone = [key for key, _ in unknown_keys(migrated, defaults, open_keys)]
        if gone:
            raise ConfigError(f"{source}: written under config schema {version} (this is {SCHEMA_VERSION}); "
                              f"these keys no longer exist: {', '.join(gone)}")
    if moves:
        log.warning("%s: config schema %d -> %d: renamed %s", source, version, SCHEMA_VERSION,
                    ", ".join(moves))
    return migrated
