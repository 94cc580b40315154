"""Evaluate a frozen backbone on slide tasks: bags of tile features (cached), gated
attention-MIL and a mean-pooling baseline, written as `eval run` writes its results
(results.{json,csv,md,png}). Its config: `SlideEvalConfig`, a dataclass per section, checked in its
`__post_init__`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dinov2_patho.backbones.hub import check_token
from dinov2_patho.backbones.load import BackboneConfig, frozen
from dinov2_patho.config_files import (
    NON_NEGATIVE,
    POSITIVE,
    check_domains,
    check_section,
    instantiate,
    merge_over_defaults,
)
from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger

from ..heads.abmil import AbmilConfig, abmil
from ..heads.logreg import logistic_regression
from ..report import format_score, write_results
from ..runner import (
    LOGREG_C,
    POSITIVE_NUMBERS,
    CrossValidationConfig,
    check_device,
    group_folds,
    mean_over_folds,
)
from .adapters import SLIDE_TASKS
from .bags import extract_bags, feature_bags, write_bags
from .tasks import SlideTask, csv_task, features_task

log = get_logger(__name__)

OPEN_KEYS = ("datasets", "backbone.model")


@dataclass
class BagsConfig:
    token: str = "cls"                # cls | patch_mean | cls+patch_mean
    max_tiles: int | None = None      # cap per slide, drawn deterministically (eva: 200 PANDASmall, 10,000
                                      # Camelyon16)
    seed: int = 0
    batch_size: int = 64
    num_workers: int = 0
    size: int | None = None           # tiles resized to size x size px before the backbone (bicubic, as the
                                      # training crops; e.g. its crop size); null: as read (224)
    device: str = "cpu"               # the CLI's backbone and the MIL head
    # a folder: also write each task's bags as TASK/<slide_id>.h5 (trident's layout)
    write_features: str | None = None

    def __post_init__(self) -> None:
        check_section("bags", self, integers={"batch_size": 1, "num_workers": 0, "max_tiles": 1, "size": 1},
                      optional=("max_tiles", "size"))
        check_device("bags.device", self.device)


@dataclass
class AbmilHeadConfig:
    """Gated attention-MIL, eva's ABMIL defaults (AbmilConfig's)."""

    enabled: bool = True
    projection: int = AbmilConfig.projection
    attention_hidden: int = AbmilConfig.attention_hidden
    mlp: list[int] = field(default_factory=lambda: list(AbmilConfig.mlp))
    lr: float = AbmilConfig.lr
    weight_decay: float = AbmilConfig.weight_decay
    batch_size: int = AbmilConfig.batch_size  # bags per step, padded with a mask
    max_epochs: int = AbmilConfig.max_epochs
    patience: int = AbmilConfig.patience  # validation epochs without a strict gain of balanced accuracy
    n_runs: int = AbmilConfig.n_runs
    seed: int = AbmilConfig.seed
    # true (not eva's): z-score tile features by the training tiles' mean and std
    standardize: bool = AbmilConfig.standardize

    def __post_init__(self) -> None:
        check_section("heads.abmil", self, numbers={"lr": POSITIVE, "weight_decay": NON_NEGATIVE},
                      integers={"n_runs": 1, "max_epochs": 1, "batch_size": 1, "patience": 1, "projection": 1,
                                "attention_hidden": 1})


@dataclass
class MeanPoolHeadConfig:
    """Baseline: mean of each bag, logistic regression (C swept on validation)."""

    enabled: bool = True
    C: list[float] = field(default_factory=lambda: list(LOGREG_C))
    max_iter: int = 1000

    def __post_init__(self) -> None:
        check_section("heads.mean_pool", self, integers={"max_iter": 1}, lists={"C": POSITIVE_NUMBERS})


@dataclass
class SlideHeadsConfig:
    abmil: AbmilHeadConfig = field(default_factory=AbmilHeadConfig)
    mean_pool: MeanPoolHeadConfig = field(default_factory=MeanPoolHeadConfig)


@dataclass
class SlideEvalConfig:
    """`dinov2-patho eval slide` and run_slide_tasks: attention-MIL on bags of frozen tile features; every
    key a slide eval config may set, with its default."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # task names (synthetic, camelyon16, panda) or labels CSVs (slide_id,label[,split][,patient_id])
    tasks: list[str] = field(default_factory=list)
    data_root: str = "data/slides"    # task NAME is read from DATA_ROOT/NAME unless datasets.NAME.root is set
    # per-task options, e.g. {camelyon16: {root: /data/CAMELYON16, tiles: /data/c16_tiles}}
    datasets: dict[str, Any] = field(default_factory=dict)
    slides: str | None = None         # for a labels CSV task: the slide folder, or a slide_id,path CSV
    tiles: str | None = None          # for a labels CSV task: the tile index, or a `curate tiles` TILES_DIR
    # or a folder of <slide_id>.h5 (trident/CLAM: features, coords): the bags, no backbone
    features: str | None = None
    mpp: float | None = None          # override the slides' own µm/px (tiles are read at their 112 µm field)
    bags: BagsConfig = field(default_factory=BagsConfig)
    cross_validation: CrossValidationConfig = field(default_factory=CrossValidationConfig)
    heads: SlideHeadsConfig = field(default_factory=SlideHeadsConfig)
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        check_domains({"mpp": self.mpp}, {"mpp": POSITIVE}, {}, optional=("mpp",))


def slide_config(cfg: DictConfig | dict | None = None) -> DictConfig:
    """The slide-eval defaults under `cfg` (a full or partial config), checked."""
    cfg = merge_over_defaults(SlideEvalConfig, cfg, "slide eval config", OPEN_KEYS)
    instantiate(SlideEvalConfig, cfg)
    return cfg


def open_task(name: str, cfg: DictConfig, cache: Path) -> SlideTask:
    """A registered task by name, or a labels CSV with `cfg.slides` and `cfg.tiles` (or `cfg.features`)."""
    if cfg.features is not None:
        if Path(name).suffix.lower() != ".csv" and not Path(name).is_file():
            raise UserError(f"slide task {name}: with features (--features), a task is a labels CSV "
                            "slide_id,label[,split][,patient_id] over the feature files")
        return features_task(name, cfg.features)
    if name in SLIDE_TASKS:
        node = cfg.datasets.get(name)
        options = dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}
        root = Path(options.pop("root", None) or Path(cfg.data_root) / name)
        SLIDE_TASKS.check_options(name, options, f"datasets.{name}", passed=("cache",))
        return SLIDE_TASKS.get(name)(root, cache, **options)
    if Path(name).suffix.lower() == ".csv" or Path(name).is_file():
        if cfg.slides is None or cfg.tiles is None:
            raise UserError(f"slide task {name}: a labels CSV needs --slides (folder or slide_id,path CSV) "
                            "and --tiles (tile index or `curate tiles` TILES_DIR)")
        return csv_task(name, cfg.slides, cfg.tiles, mpp=cfg.mpp)
    raise UserError(f"unknown slide task {name!r}: not a labels CSV; tasks: {', '.join(SLIDE_TASKS.names())}")


def partitions(task: SlideTask, cfg: DictConfig) -> list[dict[str, np.ndarray]]:
    """Slide indices per split: the task's own splits (scored on test, else val), or K folds by
    patient, stratified by label (fold f tests, fold f+1 validates, the rest train): a class with at
    least K patients is in every test split, so no fold's AUROC is undefined where the labels allow."""
    folds = cfg.cross_validation.folds
    if folds is None:
        if task.splits is None:
            raise UserError(f"slide task {task.name}: its labels have no split column; set "
                            "cross_validation.folds=K to evaluate on K folds by patient")
        return [{s: np.flatnonzero(task.splits == s) for s in ("train", "val", "test")
                 if (task.splits == s).any()}]
    n_patients = len(np.unique(task.patients))
    if isinstance(folds, bool) or not isinstance(folds, int) or not 3 <= folds <= n_patients:
        raise UserError(f"slide task {task.name}: cross_validation.folds={folds!r} must be an integer "
                        f"between 3 and its number of patients ({n_patients})")
    fold = group_folds(task.patients, folds, int(cfg.cross_validation.seed), labels=task.labels)
    return [{"train": np.flatnonzero((fold != f) & (fold != (f + 1) % folds)),
             "val": np.flatnonzero(fold == (f + 1) % folds), "test": np.flatnonzero(fold == f)}
            for f in range(folds)]


def abmil_config(cfg: DictConfig) -> AbmilConfig:
    params = {k: v for k, v in OmegaConf.to_container(cfg.heads.abmil).items() if k != "enabled"}
    return AbmilConfig(**{**params, "mlp": tuple(params["mlp"])}, device=cfg.bags.device)


def evaluate_bags(bags: list[np.ndarray], labels: np.ndarray, part: dict[str, np.ndarray], task: SlideTask,
                  cfg: DictConfig) -> dict:
    """Every enabled head on one partition; scored on its test slides, else on val."""
    eval_split = "test" if "test" in part else "val"
    classes = list(task.classes)

    def pick(split: str) -> tuple[list[np.ndarray], np.ndarray]:
        return [bags[i] for i in part[split]], labels[part[split]]

    out: dict = {"eval_split": eval_split, "sizes": {k: int(len(v)) for k, v in part.items()}}
    if cfg.heads.abmil.enabled:
        out["abmil"] = abmil(pick("train"), pick("val"), pick(eval_split), classes, abmil_config(cfg),
                             task.ordinal)
    if cfg.heads.mean_pool.enabled:
        pooled = np.stack([bag.mean(0) for bag in bags])
        xy = {s: (pooled[idx], labels[idx]) for s, idx in part.items()}
        cs = tuple(float(c) for c in cfg.heads.mean_pool.C)
        out["mean_pool"] = logistic_regression(xy["train"], xy["val"], xy[eval_split], classes, cs,
                                               cfg.heads.mean_pool.max_iter, task.ordinal)
        out["mean_pool"].pop("predictions")  # slide results keep scores only
    return out


def fold_mean(per_fold: list[dict]) -> dict:
    """Folds averaged; a fold whose AUROC is undefined (one class among its test slides) is left out
    of that head's AUROC mean and counted in its `auroc_undefined_folds` (all undefined: NaN)."""
    result = mean_over_folds(per_fold)
    for head in ("abmil", "mean_pool"):
        if head in result:
            result[head]["auroc_undefined_folds"] = sum(math.isnan(f[head]["auroc"]) for f in per_fold)
    result["folds"] = per_fold
    return result


def run_slide_task(backbone: nn.Module | None, task: SlideTask, cfg: DictConfig, output_dir: Path,
                   backbone_name: str) -> dict:
    b = cfg.bags
    if task.features is not None:
        bags = feature_bags(task, cap=b.max_tiles, seed=b.seed, progress=cfg.progress)
    else:
        check_token(backbone, b.token, "bags.token")
        bags = extract_bags(task, backbone, output_dir / "bags" / task.name, backbone_name=backbone_name,
                            token=b.token, cap=b.max_tiles, seed=b.seed, batch_size=b.batch_size,
                            num_workers=b.num_workers, size=b.size, progress=cfg.progress)
        if b.write_features is not None:
            write_bags(task, bags, Path(b.write_features) / task.name, cap=b.max_tiles, seed=b.seed)
    parts = partitions(task, cfg)
    per_part = [evaluate_bags(bags, task.labels, part, task, cfg) for part in parts]
    if len(per_part) == 1:
        result = per_part[0]
    else:
        result = fold_mean(per_part)
        result.update(eval_split="test", cv_folds=len(parts),
                      sizes={k: int(round(np.mean([p["sizes"][k] for p in per_part])))
                             for k in per_part[0]["sizes"]})
    result.update(classes=list(task.classes), tiles_per_slide=float(np.mean([len(b) for b in bags])))
    return result


def run_slide_tasks(backbone: nn.Module | None, tasks: list[str], cfg: DictConfig | dict | None,
                    output_dir: str | Path, backbone_name: str = "backbone",
                    record: dict | None = None) -> dict:
    """Evaluate `backbone` (frozen here) on each slide task; write results to `output_dir`.
    Bags are cached in `output_dir/bags/<task>`, keyed by `backbone_name` and a hash of its weights.
    With `cfg.features`, the bags are the feature files and `backbone` is None."""
    cfg = slide_config(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    with frozen(backbone) if backbone is not None else contextlib.nullcontext():
        for name in tasks:
            task = open_task(name, cfg, output_dir / "tiles" / Path(name).stem)
            results[task.name] = run_slide_task(backbone, task, cfg, output_dir, backbone_name)
            if "abmil" in results[task.name]:
                r = results[task.name]["abmil"]
                undefined = r.get("auroc_undefined_folds", 0)
                log.info("%s: attention-MIL AUROC %s%s, balanced accuracy %s", task.name,
                         format_score(r["auroc"], "auroc"),
                         f" (undefined in {undefined} of {results[task.name]['cv_folds']} folds, left out)"
                         if undefined else "", format_score(r["balanced_accuracy"]))
    return write_results(results, output_dir, cfg.plot, record)  # record: a random init's seed
