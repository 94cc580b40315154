"""Configs as in DINOv2: defaults <- a config file <- dot-list overrides.

The defaults are a dataclass per config section, beside the code that uses it, checked in its
`__post_init__` (`check_section`); `load_structured` / `merge_structured` merge a file and overrides
over them (`OmegaConf.structured`). Every key of the file and the overrides must exist in the
defaults; an unknown key is an error naming it and the closest valid key. Nodes listed in
`open_keys` (say `sampler`, whose options depend on the sampler chosen) accept new keys: whoever
consumes them validates them.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2_patho.errors import UserError
from dinov2_patho.registry import did_you_mean


class ConfigError(UserError):
    pass


T = TypeVar("T")


def packaged_config(relpath: str) -> Path:
    """Path of a YAML shipped in `configs/` (installed as `dinov2_patho.configs`)."""
    path = Path(str(resources.files("dinov2_patho.configs").joinpath(relpath)))
    if not path.is_file():
        raise ConfigError(f"no packaged config {relpath!r} (looked for {path})")
    return path


def read_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping, got a {type(cfg).__name__}")
    return cfg


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {e}") from e


def unknown_keys(cfg: DictConfig, reference: DictConfig, open_keys: Iterable[str] = (),
                 prefix: str = "") -> Iterator[tuple[str, DictConfig]]:
    """The dotted keys of `cfg` that `reference` does not have, each with the node it is missing from."""
    open_keys = set(open_keys)
    known = set(reference.keys())  # `key in reference` is False for a MISSING (???) value
    for key in cfg:
        path = f"{prefix}{key}"
        if key not in known:
            yield path, reference
            continue
        if path in open_keys:
            continue
        sub, ref = cfg._get_node(key), reference._get_node(key)
        if isinstance(sub, DictConfig) and isinstance(ref, DictConfig) and not ref._is_none():
            yield from unknown_keys(sub, ref, open_keys, prefix=f"{path}.")


def check_keys(cfg: DictConfig, reference: DictConfig, source: str, open_keys: Iterable[str] = (),
               moved: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for the first key of `cfg` that `reference` does not have; a key of
    `moved` (old dotted path -> new one) names its new home."""
    for path, node in unknown_keys(cfg, reference, open_keys):
        if moved and path in moved:
            raise ConfigError(f"{source}: {path} is now {moved[path]}")
        parent, _, key = path.rpartition(".")
        hint = did_you_mean(key, node.keys(), f"{parent}." if parent else "")
        raise ConfigError(f"{source}: unknown key {path!r}{hint}")


# (layer, defaults, source) -> the layer in today's schema: see train/config_schema.py
Migration = Callable[[DictConfig, DictConfig, str], DictConfig]


def _file_layer(config_file: str | Path | DictConfig | None, shipped_dir: Path, source: str | None,
                ) -> list[tuple[str, DictConfig]]:
    """The config file's layer, named (none without one): a file path, or a config already read."""
    if isinstance(config_file, DictConfig):
        return [(source or "config", config_file)]
    if config_file is None:
        return []
    shipped = shipped_dir / Path(config_file).name
    if not Path(config_file).is_file() and shipped.is_file():  # `--config-file t1.yaml` outside the repo
        raise ConfigError(f"config file {config_file} does not exist; the shipped one is {shipped}")
    return [(str(config_file), read_yaml(config_file))]


def _merge_layers(cfg: DictConfig, layers: list[tuple[str, DictConfig]], open_keys: Iterable[str],
                  moved: Mapping[str, str] | None, schema: type | None = None) -> DictConfig:
    """`layers` merged over `cfg` in order, each key checked against `cfg`'s; a ??? a layer leaves
    unset is an error naming the key and the layer. A value of the wrong type for a field of
    `schema` is its section's own error ('must be a number'), else OmegaConf's, naming the key."""
    required: dict[str, str] = {}  # key -> the layer that marked it ??? (mandatory)
    for done, (source, layer) in enumerate(layers):
        check_keys(layer, cfg, source, open_keys, moved=moved)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:  # a value of the wrong type for a typed (dataclass) field
            if schema is not None:
                _explain(schema, [layer for _, layer in layers[:done + 1]])
            where = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
            raise ConfigError(f"{source}: {where}{str(e.msg or e).splitlines()[0]}") from e
        required = {key: where for key, where in required.items() if not _sets(layer, key)}
        required.update({key: source for key in OmegaConf.missing_keys(layer)})
    if required:
        # a merge keeps the value below a ??? (the default), which would run silently without it
        key, source = next(iter(required.items()))
        raise ConfigError(f"{key} is required by {source}: set {key}=... (it is ??? there)")
    return cfg


def merge_structured(schema: type, shipped: str, config_file: str | Path | DictConfig | None = None,
                     overrides: Sequence[str] = (), open_keys: Iterable[str] = (), *,
                     moved: Mapping[str, str] | None = None, migrate: Migration | None = None,
                     source: str | None = None) -> DictConfig:
    """`schema`'s defaults (`OmegaConf.structured`) <- a config file (a path, or a config already read,
    named `source`), brought to today's schema by `migrate` <- dot-list overrides, every key checked
    against the schema's (an unknown key names the closest valid one; a key of `moved` its new home).
    The merged config, typed; `instantiate` runs its sections' checks. `shipped`: the folder of
    `configs/` whose recipes a bare file name points to ('curation')."""
    shipped_dir = Path(str(resources.files("dinov2_patho.configs").joinpath(shipped)))
    defaults = OmegaConf.structured(schema)
    layers = _file_layer(config_file, shipped_dir, source)
    if layers and migrate is not None:
        layers[0] = (layers[0][0], migrate(layers[0][1], defaults, layers[0][0]))
    if overrides:
        layers.append(("command line", parse_overrides(overrides)))
    return _merge_layers(defaults, layers, tuple(open_keys), moved, schema)


def load_structured(schema: type[T], shipped: str, config_file: str | Path | None = None,
                    overrides: Sequence[str] = (), open_keys: Iterable[str] = ()) -> T:
    """`merge_structured`, instantiated: each section's `__post_init__` checks its values."""
    return OmegaConf.to_object(merge_structured(schema, shipped, config_file, overrides, open_keys))


def instantiate(schema: type[T], values: DictConfig | Mapping[str, Any]) -> T:
    """`schema` built from a config of it (a merged config, a saved one, a partial dict: missing keys
    take the defaults), each section's dataclass built from its own node, so that every `__post_init__`
    checks the values as they are (no conversion)."""
    if OmegaConf.is_config(values):
        values = OmegaConf.to_container(values, resolve=True)
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for f in dataclasses.fields(schema):
        if f.name not in values:
            continue
        value, kind = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = instantiate(kind, value)
        kwargs[f.name] = value
    return schema(**kwargs)


def _explain(schema: type, layers: list[DictConfig]) -> None:
    """Raise the section's own error for a value that a typed merge refused: the layers merged untyped
    over the schema's defaults and instantiated (nothing raised: the merge's error stands)."""
    plain = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(schema)))
    try:
        for layer in layers:
            plain = OmegaConf.merge(plain, layer)
        instantiate(schema, plain)
    except ConfigError:
        raise
    except Exception:  # a value the checks cannot even compare: the merge's message says it
        return


def _sets(layer: DictConfig, key: str) -> bool:
    """Whether `layer` gives dotted `key` a value (a ??? is no value)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(layer, parent) if parent else layer
    return isinstance(node, DictConfig) and leaf in node  # `in` is False for a ??? value


def merge_over_defaults(schema: type, cfg: DictConfig | dict | None, source: str,
                        open_keys: Iterable[str] = ()) -> DictConfig:
    """`schema`'s defaults with `cfg`, a full or partial config (named `source` in errors), merged over
    them, its keys checked against them."""
    layer = None if cfg is None else cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    return merge_structured(schema, ".", layer, open_keys=open_keys, source=source)


def to_container(cfg: DictConfig | ListConfig) -> dict | list:
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    from dinov2_patho.io import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


# --- value domains: one-line errors naming the dotted key (each section's `__post_init__`) ---

Domain = tuple[str, Callable[[float], bool]]

POSITIVE: Domain = ("must be > 0", lambda v: v > 0)
NON_NEGATIVE: Domain = ("must be >= 0", lambda v: v >= 0)
UNIT: Domain = ("must be in [0, 1]", lambda v: 0 <= v <= 1)
UNIT_OPEN: Domain = ("must be in [0, 1)", lambda v: 0 <= v < 1)
UNIT_HALF_OPEN: Domain = ("must be in (0, 1]", lambda v: 0 < v <= 1)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _select(cfg: Any, key: str) -> Any:
    """The value at dotted `key` of a config, or of a mapping of dataclasses ({"tiles": TilesConfig(...)})."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.select(cfg, key)
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, Mapping) else getattr(cfg, part, None)
    return cfg


def check_domains(cfg: DictConfig | Mapping[str, Any], numbers: dict[str, Domain], integers: dict[str, int],
                  optional: tuple[str, ...] = ()) -> None:
    """Raise ConfigError for the first value (by dotted key) outside its domain; `optional` keys may
    also be null. `cfg`: a config, or a section's dataclass under its name (its `__post_init__`:
    {"tiles": self})."""
    for key, (why, ok) in numbers.items():
        value = _select(cfg, key)
        if value is None and key in optional:
            continue
        if not _is_number(value) or not ok(value):
            raise ConfigError(f"{key}={value!r}: {why if _is_number(value) else 'must be a number'}"
                              + (" (or null)" if key in optional else ""))
    for key, minimum in integers.items():
        value = _select(cfg, key)
        if value is None and key in optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}"
                              + (" (or null)" if key in optional else ""))


def check_choices(cfg: DictConfig | Mapping[str, Any], choices: dict[str, Sequence[str]]) -> None:
    """Raise ConfigError for the first value (by dotted key) that is not one of its choices."""
    for key, valid in choices.items():
        value = _select(cfg, key)
        if value not in valid:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(valid)}")


ListDomain = tuple[str, Callable[[Any], bool]]  # what the items must be, and the test of one item


def check_lists(cfg: DictConfig | Mapping[str, Any], lists: dict[str, ListDomain]) -> None:
    """Raise ConfigError for the first value (by dotted key) that is not a non-empty list of what its
    entry says ({key: ("integers >= 1", test of one item)})."""
    for key, (what, ok) in lists.items():
        value = _select(cfg, key)
        is_list = isinstance(value, (list, tuple, ListConfig))
        if not is_list or len(value) == 0 or not all(ok(v) for v in value):
            raise ConfigError(f"{key}={value!r}: must be a non-empty list of {what}")


def check_section(section: str, values: Any, numbers: dict[str, Domain] | None = None,
                  integers: dict[str, int] | None = None, optional: tuple[str, ...] = (),
                  choices: dict[str, Sequence[str]] | None = None,
                  lists: dict[str, ListDomain] | None = None) -> None:
    """`check_domains`, `check_choices` and `check_lists` over one section's dataclass (its
    `__post_init__`), keys being its field names; the errors name the dotted key (`tiles.workers=0: must
    be an integer >= 1`). `section` may be dotted itself ('heads.linear')."""
    def dotted(table: dict | None) -> dict:
        return {f"{section}.{key}": value for key, value in (table or {}).items()}

    tree = values
    for part in reversed(section.split(".")):
        tree = {part: tree}
    nullable = tuple(f"{section}.{key}" for key in optional)
    check_domains(tree, dotted(numbers), dotted(integers), nullable)
    check_choices(tree, dotted(choices))
    check_lists(tree, dotted(lists))
