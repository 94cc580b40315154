"""Evaluate a frozen backbone on benchmarks: extract (cached) features, fit every head,
write results.{json,csv,md,png}. The CLI and the trainer's periodic evaluation both call
`run_benchmarks`. Its config: `EvalConfig`, a dataclass per section, checked in its `__post_init__`
(`eval run --config-file` and overrides merge over it)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dinov2_patho.backbones.features import check_cache_manifest, extract_features, weights_hash
from dinov2_patho.backbones.hub import normalisation
from dinov2_patho.backbones.load import BackboneConfig, frozen
from dinov2_patho.backbones.preprocess import Preprocess
from dinov2_patho.config_files import (
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    check_section,
    instantiate,
    merge_over_defaults,
)
from dinov2_patho.io import atomic_path
from dinov2_patho.logging import get_logger

from .benchmarks import Benchmark, BenchmarkError, build_benchmark
from .heads import LinearProbeConfig, knn_classify, linear_probe, logistic_regression
from .report import write_results

log = get_logger(__name__)

OPEN_KEYS = ("datasets", "backbone.model")
BENCHMARK_NAMES = ("bach", "crc", "mhist", "pcam", "bracs", "breakhis", "unitopatho", "chaoyang")
# value domains, checked before any backbone or feature (a zero n_runs or an empty C sweep was a traceback)
UNIT_INTERIOR = ("must be in (0, 1)", lambda v: 0 < v < 1)
POSITIVE_INTEGERS = ("integers >= 1", lambda v: type(v) is int and v >= 1)
POSITIVE_NUMBERS = ("numbers > 0", lambda v: type(v) in (int, float) and v > 0)
LOGREG_C = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # the logistic regressions' C sweep


def check_device(key: str, device: str) -> None:
    """A one-line ConfigError for a device this machine lacks."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={device}: this machine has no CUDA device (use cpu)")


@dataclass
class PreprocessConfig:
    # null: eva's resize-shorter-side-and-centre-crop; a number: rescale to this µm/px first
    target_mpp: float | None = None
    size: int = 224

    def __post_init__(self) -> None:
        check_section("preprocess", self, numbers={"target_mpp": POSITIVE}, integers={"size": 1},
                      optional=("target_mpp",))


@dataclass
class CrossValidationConfig:
    """`cross_validation` of the eval configs (checked against a benchmark's or a task's slides when it
    runs)."""

    # null: the benchmark's own splits. K >= 3: K folds by slide/patient over all its images (fold f
    # tests, fold f+1 validates, the rest train); scores are the fold mean
    folds: Any = None
    seed: int = 0                     # the order in which slides/patients are dealt to folds


@dataclass
class FeaturesConfig:
    tokens: str = "cls"               # cls | patch_mean | cls+patch_mean
    batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"               # the CLI's backbone and the linear probe (run_benchmarks keeps a
                                      # given backbone's device)

    def __post_init__(self) -> None:
        check_section("features", self, integers={"batch_size": 1, "num_workers": 0})
        check_device("features.device", self.device)


@dataclass
class LinearHeadConfig:
    """eva's linear probe protocol (LinearProbeConfig's defaults)."""

    enabled: bool = True
    lr: float = LinearProbeConfig.lr
    weight_decay: float = LinearProbeConfig.weight_decay
    batch_size: int = LinearProbeConfig.batch_size
    max_steps: int = LinearProbeConfig.max_steps
    patience: int | None = LinearProbeConfig.patience  # validation epochs; null = eva's ceil(0.2 * epochs)
    n_runs: int = LinearProbeConfig.n_runs
    seed: int = LinearProbeConfig.seed

    def __post_init__(self) -> None:
        check_section("heads.linear", self, numbers={"lr": POSITIVE, "weight_decay": NON_NEGATIVE},
                      integers={"n_runs": 1, "max_steps": 1, "batch_size": 1, "patience": 1},
                      optional=("patience",))


@dataclass
class KnnHeadConfig:
    enabled: bool = True
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07

    def __post_init__(self) -> None:
        check_section("heads.knn", self, numbers={"temperature": POSITIVE}, lists={"k": POSITIVE_INTEGERS})


@dataclass
class LogregHeadConfig:
    enabled: bool = True
    C: list[float] = field(default_factory=lambda: list(LOGREG_C))
    max_iter: int = 1000
    heldout_fraction: float = 0.2     # of train, for the C sweep when the benchmark has no test split

    def __post_init__(self) -> None:
        check_section("heads.logreg", self, numbers={"heldout_fraction": UNIT_INTERIOR},
                      integers={"max_iter": 1}, lists={"C": POSITIVE_NUMBERS})


@dataclass
class HeadsConfig:
    linear: LinearHeadConfig = field(default_factory=LinearHeadConfig)
    knn: KnnHeadConfig = field(default_factory=KnnHeadConfig)
    logreg: LogregHeadConfig = field(default_factory=LogregHeadConfig)


@dataclass
class EvalConfig:
    """`dinov2-patho eval run` and the trainer's periodic evaluation (run_benchmarks): every key an eval
    config may set, with its default."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    benchmarks: list[str] = field(default_factory=lambda: list(BENCHMARK_NAMES))
    data_root: str = "data/benchmarks"  # benchmark NAME is read from DATA_ROOT/NAME unless datasets.NAME.root
    # per-benchmark options, e.g. {bach: {root: /data/BACH}, synthetic: {max_tiles_per_split: 200}}
    datasets: dict[str, Any] = field(default_factory=dict)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    cross_validation: CrossValidationConfig = field(default_factory=CrossValidationConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    plot: bool = True
    progress: bool = True


def eval_config(cfg: DictConfig | dict | None = None) -> DictConfig:
    """The eval defaults under `cfg` (a full or partial eval config), checked."""
    cfg = merge_over_defaults(EvalConfig, cfg, "eval config", OPEN_KEYS)
    instantiate(EvalConfig, cfg)
    return cfg


def open_benchmark(name: str, cfg: DictConfig) -> Benchmark:
    node = cfg.datasets.get(name)
    options = dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}
    root = options.pop("root", None) or Path(cfg.data_root) / name
    return build_benchmark(name, root, **options)


def heldout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, heldout) row indices; classes with one row stay in train."""
    rng = np.random.default_rng(seed)
    heldout = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        if len(rows) > 1:
            heldout.append(rows[:max(1, math.floor(fraction * len(rows)))])
    held = np.sort(np.concatenate(heldout)) if heldout else np.empty(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), held), held


def take_predictions(result: dict) -> dict[str, np.ndarray]:
    """The test predictions of each head, removed from its result: {"linear", "knn_<k>", "logreg"}."""
    preds = {}
    for head, value in result.items():
        if head == "knn":
            preds.update({f"knn_{k}": r.pop("predictions") for k, r in value.items()})
        elif isinstance(value, dict) and "predictions" in value:
            preds[head] = value.pop("predictions")
    return preds


def evaluate_features(feats: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], eval_split: str,
                      cfg: DictConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Every enabled head on features {split: (x, y)}; early stopping / C sweep on val. Returns the
    heads' results and their predictions on the eval split (take_predictions)."""
    heads = cfg.heads
    train, val, test = feats["train"], feats["val"], feats[eval_split]
    out: dict = {}
    if heads.linear.enabled:
        params = {k: v for k, v in OmegaConf.to_container(heads.linear).items() if k != "enabled"}
        probe_cfg = LinearProbeConfig(**params, device=cfg.features.device)
        out["linear"] = linear_probe(train, val, test, classes, probe_cfg)
    if heads.knn.enabled:
        out["knn"] = knn_classify(train, test, classes, tuple(heads.knn.k), heads.knn.temperature)
    if heads.logreg.enabled:
        cs = tuple(float(c) for c in heads.logreg.C)
        if eval_split == "test":
            out["logreg"] = logistic_regression(train, val, test, classes, cs, heads.logreg.max_iter)
        else:
            fit, held = heldout_split(train[1], heads.logreg.heldout_fraction, heads.linear.seed)
            fit_xy, held_xy = (train[0][fit], train[1][fit]), (train[0][held], train[1][held])
            out["logreg"] = logistic_regression(fit_xy, held_xy, test, classes, cs, heads.logreg.max_iter)
    return out, take_predictions(out)


def group_folds(groups: np.ndarray, folds: int, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """The fold of each row: distinct groups (slides, patients) in a seeded random order are
    dealt to `folds` folds in turn, so no group spans two folds.

    With `labels` (one per row) the folds are also stratified: groups are ordered by their most
    common label, shuffled within it, then dealt in turn, so each fold holds floor or ceil of
    1/folds of every label's groups, and a label with at least `folds` groups is in every fold."""
    names, inverse = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    if labels is not None:
        label_values, label_ids = np.unique(labels, return_inverse=True)
        counts = np.zeros((len(names), len(label_values)), np.int64)
        np.add.at(counts, (inverse, label_ids), 1)
        group_label = counts.argmax(axis=1)  # a patient's most common label; ties: the first
        order = order[np.argsort(group_label[order], kind="stable")]
    fold_of_group = np.empty(len(names), np.int64)
    fold_of_group[order] = np.arange(len(names)) % folds
    return fold_of_group[inverse]


def mean_over_folds(results: list):
    """Fold results averaged leaf by leaf (NaN-aware: a class absent from a fold's test set).
    Per-run lists, within-fold `*_std` and the chosen `C` do not average; each head's
    `balanced_accuracy_std` becomes the spread over folds."""
    first = results[0]
    if isinstance(first, dict):
        out = {}
        for key in first:
            if isinstance(key, str) and (key.endswith("_std") or key == "C"):
                continue
            value = mean_over_folds([r[key] for r in results])
            if value is not None:
                out[key] = value
        if "balanced_accuracy" in first:
            out["balanced_accuracy_std"] = float(np.std([r["balanced_accuracy"] for r in results]))
        return out
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        values = np.asarray(results, np.float64)
        return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
    return None


def cross_validate(feats: dict[str, tuple[np.ndarray, np.ndarray]], groups: np.ndarray, classes: list[str],
                   cfg: DictConfig) -> dict:
    """Every head on K group-disjoint folds of all the benchmark's rows: fold f is tested,
    fold f+1 validates (early stopping, C sweep), the others train. Returns the fold mean,
    with each fold's own result under "folds", and every row's out-of-fold prediction per head
    under "predictions" (with its label "y" and group "groups": what eval.power resamples)."""
    k = int(cfg.cross_validation.folds)
    x = np.concatenate([f[0] for f in feats.values()])
    y = np.concatenate([f[1] for f in feats.values()])
    fold = group_folds(groups, k, int(cfg.cross_validation.seed))
    per_fold, sizes = [], []
    out_of_fold: dict[str, np.ndarray] = {}
    for f in range(k):
        test, val = fold == f, fold == (f + 1) % k
        train = ~(test | val)
        split = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
        fold_result, preds = evaluate_features(split, classes, "test", cfg)
        for head, pred in preds.items():
            out_of_fold.setdefault(head, np.full(len(y), -1, np.int64))[test] = pred
        per_fold.append(fold_result)
        sizes.append([int(train.sum()), int(val.sum()), int(test.sum())])
    result = mean_over_folds(per_fold)
    mean_sizes = np.mean(sizes, axis=0).round().astype(int)
    result.update(folds=per_fold, sizes=dict(zip(("train", "val", "test"), map(int, mean_sizes))),
                  predictions={"y": y, "groups": np.asarray(groups), **out_of_fold})
    return result


def feature_manifest(benchmark: Benchmark, backbone: nn.Module, cfg: DictConfig) -> dict:
    """What a benchmark's cached features are of: another backbone, preprocessing or image set in the
    same output directory is refused, not read back as this one's features."""
    options = cfg.datasets.get(benchmark.name)
    options = dict(OmegaConf.to_container(options, resolve=True)) if options is not None else {}
    options.pop("root", None)  # where the images are read from is not what they are
    return {"weights_sha256": weights_hash(backbone),
            "preprocess": {"mpp": benchmark.mpp, "target_mpp": cfg.preprocess.target_mpp,
                           "size": cfg.preprocess.size},
            "options": options,
            "splits": {name: {"images": len(split), "labels_sha256": hashlib.sha256(
                np.ascontiguousarray(split.labels, np.int64).tobytes()).hexdigest()}
                for name, split in benchmark.splits.items()}}


def run_benchmark(backbone: nn.Module, benchmark: Benchmark, cfg: DictConfig, output_dir: Path) -> dict:
    folds = cfg.cross_validation.folds
    if folds is not None:
        groups = [split.groups for split in benchmark.splits.values()]
        if any(g is None for g in groups):
            raise BenchmarkError(f"benchmark {benchmark.name}: cross_validation.folds needs the slide or "
                                 "patient of each image, which this adapter does not give")
        groups = np.concatenate(groups)
        n_groups = len(np.unique(groups))
        if isinstance(folds, bool) or not isinstance(folds, int) or not 3 <= folds <= n_groups:
            raise BenchmarkError(f"benchmark {benchmark.name}: cross_validation.folds={folds!r} must be an "
                                 f"integer between 3 and its number of slides/patients ({n_groups})")
    # the normalisation is the backbone's (weights_sha256 in the manifest keys it)
    preprocess = Preprocess(benchmark.mpp, cfg.preprocess.target_mpp, cfg.preprocess.size,
                            *normalisation(backbone))
    cache = output_dir / "features" / benchmark.name
    check_cache_manifest(cache, feature_manifest(benchmark, backbone, cfg), "features")
    feats = {}
    for split_name, split in benchmark.splits.items():
        features = extract_features(backbone, split.with_transform(preprocess), cache / split_name,
                                    batch_size=cfg.features.batch_size, num_workers=cfg.features.num_workers,
                                    progress=cfg.progress,
                                    desc=f"{benchmark.name}/{split_name}")
        feats[split_name] = (features.tokens(cfg.features.tokens), np.asarray(features.labels))
    if folds is not None:
        result = cross_validate(feats, groups, list(benchmark.classes), cfg)
        result.update(classes=list(benchmark.classes), eval_split="test", cv_folds=int(folds))
        return result
    result, preds = evaluate_features(feats, list(benchmark.classes), benchmark.eval_split, cfg)
    eval_split = benchmark.splits[benchmark.eval_split]
    groups = eval_split.groups if eval_split.groups is not None else np.arange(len(eval_split))
    result.update(classes=list(benchmark.classes), eval_split=benchmark.eval_split,
                  sizes={k: len(v[1]) for k, v in feats.items()},
                  predictions={"y": feats[benchmark.eval_split][1], "groups": np.asarray(groups), **preds})
    return result


def run_benchmarks(backbone: nn.Module, benchmarks: list[str], cfg: DictConfig | dict | None,
                   output_dir: str | Path, record: dict | None = None) -> dict:
    """Evaluate `backbone` (frozen here) on each benchmark; write results to `output_dir`.

    `cfg` is an eval config (EvalConfig; partial ones are merged over it).
    `record` (the CLI's backbone: path, arch, seed) goes with each result in results.json.
    Features are cached in `output_dir/features`; a cache of another backbone (weights sha256),
    preprocessing or image set is refused, so give each checkpoint its own `output_dir` (the
    trainer: one per evaluation step). Each result also holds, in memory, the eval split's labels,
    groups and every head's predictions ("predictions"), saved as `output_dir/predictions/NAME.npz`."""
    cfg = eval_config(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results, predictions = {}, {}
    with frozen(backbone):
        for name in benchmarks:
            results[name] = run_benchmark(backbone, open_benchmark(name, cfg), cfg, output_dir)
            predictions[name] = results[name].pop("predictions")
            with atomic_path(output_dir / "predictions" / f"{name}.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **predictions[name])
            if "linear" in results[name]:
                lin = results[name]["linear"]
                log.info("%s: linear probe balanced accuracy %.2f ± %.2f", name,
                         100 * lin["balanced_accuracy"], 100 * lin["balanced_accuracy_std"])
    written = write_results(results, output_dir, cfg.plot, record)  # record: a random init's seed
    return {name: {**result, "predictions": predictions[name]} for name, result in written.items()}
