"""The sampler registry and `build_sampler(cfg, index, global_batch_size)`.

Config keys (`sampler:` section) are the keyword arguments of the registered
constructors below; an unknown key is an error naming the closest valid one.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dinov2_patho.registry import Registry, did_you_mean

from .base import GlobalBatchSampler, SamplerError
from .metadata import inverse_frequency_subset
from .stratified import ClusterStratifiedSampler
from .uniform import UniformSampler
from .views import RowMap

SAMPLERS = Registry("sampler")


@SAMPLERS.register("uniform")
def uniform(index, batch_size: int, *, seed: int = 0, pseudo_epoch_samples: int = 350_000,
            subset: str | None = None) -> GlobalBatchSampler:
    """Infinite reshuffled passes over the index, or over `subset` (a .npy of global row ids)."""
    positions = None
    if subset is not None:
        path = Path(subset)
        try:
            rows = np.load(path)
        except (OSError, ValueError) as e:
            raise SamplerError(f"sampler.subset {path}: cannot read a .npy of row ids: {e}") from e
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise SamplerError(f"sampler.subset {path}: want a 1-D integer array, "
                               f"got {rows.dtype} {rows.shape}")
        rows = np.unique(rows)
        try:
            positions = RowMap(index).to_positions(rows)
        except SamplerError as e:
            raise SamplerError(f"sampler.subset {path}: {e}") from e
    return UniformSampler(index, batch_size, seed=seed, pseudo_epoch_samples=pseudo_epoch_samples,
                          positions=positions)


def _labels(index, level: int | None, metadata_csv: str | None, column: str | None) -> tuple[Any, int, str]:
    if (level is None) == (metadata_csv is None):
        raise SamplerError("cluster_stratified: give either sampler.level or sampler.metadata_csv + "
                           "sampler.column")
    if level is not None:
        if not 1 <= int(level) <= index.num_levels:
            raise SamplerError(f"sampler.level={level}: the index has levels 1..{index.num_levels}")
        return index.level(int(level)), index.num_clusters(int(level)), f"level_{int(level)}"
    if column is None:
        raise SamplerError("sampler.metadata_csv is set but sampler.column is missing "
                           "(e.g. tissue_diagnosis)")
    codes, names = index.metadata_codes(metadata_csv, column)
    return codes, len(names), column


@SAMPLERS.register("cluster_stratified")
def cluster_stratified(index, batch_size: int, *, seed: int = 0, level: int | None = None,
                       metadata_csv: str | None = None, column: str | None = None, alpha: float = 0.0,
                       max_slides_per_epoch: int | None = None, pseudo_epoch_samples: int = 350_000,
                       cache: bool = True) -> GlobalBatchSampler:
    """Stratified batches over tree level `level`, or over a metadata column (see stratified.py)."""
    labels, num_labels, name = _labels(index, level, metadata_csv, column)
    return ClusterStratifiedSampler(index, batch_size, seed=seed, labels=labels, num_labels=num_labels,
                                    label_name=name, alpha=alpha, max_slides_per_epoch=max_slides_per_epoch,
                                    pseudo_epoch_samples=pseudo_epoch_samples, cache=cache)


@SAMPLERS.register("metadata")
def metadata(index, batch_size: int, *, metadata_csv: str, target_size: int, seed: int = 0,
             column: str = "tissue_diagnosis", stratify: bool = False, alpha: float = 0.0,
             max_slides_per_epoch: int | None = None, pseudo_epoch_samples: int = 350_000,
             cache: bool = True) -> GlobalBatchSampler:
    """The paper's metadata baseline: an inverse-frequency subset of `target_size` rows, drawn
    uniformly, or (`stratify`) in batches stratified by `column`."""
    codes, names = index.metadata_codes(metadata_csv, column)
    subset = inverse_frequency_subset(codes, int(target_size), seed)
    if not stratify:
        return UniformSampler(index, batch_size, seed=seed, pseudo_epoch_samples=pseudo_epoch_samples,
                              positions=subset)
    labels = np.full(len(index), -1, dtype=np.int32)
    labels[subset] = np.asarray(codes[subset])
    return ClusterStratifiedSampler(index, batch_size, seed=seed, labels=labels, num_labels=len(names),
                                    label_name=column, alpha=alpha, max_slides_per_epoch=max_slides_per_epoch,
                                    pseudo_epoch_samples=pseudo_epoch_samples, cache=cache)


def build_sampler(cfg: dict | DictConfig, index, global_batch_size: int) -> GlobalBatchSampler:
    """A sampler from its config section: `{name: ..., seed: ..., <options>}`."""
    options = dict(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
    name = options.pop("name", None)
    if name is None:
        raise SamplerError(f"sampler.name is missing; valid: {', '.join(SAMPLERS.names())}")
    if name not in SAMPLERS:
        raise SamplerError(f"unknown sampler.name {name!r}{did_you_mean(str(name), SAMPLERS.names())}")
    factory = SAMPLERS.get(name)
    params = {p.name: p for p in inspect.signature(factory).parameters.values() if p.kind == p.KEYWORD_ONLY}
    for key in options:
        if key not in params:
            hint = did_you_mean(str(key), params)
            raise SamplerError(f"sampler.{key}: not an option of sampler {name!r}{hint}")
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and key not in options:
            raise SamplerError(f"sampler {name!r} needs sampler.{key}")
    return factory(index, global_batch_size, **options)
