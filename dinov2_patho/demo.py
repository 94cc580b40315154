"""`dinov2-patho demo`: the paper's method end to end on the embedded default, on a CPU, in minutes.

A long-tailed synthetic cohort (tissue types planted at about 60/25/11/4 %, plus rare necrosis
lesions on half the slides, which make those slides positive) -> curation with no planted tree:
`curate tiles` -> `curate embed` (a frozen random-init ViT-Ti) -> `curate kmeans` -> `curate write`
-> cpu_smoke training with batches stratified over the curated tree's top level -> re-curation of
the same tiles with the trained teacher -> evaluation of the teacher against its random
initialisation: tile-level tissue-type probe (4-fold cross-validation by slide; common and rare
types apart) and the slide task (attention-MIL, lesion present or not) -> `report.html`.

The planted tissue types are never used for curation or training, only to score: the trees'
agreement with them (adjusted Rand index, NMI per level) and the probes. Every stage is skipped
when its output is already there, so a second run only re-evaluates.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dinov2_patho.config_files import packaged_config
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_write_text
from dinov2_patho.logging import get_logger, setup_logging

log = get_logger(__name__)

# tumour, stroma, adipose, mucus; necrosis (0 here) appears only in the planted lesions
TISSUE_MIX = (0.60, 0.25, 0.11, 0.04, 0.0)
POSITIVE_FRACTION = 0.5
# The curation embedding: a real ViT at random init (no weights can be downloaded). Its patch-token
# mean, as a random-init CLS token is near constant. The teacher trained on its tree re-curates.
EMBED_ARCH = "timm/vit_tiny_patch16_224"
EMBED_OVERRIDES = ("embed.token=patch_mean",)
SAMPLER_LEVEL = 3  # the top of the cpu_smoke tree (4 clusters): 4 tiles per cluster in a batch of 16
FOLDS = 4
RARE_SHARE = 0.05  # tile-probe classes under this share of the tiles are reported as rare
HEADS = ("linear", "knn", "logreg")
BACKBONES = ("trained", "random_init")
COMPARISON_FILE = "comparison.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", metavar="DIR",
                        help="cohort, curation, training run, evaluations, comparison.md and report.html "
                             "(default runs/demo); stages already there are reused")
    parser.add_argument("--num-slides", type=int, default=16,
                        help="slides in the synthetic cohort (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohort and of training (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="overrides of configs/train/cpu_smoke.yaml (e.g. sampler.level=2)")


def probe_scores(result: dict) -> dict[str, float]:
    """Test balanced accuracy per head of one tile benchmark result (kNN at k=20)."""
    return {"linear": result["linear"]["balanced_accuracy"],
            "knn": result["knn"][20]["balanced_accuracy"],
            "logreg": result["logreg"]["balanced_accuracy"]}


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


def make_demo_cohort(out: Path, num_slides: int, seed: int):
    from dinov2_patho.data.synthetic import Cohort, make_cohort

    if (out / "slide_labels.csv").is_file():
        log.info("cohort: reusing %s", out)
        return Cohort.at(out)
    return make_cohort(out, num_slides=num_slides, seed=seed, tissue_mix=TISSUE_MIX,
                       positive_fraction=POSITIVE_FRACTION)


def curate_cohort(cohort, out: Path, *, progress: bool = True, backbone: Path | None = None,
                  tiles: Path | None = None):
    """The cohort's slides curated into `out` with the cpu_smoke tree (see curation.pipeline.curate)."""
    from dinov2_patho.curation.pipeline import curate

    return curate(cohort.slides_dir, out, config_file=packaged_config("curation/cpu_smoke.yaml"),
                  backbone=backbone, arch=EMBED_ARCH, overrides=() if backbone else EMBED_OVERRIDES,
                  tiles=tiles, progress=progress)


def train_config(index: Path, slides: Path, seed: int, overrides: list[str] | tuple[str, ...] = ()):
    """cpu_smoke on the curated index, stratified over its top level, then the user's overrides."""
    from dinov2_patho.train.config import load_train_config

    return load_train_config(packaged_config("train/cpu_smoke.yaml"), [
        f"data.index={index}", f"data.slides={slides}", f"train.seed={seed}",
        f"sampler.level={SAMPLER_LEVEL}", *overrides])


def evaluate(backbones: dict, cohort, crop_size: int, out: Path, progress: bool = True) -> dict:
    """Tile probe (CV by slide) and slide task (attention-MIL) of each backbone, results under `out`."""
    from dinov2_patho.eval.runner import run_benchmarks
    from dinov2_patho.eval.slide.runner import run_slide_tasks

    tile_cfg = {"datasets": {"synthetic": {"root": str(cohort.root)}}, "heads": {"linear": {"n_runs": 3}},
                "preprocess": {"size": crop_size}, "cross_validation": {"folds": FOLDS}, "progress": progress}
    slide_cfg = {"datasets": {"synthetic": {"root": str(cohort.root)}}, "heads": {"abmil": {"n_runs": 3}},
                 "cross_validation": {"folds": FOLDS}, "progress": progress}
    results = {}
    for name, backbone in backbones.items():
        tiles = run_benchmarks(backbone, ["synthetic"], tile_cfg, out / name)["synthetic"]
        slides = run_slide_tasks(backbone, ["synthetic"], slide_cfg, out / name / "slide", name)["synthetic"]
        results[name] = {"tiles": tiles, "slides": slides}
    return results


def run_demo(output_dir: str | Path, *, num_slides: int = 16, seed: int = 0,
             overrides: list[str] | tuple[str, ...] = (), progress: bool = True, report: bool = True) -> dict:
    """Run the whole method in `output_dir`. Returns {"summary": the training summary, "agreement":
    {embedding: tree_agreement rows}, "groups": common/rare classes, "trained" / "random_init":
    {"tiles": tile benchmark result, "slides": slide task result}, "report": its path or None}."""
    from dinov2_patho.curation.pipeline import Curation, tree_agreement
    from dinov2_patho.data.synthetic import Cohort
    from dinov2_patho.train.export import teacher_backbone
    from dinov2_patho.train.student import build_student_backbone
    from dinov2_patho.train.trainer import run_training

    out = Path(output_dir)
    setup_logging(out)
    # the training config is checked (a misspelt override) before the slow stages make its paths
    cfg = train_config(Curation(out / "curation").index, Cohort.at(out / "cohort").slides_dir, seed,
                       overrides)
    if num_slides < FOLDS:  # else the evaluations stop only after curation and training
        raise UserError(f"--num-slides {num_slides}: the demo's {FOLDS}-fold cross-validation by slide needs "
                        f"at least {FOLDS} slides")
    cohort = make_demo_cohort(out / "cohort", num_slides, seed)
    curation = curate_cohort(cohort, out / "curation", progress=progress)
    summary = run_training(cfg, out / "train", progress=progress)
    recuration = curate_cohort(cohort, out / "recuration", progress=progress, backbone=out / "train",
                               tiles=curation.tiles)
    agreement = {"random-init ViT-Ti": tree_agreement(curation.index, cohort.labels_csv),
                 "trained teacher": tree_agreement(recuration.index, cohort.labels_csv)}

    torch.manual_seed(seed)
    backbones = {"trained": teacher_backbone(summary["checkpoint"]),
                 "random_init": build_student_backbone(cfg).eval()}
    results = {"summary": summary, "agreement": agreement, "groups": class_groups(cohort.labels_csv),
               **evaluate(backbones, cohort, cfg.crops.global_crops_size, out / "eval", progress),
               "report": None}
    if report:
        from dinov2_patho.report import write_report

        results["report"] = write_report(out / "train", out / "report.html", index=curation.index,
                                         slides=cohort.slides_dir, embeddings=recuration.embeddings,
                                         eval_dirs=[out / "eval"], metadata=cohort.metadata_csv,
                                         progress=progress)
    return results


def comparison_table(results: dict) -> str:
    """What the demo measured, as markdown: tree agreement, tile probe, slide task."""
    from dinov2_patho.eval.report import format_score

    groups = results["groups"]
    lines = ["Curated trees against the planted tissue types (never used to curate or train):", "",
             "| embedding | level | clusters | ARI | NMI |", "|---|---|---|---|---|"]
    for name, rows in results["agreement"].items():
        lines += [f"| {name} | {r['level']} | {r['clusters']} | {r['ari']:.2f} | {r['nmi']:.2f} |"
                  for r in rows]
    lines += ["", f"Tile-level tissue-type probe: balanced accuracy (%) on held-out slides, mean over "
              f"{FOLDS} cross-validation folds by slide (linear: ± its spread over the folds); linear-probe "
              f"recall of the common ({', '.join(groups['common'])}) and rare ({', '.join(groups['rare'])}) "
              "types.", "",
              "| backbone | linear | kNN (k=20) | logreg | common | rare |", "|---|---|---|---|---|---|"]
    for name in BACKBONES:
        tiles = results[name]["tiles"]
        score = probe_scores(tiles)
        spread = 100 * tiles["linear"]["balanced_accuracy_std"]
        lines.append(f"| {name} | {100 * score['linear']:.1f} ± {spread:.1f} | {100 * score['knn']:.1f} | "
                     f"{100 * score['logreg']:.1f} | "
                     f"{100 * group_recall(tiles, groups['common']):.1f} | "
                     f"{100 * group_recall(tiles, groups['rare']):.1f} |")
    lines += ["", f"Slide task (lesion present or not): attention-MIL and mean-pool logistic regression (%), "
              f"mean over {FOLDS} cross-validation folds by patient.", "",
              "| backbone | MIL AUROC | MIL balanced acc. | mean-pool AUROC |", "|---|---|---|---|"]
    for name in BACKBONES:
        slides = results[name]["slides"]
        lines.append(f"| {name} | {format_score(slides['abmil']['auroc'], 'auroc', 1)} | "
                     f"{100 * slides['abmil']['balanced_accuracy']:.1f} | "
                     f"{format_score(slides['mean_pool']['auroc'], 'auroc', 1)} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.train.cli import summary_lines

    out = Path(args.output_dir)
    results = run_demo(out, num_slides=args.num_slides, seed=args.seed, overrides=args.overrides,
                       progress=not args.no_progress)
    table = comparison_table(results)
    atomic_write_text(out / COMPARISON_FILE, table)
    print("\ncpu_smoke " + "\n".join(summary_lines(results["summary"])))
    print(f"\n{table}")
    print(f"outputs: {out.resolve()}")
    for what, path in (("curated tree", out / "curation" / "clusters"), ("training run", out / "train"),
                       ("evaluations", out / "eval"), ("this table", out / COMPARISON_FILE),
                       ("report", results["report"])):
        print(f"  {what + ':':14s}{path}")
    return 0
