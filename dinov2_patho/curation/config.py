"""The curation config: packaged `configs/curation/default.yaml` <- a config file <- dot-list
overrides, as for training. One section per action: tiles, embed, kmeans, sample."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from dinov2_patho.config_files import load_config

DEFAULTS = "curation/default.yaml"
OPEN_KEYS = ("embed.model",)  # free-form backbone kwargs


def load_curation_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    return load_config(DEFAULTS, config_file, overrides, open_keys=OPEN_KEYS)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config-file` and trailing `key.path=value` overrides, for every curate action."""
    parser.add_argument("--config-file", help="curation config over configs/curation/default.yaml "
                                              "(t1.yaml, t2.yaml, cpu_smoke.yaml are shipped)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. kmeans.seed=1 tiles.min_tissue_fraction=0.6")


def config_from_args(args: argparse.Namespace) -> DictConfig:
    return load_curation_config(args.config_file, args.overrides)
