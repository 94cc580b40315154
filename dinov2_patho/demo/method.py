"""`run_demo(...)` (`dinov2-patho demo`): the paper's method end to end on the embedded default, on a CPU,
in minutes.

A long-tailed synthetic cohort (tissue types planted at about 60/25/11/4 %, plus rare necrosis
lesions on half the slides, which make those slides positive) -> curation with no planted tree:
`curate tiles` -> `curate embed` (a frozen random-init ViT-Ti) -> `curate kmeans` -> `curate write`
-> round 1: cpu_smoke training with batches stratified over the curated tree's top level ->
re-curation of the same tiles with the round-1 teacher -> round 2: cpu_smoke training from scratch,
stratified over the re-curated tree's top level (the method's own loop: a competent embedder makes the
tree) -> evaluation of the round-2 teacher against its random initialisation: tile-level tissue-type
probe (4-fold cross-validation by slide; common and rare types apart) and the slide task
(attention-MIL, lesion present or not) -> `report.html`.

The planted tissue types are never used for curation or training, only to score: the trees'
agreement with them (adjusted Rand index, NMI per level) and the probes. Every stage is skipped
when its output is already there, so a second run only re-evaluates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dinov2_patho.config_files import packaged_config
from dinov2_patho.demo.cohort import Cohort, make_cohort
from dinov2_patho.errors import UserError
from dinov2_patho.eval.report import format_score
from dinov2_patho.io import atomic_write_text
from dinov2_patho.logging import get_logger, setup_logging

log = get_logger(__name__)

# tumour, stroma, adipose, mucus; necrosis (0 here) appears only in the planted lesions
TISSUE_MIX = (0.60, 0.25, 0.11, 0.04, 0.0)
POSITIVE_FRACTION = 0.5
# The curation embedding: a real ViT at random init (no weights can be downloaded). Its patch-token
# mean, as a random-init CLS token is near constant. The teacher trained on its tree re-curates. Both embed
# the tiles at the crop size the backbones train and are probed at (at 224 px, 4x the tokens, the first
# curation took 2 of the demo's 6 minutes).
EMBED_ARCH = "timm/vit_tiny_patch16_224"
EMBED_OVERRIDES = ("embed.token=patch_mean",)
SAMPLER_LEVEL = 3  # the top of the cpu_smoke tree (4 clusters): 4 tiles per cluster in a batch of 16
# 24 slides of 20 x 20 tiles (~5,000 tissue tiles) with lesions of 24 tiles: each fold's test slides hold
# >= 40 tiles of each rare type, so the probe's rare classes are measured, not guessed (RESULTS.md)
DEMO_SLIDES = 24
DEMO_GRID = 20  # tiles per side of a slide
LESION_TILES = 24
FOLDS = 4
CURVE_EVERY = 100  # iterations between two points of the learning curve
CURVE_TILES = 300  # tiles of each split the learning curve's kNN uses
RARE_SHARE = 0.05  # tile-probe classes under this share of the tiles are reported as rare
HEADS = ("linear", "knn", "logreg")
# On ~3,800 training tiles a fold, 3 linear runs and C up to 1e4 (hundreds of lbfgs steps a fit) took most
# of the demo's time: one linear run and C <= 100, the same for both backbones
DEMO_HEADS = {"linear": {"n_runs": 1}, "logreg": {"C": [0.001, 0.01, 0.1, 1.0, 10.0, 100.0]}}
_PREDICTION = {"linear": "linear", "knn": "knn_20", "logreg": "logreg"}  # head -> its predictions' key
BACKBONES = ("trained", "random_init")  # trained: the round-2 teacher
ROUND_1, ROUND_2 = "round_1", "round_2"  # the two trainings' run directories under the demo's output
COMPARISON_FILE = "comparison.md"


def class_groups(labels_csv: Path) -> dict[str, list[str]]:
    """The planted tissue types split by their share of the tiles: common and rare (< RARE_SHARE)."""
    import csv

    with open(labels_csv, newline="") as f:
        types = np.array([row["tissue_type"] for row in csv.DictReader(f)])
    names, counts = np.unique(types, return_counts=True)
    share = counts / counts.sum()
    return {"common": [str(n) for n, s in zip(names, share) if s >= RARE_SHARE],
            "rare": [str(n) for n, s in zip(names, share) if s < RARE_SHARE]}


def group_recall(result: dict, classes: list[str]) -> float:
    """Mean linear-probe recall over `classes` (their balanced accuracy within the full task)."""
    recall = result["linear"]["per_class_recall"]
    return float(np.nanmean([recall[c] for c in classes])) if classes else float("nan")


def make_demo_cohort(out: Path, num_slides: int, seed: int, grid: int = DEMO_GRID,
                     lesion_tiles: int = LESION_TILES):
    if (out / "slide_labels.csv").is_file():
        log.info("cohort: reusing %s", out)
        return Cohort.at(out)
    return make_cohort(out, num_slides=num_slides, seed=seed, grid=(grid, grid), tissue_mix=TISSUE_MIX,
                       positive_fraction=POSITIVE_FRACTION, lesion_tiles=lesion_tiles)


def curate_cohort(cohort, out: Path, size: int, *, progress: bool = True, backbone: Path | None = None,
                  tiles: Path | None = None):
    """The cohort's slides curated into `out` with the cpu_smoke tree (see curation.pipeline.curate), their
    tiles embedded at `size` px: by `backbone`, or EMBED_ARCH at random init built for that size."""
    from dinov2_patho.curation.pipeline import curate

    overrides = (f"embed.size={size}",) if backbone else (*EMBED_OVERRIDES, f"embed.size={size}",
                                                          f"embed.model.img_size={size}")
    return curate(cohort.slides_dir, out, config_file=packaged_config("curation/cpu_smoke.yaml"),
                  backbone=backbone, arch=EMBED_ARCH, overrides=overrides, tiles=tiles, progress=progress)


def train_config(index: Path, slides: Path, seed: int, overrides: list[str] | tuple[str, ...] = (),
                 learning_curve: Path | None = None):
    """cpu_smoke on the curated index, stratified over its top level, then the user's overrides;
    with `learning_curve` (an eval config, see write_learning_curve_config), the teacher's kNN on
    held-out slides every CURVE_EVERY iterations."""
    from dinov2_patho.train.config import load_train_config

    curve = [] if learning_curve is None else [
        "evaluation.benchmarks=[synthetic]", f"evaluation.config_file={learning_curve}",
        f"evaluation.every_n_iterations={CURVE_EVERY}"]
    return load_train_config(packaged_config("train/cpu_smoke.yaml"), [
        f"data.index={index}", f"data.slides={slides}", f"train.seed={seed}",
        f"sampler.level={SAMPLER_LEVEL}", *curve, *overrides])


def random_init(cfg):
    """The student of `cfg` as its training starts, in eval mode: the trainer seeds torch with
    train.seed and the student backbone is the first thing it draws. This is the random initialisation
    that a trained teacher of `cfg` is compared with (any other draw differs from it by a few points)."""
    from dinov2_patho.models.student import build_student_backbone

    torch.manual_seed(int(cfg.train.seed))
    return build_student_backbone(cfg).eval()


def write_learning_curve_config(path: Path, cohort_root: Path, crop_size: int) -> Path:
    """The eval config of the learning curve: kNN (k=20) alone, on CURVE_TILES tiles of each split of
    the cohort's tissue-type probe, 4-fold cross-validation by slide: seconds per point."""
    from omegaconf import OmegaConf

    cfg = {"datasets": {"synthetic": {"root": str(cohort_root), "max_tiles_per_split": CURVE_TILES}},
           "heads": {"linear": {"enabled": False}, "logreg": {"enabled": False}, "knn": {"k": [20]}},
           "preprocess": {"size": crop_size}, "cross_validation": {"folds": FOLDS}, "plot": False,
           "progress": False}
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


def tile_probe(backbone, cohort, crop_size: int, out: Path, progress: bool = True) -> dict:
    """The tissue-type probe of `backbone` (linear, kNN, logreg; FOLDS-fold CV by slide) under `out`,
    with its out-of-fold predictions ("predictions", see eval.runner.run_benchmarks)."""
    from dinov2_patho.eval.runner import run_benchmarks

    cfg = {"datasets": {"synthetic": {"root": str(cohort.root)}}, "heads": DEMO_HEADS,
           "preprocess": {"size": crop_size}, "cross_validation": {"folds": FOLDS}, "progress": progress}
    return run_benchmarks(backbone, ["synthetic"], cfg, out)["synthetic"]


def pooled_scores(result: dict) -> dict[str, float]:
    """Balanced accuracy of the out-of-fold predictions of each head of a tile_probe result."""
    from dinov2_patho.eval.metrics import balanced_accuracy

    preds = result["predictions"]
    return {head: balanced_accuracy(preds["y"], preds[key], len(result["classes"]))
            for head, key in _PREDICTION.items()}


def evaluate(backbones: dict, cohort, crop_size: int, out: Path, progress: bool = True) -> dict:
    """Tile probe (CV by slide) and slide task (attention-MIL) of each backbone, results under `out`."""
    from dinov2_patho.eval.slide.runner import run_slide_tasks

    # bags of tiles at the crop size the backbones were trained at, as the tile probe (at 224 px, 4x the
    # tokens, the bags took more time than the second training round)
    slide_cfg = {"datasets": {"synthetic": {"root": str(cohort.root)}}, "heads": {"abmil": {"n_runs": 3}},
                 "bags": {"size": crop_size},
                 "cross_validation": {"folds": FOLDS}, "progress": progress}
    results = {}
    for name, backbone in backbones.items():
        tiles = tile_probe(backbone, cohort, crop_size, out / name, progress)
        slides = run_slide_tasks(backbone, ["synthetic"], slide_cfg, out / name / "slide", name)["synthetic"]
        results[name] = {"tiles": tiles, "slides": slides}
    return results


def run_demo(output_dir: str | Path, *, num_slides: int = DEMO_SLIDES, grid: int = DEMO_GRID,
             lesion_tiles: int = LESION_TILES, seed: int = 0,
             overrides: list[str] | tuple[str, ...] = (), progress: bool = True, report: bool = True) -> dict:
    """Run the whole method in `output_dir`. Returns {"summary": the round-2 training summary,
    "round_1": round 1's, "agreement": {embedding: tree_agreement rows}, "groups": common/rare classes,
    "trained" (the round-2 teacher) / "random_init": {"tiles": tile benchmark result, "slides": slide
    task result}, "report": its path or None}."""
    from dinov2_patho.backbones.teacher import teacher_backbone
    from dinov2_patho.curation.pipeline import Curation, tree_agreement
    from dinov2_patho.train.trainer import run_training

    out = Path(output_dir)
    setup_logging(out)
    # the training configs are checked (a misspelt override) before the slow stages make their paths
    cohort_at, curve = Cohort.at(out / "cohort"), out / "learning_curve.yaml"
    cfg_1 = train_config(Curation(out / "curation").index, cohort_at.slides_dir, seed, overrides)
    cfg = train_config(Curation(out / "recuration").index, cohort_at.slides_dir, seed, overrides,
                       learning_curve=curve)
    if num_slides < FOLDS:  # else the evaluations stop only after curation and training
        raise UserError(f"--num-slides {num_slides}: the demo's {FOLDS}-fold cross-validation by slide needs "
                        f"at least {FOLDS} slides")
    cohort = make_demo_cohort(out / "cohort", num_slides, seed, grid, lesion_tiles)
    size = cfg.crops.global_crops_size
    write_learning_curve_config(curve, cohort.root, size)
    curation = curate_cohort(cohort, out / "curation", size, progress=progress)
    round_1 = run_training(cfg_1, out / ROUND_1, progress=progress)
    recuration = curate_cohort(cohort, out / "recuration", size, progress=progress, backbone=out / ROUND_1,
                               tiles=curation.tiles)
    summary = run_training(cfg, out / ROUND_2, progress=progress)
    agreement = {"random-init ViT-Ti": tree_agreement(curation.index, cohort.labels_csv),
                 "round-1 teacher": tree_agreement(recuration.index, cohort.labels_csv)}

    backbones = {"trained": teacher_backbone(summary["checkpoint"]), "random_init": random_init(cfg)}
    results = {"summary": summary, "round_1": round_1, "agreement": agreement,
               "groups": class_groups(cohort.labels_csv),
               **evaluate(backbones, cohort, size, out / "eval", progress),
               "report": None}
    if report:
        from dinov2_patho.report import write_report

        results["report"] = write_report(out / ROUND_2, out / "report.html", index=recuration.index,
                                         slides=cohort.slides_dir, embeddings=recuration.embeddings,
                                         eval_dirs=[out / "eval"], metadata=cohort.metadata_csv,
                                         progress=progress)
    return results


def probe_intervals(results: dict, n_boot: int = 2000) -> dict:
    """Out-of-fold balanced accuracy per backbone and head with 95 % intervals over slides, and the
    paired difference trained - random_init (eval.power)."""
    from dinov2_patho.eval.power import bootstrap_balanced_accuracy, paired_bootstrap_difference

    preds = {name: results[name]["tiles"]["predictions"] for name in BACKBONES}
    y, groups = preds["trained"]["y"], preds["trained"]["groups"]
    num_classes = len(results["trained"]["tiles"]["classes"])
    out: dict = {"tiles": len(y), "slides": len(np.unique(groups))}
    for name in BACKBONES:
        out[name] = {head: bootstrap_balanced_accuracy(y, preds[name][_PREDICTION[head]], groups, num_classes,
                                                       n_boot) for head in HEADS}
    trained, random_init = preds["trained"], preds["random_init"]
    out["trained - random_init"] = {
        head: paired_bootstrap_difference(y, trained[_PREDICTION[head]], random_init[_PREDICTION[head]],
                                          groups, num_classes, n_boot) for head in HEADS}
    return out


def learning_curve(metrics_file: str | Path) -> list[tuple[int, float]]:
    """(iteration, kNN balanced accuracy) of the training run's periodic evaluations."""
    from dinov2_patho.train.metrics_log import read_metrics

    return [(r["eval_iteration"], r["eval/synthetic/knn_20"]) for r in read_metrics(metrics_file)
            if "eval/synthetic/knn_20" in r]


def _fold_range(result: dict, head: str, metric: str) -> str:
    """`mean (min–max)` over the folds of a slide result, in %; why there is none for an undefined AUROC."""
    values = np.array([f[head][metric] for f in result.get("folds", [result])], np.float64)
    if np.isnan(values).all():
        return format_score(float("nan"), metric, 1)
    return (f"{format_score(result[head][metric], metric, 1)} ({100 * np.nanmin(values):.1f}–"
            f"{100 * np.nanmax(values):.1f})")


def _with_interval(interval, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return (f"{100 * interval.value:{sign}.1f} [{100 * interval.low:{sign}.1f}, "
            f"{100 * interval.high:{sign}.1f}]")


def comparison_table(results: dict) -> str:
    """What the demo measured, as markdown: tree agreement, tile probe, slide task."""
    from dinov2_patho.eval.power import minimum_detectable_effect

    groups = results["groups"]
    lines = ["Curated trees against the planted tissue types (never used to curate or train):", "",
             "| embedding | level | clusters | ARI | NMI |", "|---|---|---|---|---|"]
    for name, rows in results["agreement"].items():
        lines += [f"| {name} | {r['level']} | {r['clusters']} | {r['ari']:.2f} | {r['nmi']:.2f} |"
                  for r in rows]
    intervals = probe_intervals(results)
    lines += ["", "Tile-level tissue-type probe of the round-2 teacher (`trained`) and its random "
              "initialisation: balanced accuracy (%) of the out-of-fold predictions on "
              f"held-out slides ({FOLDS} cross-validation folds by slide; {intervals['tiles']} tiles, "
              f"{intervals['slides']} slides), [95 % interval, slides resampled]; linear-probe recall of "
              f"the common ({', '.join(groups['common'])}) and rare ({', '.join(groups['rare'])}) types "
              "(mean over folds).", "",
              "| backbone | linear | kNN (k=20) | logreg | common | rare |", "|---|---|---|---|---|---|"]
    for name in BACKBONES:
        tiles = results[name]["tiles"]
        cells = [_with_interval(intervals[name][head]) for head in HEADS]
        lines.append(f"| {name} | {' | '.join(cells)} | {100 * group_recall(tiles, groups['common']):.1f} | "
                     f"{100 * group_recall(tiles, groups['rare']):.1f} |")
    diff = intervals["trained - random_init"]
    cells = " | ".join(_with_interval(diff[head], signed=True) for head in HEADS)
    lines.append(f"| trained − random_init | {cells} | | |")
    detectable = ", ".join(f"{head} {100 * minimum_detectable_effect(diff[head].se):.1f}" for head in HEADS)
    lines += ["", "Difference paired over the same tiles and resampled slides; smallest difference this "
              f"probe detects (80 % power, 5 % two-sided): {detectable} points."]
    curve = learning_curve(results["summary"]["metrics"])
    if curve:
        lines += ["", "Learning curve, the teacher's kNN (k=20) balanced accuracy on held-out slides during "
                  f"training ({CURVE_TILES} tiles of each split): "
                  + ", ".join(f"iteration {it}: {100 * v:.1f}" for it, v in curve)]
    slides = results["trained"]["slides"]
    lines += ["", f"Slide task (lesion present or not), not a headline: {slides['sizes']['test']} test "
              "slides per fold cannot rank two backbones (an AUROC over so few slides moves by tens of "
              "points from fold to fold; benchmarks/RESULTS.md). Attention-MIL and mean-pool logistic "
              f"regression (%), mean (min–max) over {FOLDS} cross-validation folds by patient, stratified "
              "by label.", "",
              "| backbone | MIL AUROC | MIL balanced acc. | mean-pool AUROC |", "|---|---|---|---|"]
    for name in BACKBONES:
        slides = results[name]["slides"]
        lines.append(f"| {name} | {_fold_range(slides, 'abmil', 'auroc')} | "
                     f"{_fold_range(slides, 'abmil', 'balanced_accuracy')} | "
                     f"{_fold_range(slides, 'mean_pool', 'auroc')} |")
    return "\n".join(lines) + "\n"

