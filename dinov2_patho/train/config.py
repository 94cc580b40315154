"""The training config: a dataclass per section beside the code that reads it, merged with a config file
and overrides, then checked before any process group, model or DataLoader worker starts.

`TrainConfig` lists the sections: `student` (models/student.py), `dino`, `ibot`, `compute_precision`
(ssl_meta_arch.py), `teacher`, `optim` (schedules.py), `crops`, `augmentation` (data/augment.py), `data`
(data/dataset.py), `sampler` (the chosen sampler's options dataclass, samplers/build.py), `train` and
`evaluation` (here), `checkpoint` (checkpoint.py). A recipe (configs/train/*.yaml) holds only what it
changes; `dinov2-patho train --print-config` prints every key with its value. In the spirit of DINOv2's
ssl_default_config, with schedules in iterations (one optimizer step per iteration) instead of epochs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinov2_patho.config_files import (
    ConfigError,
    check_section,
    instantiate,
    merge_structured,
    read_yaml,
)
from dinov2_patho.data.augment import AugmentationConfig, AugmentConfig, CropsConfig
from dinov2_patho.data.dataset import DataConfig
from dinov2_patho.distributed import DEVICES
from dinov2_patho.errors import UserError
from dinov2_patho.models.student import StudentConfig
from dinov2_patho.registry import did_you_mean
from dinov2_patho.samplers import build as sampler_build
from dinov2_patho.samplers.base import HISTORY as SAMPLER_HISTORY
from dinov2_patho.train import config_schema
from dinov2_patho.train.checkpoint import CheckpointConfig
from dinov2_patho.train.schedules import OptimConfig, TeacherConfig
from dinov2_patho.train.ssl_meta_arch import DinoConfig, IbotConfig, PrecisionConfig


@dataclass
class LoopConfig:
    """The `train` section of the training config: the loop, its loader and its devices."""

    iterations: int = 125000
    batch_size_per_gpu: int = 64
    seed: int = 0
    num_workers: int = 8
    prefetch_factor: int = 2
    device: str = "auto"              # auto | cuda | cpu
    # torch intra-op threads of each rank; 0: torch's default. With DataLoader workers on a small CPU
    # machine, 1 avoids oversubscription stalls
    cpu_threads: int = 0
    # ddp: data parallel, gradients averaged over ranks | fsdp: also parameters, gradients and optimizer
    # state sharded over ranks (FSDP2; bf16 compute with fp32 reduction on GPU), for the largest models
    # (ViT-g)
    distributed: str = "ddp"
    log_every: int = 10
    resume: bool = True               # continue from output_dir/checkpoints/latest when present

    def __post_init__(self) -> None:
        check_section("train", self, integers={"iterations": 1, "batch_size_per_gpu": 1, "num_workers": 0,
                                               "prefetch_factor": 1, "log_every": 1, "seed": 0,
                                               "cpu_threads": 0})
        lead = self.num_workers * self.prefetch_factor
        if lead >= SAMPLER_HISTORY:
            raise ConfigError(f"train.num_workers x train.prefetch_factor = {lead}: the loader may run at "
                              f"most {SAMPLER_HISTORY - 1} batches ahead (the sampler's undo history)")
        check_section("train", self, choices={"device": DEVICES, "distributed": ("ddp", "fsdp")})


@dataclass
class EvaluationConfig:
    """The `evaluation` section of the training config: the teacher's benchmarks during training."""

    benchmarks: list[str] = field(default_factory=list)  # eval benchmarks run on the teacher backbone
    # slide tasks run on it too (`eval slide --tasks`: a task name or a labels CSV)
    slide_tasks: list[str] = field(default_factory=list)
    every_n_iterations: int = 0       # 0: never during training
    config_file: str | None = None    # an eval config (over `eval run`'s defaults): data roots, heads
    slide_config_file: str | None = None  # a slide eval config: slides, tiles, data roots, head

    def __post_init__(self) -> None:
        check_section("evaluation", self, integers={"every_n_iterations": 0})


@dataclass
class TrainConfig:
    """Every key a training config file or override may set, with its default."""

    # of these keys: a run saves it, and its resume or requeue migrates older ones
    schema_version: int = config_schema.SCHEMA_VERSION
    student: StudentConfig = field(default_factory=StudentConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute_precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # any registered sampler: name, then its options (seed, pseudo_epoch_samples, ...), checked, and
    # defaulted, by the sampler's options in samplers/build.py
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "uniform"})
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        AugmentConfig.from_config({"crops": asdict(self.crops), "augmentation": asdict(self.augmentation)})
        if self.train.distributed == "fsdp" and self.compute_precision.amp == "fp16":
            # fp16 needs loss scaling over sharded gradients; FSDP runs take bf16 (no scaler)
            raise ConfigError("train.distributed=fsdp with compute_precision.amp=fp16: use bf16, auto or off")


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
    cfg = merge_structured(TrainConfig, "train", config_file, overrides, OPEN_KEYS, moved=MOVED,
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


def _check_sampler(cfg: DictConfig) -> None:
    """The sampler's option names, types and values, which need no index: a typo is refused here,
    by `train --dry-run` and before `launch train` queues a job, not by the job."""
    sampler_build.sampler_options(cfg.sampler)


def check_values(cfg: DictConfig | dict) -> TrainConfig:
    """Every section's values (a one-line ConfigError naming the first key outside its domain): the config
    built as a TrainConfig."""
    return instantiate(TrainConfig, cfg)


def validate_config(cfg: DictConfig) -> None:
    """Values and paths: a bad key names itself, a missing path names the path."""
    check_values(cfg)
    _check_sampler(cfg)
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
