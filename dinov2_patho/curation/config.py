"""The curation config: one section per action, each a dataclass beside the code that uses it (its
defaults and, in `__post_init__`, its checks): `tiles` (tissue.TilesConfig), `embed`
(embed.EmbedConfig), `kmeans` (hierarchy.KmeansConfig), `sample` (sampling.SampleConfig).

`load_curation_config` merges a config file (the shipped recipes `configs/curation/t1.yaml`, `t2.yaml`,
`cpu_smoke.yaml` hold only what they change) and dot-list overrides over those defaults, as for
training; an unknown key is an error naming the closest valid one, a value outside its domain one
naming its key. Each action function takes its own section (`tissue_tiles(..., config=TilesConfig())`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dinov2_patho.config_files import load_structured
from dinov2_patho.curation.embed import EmbedConfig
from dinov2_patho.curation.hierarchy import KmeansConfig
from dinov2_patho.curation.sampling import SampleConfig
from dinov2_patho.curation.tissue import TilesConfig

OPEN_KEYS = ("embed.model",)  # free-form backbone kwargs


@dataclass
class CurationConfig:
    tiles: TilesConfig = field(default_factory=TilesConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    kmeans: KmeansConfig = field(default_factory=KmeansConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def load_curation_config(config_file: str | Path | None = None,
                         overrides: Sequence[str] = ()) -> CurationConfig:
    """The defaults <- `config_file` <- `overrides` (`key.path=value`), every section checked."""
    return load_structured(CurationConfig, "curation", config_file, overrides, open_keys=OPEN_KEYS)
