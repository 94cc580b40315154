"""Evaluate a frozen backbone on slide tasks: bags of tile features (cached), gated
attention-MIL and a mean-pooling baseline, written as `eval run` writes its results
(results.{json,csv,md,png})."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dinov2_patho.backbones.hub import check_token
from dinov2_patho.backbones.load import frozen
from dinov2_patho.config_files import NON_NEGATIVE, POSITIVE, merge_over_defaults
from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger

from ..heads.abmil import AbmilConfig, abmil
from ..heads.logreg import logistic_regression
from ..report import format_score, write_results
from ..runner import LISTS as TILE_LISTS
from ..runner import check_eval_values, group_folds, mean_over_folds
from .adapters import SLIDE_TASKS
from .bags import extract_bags, feature_bags, write_bags
from .tasks import SlideTask, csv_task, features_task

log = get_logger(__name__)

DEFAULTS = "eval/slide.yaml"
OPEN_KEYS = ("datasets", "backbone.model")


NUMBERS = {"heads.abmil.lr": POSITIVE, "heads.abmil.weight_decay": NON_NEGATIVE, "mpp": POSITIVE}
INTEGERS = {"heads.abmil.n_runs": 1, "heads.abmil.max_epochs": 1, "heads.abmil.batch_size": 1,
            "heads.abmil.patience": 1, "heads.abmil.projection": 1, "heads.abmil.attention_hidden": 1,
            "heads.mean_pool.max_iter": 1, "bags.batch_size": 1, "bags.num_workers": 0, "bags.max_tiles": 1}
OPTIONAL = ("mpp", "bags.max_tiles")
LISTS = {"heads.mean_pool.C": TILE_LISTS["heads.logreg.C"]}


def check_slide_values(cfg: DictConfig) -> None:
    check_eval_values(cfg, NUMBERS, INTEGERS, OPTIONAL, LISTS, "bags.device")


def slide_config(cfg: DictConfig | dict | None = None) -> DictConfig:
    """The packaged slide-eval defaults under `cfg` (a full or partial config), checked."""
    cfg = merge_over_defaults(DEFAULTS, cfg, "slide eval config", OPEN_KEYS)
    check_slide_values(cfg)
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
                            num_workers=b.num_workers, progress=cfg.progress)
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
