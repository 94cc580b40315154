"""The curation config: packaged `configs/curation/default.yaml` <- a config file <- dot-list
overrides, as for training. One section per action: tiles, embed, kmeans, sample.

Every action function (`tissue_tiles`, `embed_tiles`, `build_tree`, `balanced_subset`) takes the whole
config (`load_curation_config(...)`; None: the packaged defaults) and checks it before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from dinov2_patho.config_files import load_config

DEFAULTS = "curation/default.yaml"
OPEN_KEYS = ("embed.model",)  # free-form backbone kwargs
TOKENS = ("cls", "patch_mean", "cls+patch_mean")  # embed.token: what of the backbone's output is a tile's row
STRATEGIES = ("random", "closest")  # sample.strategy: members of a level-1 cluster taken into a subset


def load_curation_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    return load_config(DEFAULTS, config_file, overrides, open_keys=OPEN_KEYS)


INTEGERS = {  # key: minimum
    "tiles.thumbnail_px_per_tile": 1, "tiles.min_saturation": 0, "tiles.closing_px": 0,
    "tiles.max_hole_tiles": 0, "tiles.workers": 1,
    "embed.seed": 0, "embed.batch_size": 1, "embed.num_workers": 0,
    "kmeans.seed": 0, "kmeans.chunk_rows": 1, "kmeans.init_points_per_centroid": 1,
    "kmeans.max_points_per_centroid": 1, "sample.seed": 0,
}
OPTIONAL = ("tiles.mpp_override", "kmeans.max_points_per_centroid")


def check_curation_values(cfg: DictConfig) -> None:
    """A one-line ConfigError for the first value outside its domain, before any action's work."""
    from dinov2_patho.backbones.features import AMP_DTYPES
    from dinov2_patho.config_files import (
        NON_NEGATIVE,
        POSITIVE,
        UNIT_HALF_OPEN,
        check_choices,
        check_domains,
    )
    from dinov2_patho.curation.kmeans import ENGINES
    from dinov2_patho.distributed import DEVICES
    from dinov2_patho.models.weights import FORMATS

    numbers = {"tiles.min_tissue_fraction": UNIT_HALF_OPEN, "tiles.mpp_override": POSITIVE,
               "embed.checkpoint_seconds": NON_NEGATIVE, "kmeans.tol": NON_NEGATIVE}
    check_domains(cfg, numbers, INTEGERS, OPTIONAL)
    check_choices(cfg, {"embed.token": TOKENS, "embed.weights_format": FORMATS,
                        "embed.amp": tuple(AMP_DTYPES), "embed.device": DEVICES, "kmeans.engine": ENGINES,
                        "kmeans.device": DEVICES, "sample.strategy": STRATEGIES})


def curation_config(config: DictConfig | None = None) -> DictConfig:
    """`config` (None: the packaged defaults), its values checked (kmeans.levels: by `parse_levels`)."""
    cfg = load_curation_config() if config is None else config
    check_curation_values(cfg)
    return cfg
