"""The training config: packaged defaults <- config file <- overrides, then checked
before any process group, model or DataLoader worker starts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dinov2_patho.config_files import ConfigError, check_choices, check_domains, load_config, read_yaml
from dinov2_patho.distributed import DEVICES
from dinov2_patho.errors import UserError
from dinov2_patho.registry import did_you_mean
from dinov2_patho.samplers import build as sampler_build
from dinov2_patho.samplers.base import HISTORY as SAMPLER_HISTORY
from dinov2_patho.train import config_schema
from dinov2_patho.train.config_values import check_values

DEFAULTS = "train/default.yaml"
# the chosen sampler's options are validated by its options dataclass (_check_sampler)
OPEN_KEYS = ("sampler",)
# keys that a config written for an earlier version may still set
MOVED = {"train.pseudo_epoch_length": "sampler.pseudo_epoch_samples"}


# keys naming files or directories: made absolute once loaded, so the run's saved config.yaml
# serves `report`, a resume or a SLURM job from any working directory
PATH_KEYS = ("data.index", "data.subset", "data.slides", "data.tile_store", "sampler.metadata_csv",
             "student.pretrained_weights", "evaluation.config_file", "evaluation.slide_config_file")


def absolute(path: str) -> str:
    """`path` made absolute; a hub name's folder too (local-dir:PATH), a hub repo (hf-hub:ORG/NAME) kept."""
    from dinov2_patho.backbones.hub import HF_HUB, LOCAL_DIR

    if path.startswith(HF_HUB):
        return path
    if path.startswith(LOCAL_DIR):
        return LOCAL_DIR + os.path.abspath(path[len(LOCAL_DIR):])
    return os.path.abspath(path)


def load_train_config(config_file: str | Path | DictConfig | None = None, overrides: Sequence[str] = (),
                      source: str | None = None) -> DictConfig:
    """Defaults <- `config_file` (a path, or a config already read, named `source`), brought to today's
    schema <- overrides."""
    cfg = load_config(DEFAULTS, config_file, overrides, open_keys=OPEN_KEYS, moved=MOVED,
                      migrate=config_schema.migrate, source=source)
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value:
            OmegaConf.update(cfg, key, absolute(value))
    tasks = cfg.evaluation.slide_tasks  # registered names, or labels CSVs (told apart as open_task does)
    if OmegaConf.is_list(tasks):
        cfg.evaluation.slide_tasks = [os.path.abspath(t) if Path(str(t)).suffix.lower() == ".csv"
                                      or Path(str(t)).is_file() else t for t in tasks]
    return cfg


def global_batch_size(cfg: DictConfig, world_size: int) -> int:
    return int(cfg.train.batch_size_per_gpu) * world_size


def _at_least(cfg: DictConfig, key: str, minimum: int) -> None:
    value = cfg
    for part in key.split("."):
        value = value[part]
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}")


def _check_sampler(cfg: DictConfig) -> None:
    """The sampler's option names, types and values, which need no index: a typo is refused here,
    by `train --dry-run` and before `launch train` queues a job, not by the job."""
    _, options, _ = sampler_build.sampler_options(cfg.sampler)
    values = asdict(options)
    integers = {f"sampler.{k}": v for k, v in sampler_build.INTEGERS.items() if k in values}
    optional = {f"sampler.{k}": v for k, v in sampler_build.OPTIONAL_INTEGERS.items() if k in values}
    check_domains(OmegaConf.create({"sampler": values}), {}, {**integers, **optional},
                  optional=tuple(optional))


def validate_config(cfg: DictConfig) -> None:
    """Values and paths: a bad key names itself, a missing path names the path."""
    minimums = {"train.iterations": 1, "train.batch_size_per_gpu": 1, "train.num_workers": 0,
                "train.prefetch_factor": 1, "train.log_every": 1,
                "train.seed": 0, "train.cpu_threads": 0, "checkpoint.every_n_iterations": 0,
                "checkpoint.keep_last": 1, "evaluation.every_n_iterations": 0}
    for key, minimum in minimums.items():
        _at_least(cfg, key, minimum)
    check_values(cfg)
    _check_sampler(cfg)
    lead = cfg.train.num_workers * cfg.train.prefetch_factor
    if lead >= SAMPLER_HISTORY:
        raise ConfigError(f"train.num_workers x train.prefetch_factor = {lead}: the loader may run at most "
                          f"{SAMPLER_HISTORY - 1} batches ahead (the sampler's undo history)")
    check_choices(cfg, {"train.device": DEVICES, "train.distributed": ("ddp", "fsdp"),
                        "data.on_error": ("raise", "skip")})
    if cfg.train.distributed == "fsdp" and cfg.compute_precision.amp == "fp16":
        # fp16 needs loss scaling over sharded gradients; FSDP runs take bf16 (no scaler)
        raise ConfigError("train.distributed=fsdp with compute_precision.amp=fp16: use bf16, auto or off")
    if cfg.data.index is None:
        raise ConfigError("data.index is required: the TileIndex directory (`dinov2-patho index build`)")
    for key in ("index", "subset", "slides", "tile_store"):
        value = cfg.data[key]
        if value is not None and not Path(value).exists():
            raise UserError(f"data.{key}: {value} does not exist")
    for tasks, key in (("benchmarks", "config_file"), ("slide_tasks", "slide_config_file")):
        eval_file = cfg.evaluation[key]
        if cfg.evaluation[tasks] and eval_file is not None and not Path(eval_file).is_file():
            raise UserError(f"evaluation.{key}: {eval_file} does not exist")
    _check_evaluation(cfg.evaluation)


def _check_evaluation(evaluation: DictConfig) -> None:
    """Benchmark and slide-task names and their eval configs' keys and values, now rather than at
    the first evaluation, hours into a run."""
    from dinov2_patho.eval.benchmarks import BENCHMARKS
    from dinov2_patho.eval.runner import eval_config
    from dinov2_patho.eval.slide.adapters import SLIDE_TASKS
    from dinov2_patho.eval.slide.runner import slide_config

    for name in evaluation.benchmarks:
        if name not in BENCHMARKS:
            raise ConfigError(f"evaluation.benchmarks: unknown benchmark {name!r}"
                              f"{did_you_mean(str(name), BENCHMARKS.names())}")
    for name in evaluation.slide_tasks:
        if name not in SLIDE_TASKS and not Path(name).is_file():
            raise ConfigError(f"evaluation.slide_tasks: {name!r} is neither a slide task "
                              f"({', '.join(SLIDE_TASKS.names())}) nor a labels CSV")
    for tasks, key, merged in (("benchmarks", "config_file", eval_config),
                               ("slide_tasks", "slide_config_file", slide_config)):
        path = evaluation[key]
        if evaluation[tasks]:
            try:
                merged(read_yaml(path) if path else None)
            except ConfigError as e:
                raise ConfigError(f"evaluation.{key}={path}: {e}" if path else f"evaluation: {e}") from e
