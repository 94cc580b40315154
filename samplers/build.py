"""The sampler registry and `build_sampler(cfg, index, global_batch_size)`.

Config keys (`sampler:` section) are the fields of the registered options dataclasses
below, which are also the only home of their defaults. An unknown key is an error naming
the closest valid one; so is a key that the chosen branch would ignore (say
`max_slides_per_epoch` for an unstratified `metadata` sampler).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2_patho.config_files import ConfigError, check_section
from dinov2_patho.logging import get_logger
from dinov2_patho.registry import Registry, did_you_mean

from .base import GlobalBatchSampler, SamplerError
from .metadata import inverse_frequency_subset, inverse_frequency_subset_of_runs
from .strata import CACHE_KEEP
from .stratified import ClusterStratifiedSampler
from .uniform import UniformSampler

log = get_logger(__name__)
SAMPLERS = Registry("sampler")
LEVEL_COLUMN = re.compile(r"level_[0-9]+")
OPTIONS: dict[str, type] = {}
# options that moved out of the sampler section
MOVED = {"subset": "data.subset (a view of the index, for every sampler)"}
# value domains of the options (integer keys: minimum), checked by SamplerOptions.__post_init__
INTEGERS = {"seed": 0, "pseudo_epoch_samples": 1, "cache_keep": 1, "target_size": 1}
OPTIONAL_INTEGERS = {"max_slides_per_epoch": 1, "level": 1}


@dataclass
class SamplerOptions:
    """What every sampler takes."""

    name: str = MISSING
    seed: int = 0
    # samples per pseudo-epoch, ceil(this / global batch) batches: the paper's unit of the
    # slide cap and of `pseudo_epoch` in metrics.jsonl
    pseudo_epoch_samples: int = 350_000

    def __post_init__(self) -> None:
        """Each option's domain (integer keys: minimum; None is "not set"), before any index is read."""
        names = {f.name for f in fields(self)}
        integers = {key: low for key, low in {**INTEGERS, **OPTIONAL_INTEGERS}.items() if key in names}
        optional = tuple(key for key in OPTIONAL_INTEGERS if key in names)
        check_section("sampler", self, integers=integers, optional=optional)


@dataclass
class StratifiedOptions(SamplerOptions):
    """What stratified batches take (see stratified.py)."""

    alpha: float = 0.0                       # cluster weights size**alpha; 0: equal quotas (the paper)
    max_slides_per_epoch: int | None = None  # hard cap on distinct slides per pseudo-epoch (paper: 800)
    cache: bool = True                       # keep the strata in <index>/.sampler_cache
    cache_keep: int = CACHE_KEEP             # entries kept there (most recently used; each ~4 B a row)


@dataclass
class UniformOptions(SamplerOptions):
    pass


@dataclass
class ClusterStratifiedOptions(StratifiedOptions):
    level: int | None = None                 # a tree level of the index, or:
    metadata_csv: str | None = None          # a slide metadata CSV and
    column: str | None = None                # its column (e.g. tissue_diagnosis)
    skip_slides_without_metadata: bool = False  # else a slide with no value in `column` is an error


@dataclass
class MetadataOptions(StratifiedOptions):
    metadata_csv: str = MISSING
    target_size: int = MISSING               # rows in the inverse-frequency subset
    column: str = "tissue_diagnosis"
    stratify: bool = False                   # batches stratified by `column`; else uniform over the subset
    skip_slides_without_metadata: bool = False  # else a slide with no value in `column` is an error


def register(name: str, options: type) -> Callable:
    """Register a factory `(index, batch_size, options, given) -> sampler` under `name`."""
    OPTIONS[name] = options
    return SAMPLERS.register(name)


def _unused(name: str, given: Iterable[str], branch_only: type, why: str) -> None:
    """Reject the given options that only `branch_only` (a branch not taken) would use."""
    common = {f.name for f in fields(SamplerOptions)}
    ignored = [f.name for f in fields(branch_only) if f.name in set(given) - common]
    if ignored:
        names = ", ".join(f"sampler.{k}" for k in ignored)
        raise SamplerError(f"{names}: not used by sampler {name!r} {why}")


@register("uniform", UniformOptions)
def uniform(index, batch_size: int, opts: UniformOptions, given: set[str]) -> GlobalBatchSampler:
    """Infinite reshuffled passes over the index (or its `data.subset` view)."""
    return UniformSampler(index, batch_size, seed=opts.seed, pseudo_epoch_samples=opts.pseudo_epoch_samples)


def _without_metadata(index, missing: np.ndarray, opts: ClusterStratifiedOptions | MetadataOptions) -> None:
    """The index's slides (ids `missing`) that have no `column` value in `metadata_csv`: an error
    naming a few, or with `skip_slides_without_metadata`, a warning (their tiles are never drawn)."""
    if missing.size == 0:
        return
    few = ", ".join(index.slide_names[i] for i in missing[:5]) + (", ..." if missing.size > 5 else "")
    what = (f"sampler.metadata_csv={opts.metadata_csv}: {missing.size} slide(s) of the index have no "
            f"{opts.column} value there ({few})")
    if not opts.skip_slides_without_metadata:
        raise SamplerError(f"{what}; add them, or set sampler.skip_slides_without_metadata=true to leave "
                           f"them out")
    log.warning("%s: left out (sampler.skip_slides_without_metadata)", what)


def _labels(index, opts: ClusterStratifiedOptions) -> tuple[Any, int, str]:
    level, metadata_csv, column = opts.level, opts.metadata_csv, opts.column
    if (level is None) == (metadata_csv is None):
        raise SamplerError("cluster_stratified: give either sampler.level or sampler.metadata_csv + "
                           "sampler.column")
    if level is not None:
        if column is not None:
            raise SamplerError("sampler.column: not used by sampler 'cluster_stratified' with sampler.level "
                               "(it names a column of sampler.metadata_csv)")
        if opts.skip_slides_without_metadata:
            raise SamplerError("sampler.skip_slides_without_metadata: not used by sampler "
                               "'cluster_stratified' with sampler.level (it is about sampler.metadata_csv)")
        if not 1 <= int(level) <= index.num_levels:
            raise SamplerError(f"sampler.level={level}: the index has levels 1..{index.num_levels}")
        return index.level(int(level)), index.num_clusters(int(level)), f"level_{int(level)}"
    if column is None:
        raise SamplerError("sampler.metadata_csv is set but sampler.column is missing "
                           "(e.g. tissue_diagnosis)")
    codes, names = index.metadata_codes(metadata_csv, column)
    _without_metadata(index, np.unique(index.slides(np.flatnonzero(codes < 0))), opts)
    return codes, len(names), column


def _stratified(index, batch_size: int, opts: StratifiedOptions, labels, num_labels: int,
                label_name: str) -> ClusterStratifiedSampler:
    return ClusterStratifiedSampler(index, batch_size, seed=opts.seed, labels=labels, num_labels=num_labels,
                                    label_name=label_name, alpha=opts.alpha,
                                    max_slides_per_epoch=opts.max_slides_per_epoch,
                                    pseudo_epoch_samples=opts.pseudo_epoch_samples, cache=opts.cache,
                                    cache_keep=opts.cache_keep)


@register("cluster_stratified", ClusterStratifiedOptions)
def cluster_stratified(index, batch_size: int, opts: ClusterStratifiedOptions,
                       given: set[str]) -> GlobalBatchSampler:
    """Stratified batches over tree level `level`, or over a metadata column (see stratified.py)."""
    labels, num_labels, name = _labels(index, opts)
    return _stratified(index, batch_size, opts, labels, num_labels, name)


@register("metadata", MetadataOptions)
def metadata(index, batch_size: int, opts: MetadataOptions, given: set[str]) -> GlobalBatchSampler:
    """The paper's metadata baseline: an inverse-frequency subset of `target_size` rows, drawn
    uniformly, or (`stratify`) in batches stratified by `column`."""
    if not opts.stratify:
        _unused("metadata", given, StratifiedOptions, "with sampler.stratify=false (uniform over the subset)")
    runs = index.slide_runs() if hasattr(index, "slide_runs") else None
    if runs is not None and not opts.stratify:  # an index grouped by slide: no per-row pass
        per_slide, _ = index.slide_metadata(opts.metadata_csv, opts.column)
        _without_metadata(index, np.flatnonzero((per_slide < 0) & (runs[1] > 0)), opts)
        subset = inverse_frequency_subset_of_runs(per_slide, *runs, int(opts.target_size), opts.seed)
    else:
        codes, names = index.metadata_codes(opts.metadata_csv, opts.column)
        _without_metadata(index, np.unique(index.slides(np.flatnonzero(codes < 0))), opts)
        subset = inverse_frequency_subset(codes, int(opts.target_size), opts.seed)
    if not opts.stratify:
        return UniformSampler(index, batch_size, seed=opts.seed,
                              pseudo_epoch_samples=opts.pseudo_epoch_samples, positions=subset)
    labels = np.full(len(index), -1, dtype=np.int32)
    labels[subset] = np.asarray(codes[subset])
    return _stratified(index, batch_size, opts, labels, len(names), opts.column)


def sampler_options(cfg: dict | DictConfig) -> tuple[str, SamplerOptions, set[str]]:
    """The chosen sampler's name, its typed options and the keys given: unknown, moved, mistyped
    and missing options are errors naming `sampler.<key>`, without the index."""
    options = dict(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
    # null is "not set": a dot-override cannot delete a key a config file set (sampler.level=null)
    options = {key: value for key, value in options.items() if value is not None}
    name = options.get("name")
    if name is None:
        raise SamplerError(f"sampler.name is missing; valid: {', '.join(SAMPLERS.names())}")
    if name not in SAMPLERS:
        raise SamplerError(f"unknown sampler.name {name!r}{did_you_mean(str(name), SAMPLERS.names())}")
    schema = OPTIONS[name]
    valid = [f.name for f in fields(schema)]
    for key in options:
        if key in MOVED:
            raise SamplerError(f"sampler.{key} is now {MOVED[key]}")
        if key not in valid:
            hint = did_you_mean(str(key), valid)
            raise SamplerError(f"sampler.{key}: not an option of sampler {name!r}{hint}")
    level = options.get("level")
    if isinstance(level, str) and LEVEL_COLUMN.fullmatch(level):
        options["level"] = int(level[len("level_"):])  # the clustering CSV's column name, as users copy it
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), options)
    except OmegaConfBaseException as e:
        raise SamplerError(f"sampler.{e.key}: {e.msg.splitlines()[0]}") from e
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise SamplerError(f"sampler {name!r} needs sampler.{missing[0]}")
    try:
        return name, OmegaConf.to_object(merged), set(options)
    except ConfigError as e:  # a value outside its domain (__post_init__)
        raise SamplerError(str(e)) from None


def build_sampler(cfg: dict | DictConfig, index, global_batch_size: int) -> GlobalBatchSampler:
    """A sampler from its config section: `{name: ..., seed: ..., <options>}`. To draw from a
    subset of the index, pass its view (`subset_view(index, data.subset)`)."""
    name, options, given = sampler_options(cfg)
    return SAMPLERS.get(name)(index, global_batch_size, options, given)
