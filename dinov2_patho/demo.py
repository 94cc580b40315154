"""`dinov2-patho demo`: the whole job on the embedded default, on a CPU, in minutes.

Synthetic cohort -> tile index -> cpu_smoke training (batches stratified by tissue
type) -> linear probe, kNN and logistic regression of the trained teacher against its
random initialisation on the cohort's tissue-type labels, cross-validated by slide. Tiles
are probed at the global-crop size, the magnification the model was trained at. Every
stage is skipped when its output is already there, so a second run only re-evaluates.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dinov2_patho.config import packaged_config
from dinov2_patho.io import atomic_write_text
from dinov2_patho.logging import get_logger, setup_logging

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", metavar="DIR",
                        help="cohort, index, training run, evaluations and comparison.md (default "
                             "runs/demo); stages already there are reused")
    parser.add_argument("--num-slides", type=int, default=16,
                        help="slides in the synthetic cohort (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohort and of training (default 0)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="overrides of configs/train/cpu_smoke.yaml")


HEADS = ("linear", "knn", "logreg")
FOLDS = 4


def probe_scores(result: dict) -> dict[str, float]:
    """Test balanced accuracy per head of one benchmark result (kNN at k=20)."""
    return {"linear": result["linear"]["balanced_accuracy"],
            "knn": result["knn"][20]["balanced_accuracy"],
            "logreg": result["logreg"]["balanced_accuracy"]}


def run_demo(output_dir: str | Path, *, num_slides: int = 16, seed: int = 0,
             overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Run the whole job in `output_dir`; returns {"summary": the training summary,
    "trained" / "random_init": the synthetic benchmark's results for each backbone}."""
    from dinov2_patho.data.index import TileIndex, build_index
    from dinov2_patho.data.synthetic import make_cohort
    from dinov2_patho.eval.runner import run_benchmarks
    from dinov2_patho.train.backbone import build_student_backbone
    from dinov2_patho.train.config import load_train_config
    from dinov2_patho.train.export import teacher_backbone
    from dinov2_patho.train.trainer import run_training

    out = Path(output_dir)
    setup_logging(out)
    cohort_dir, index_dir = out / "cohort", out / "index"
    if (cohort_dir / "labels.csv").is_file():
        log.info("cohort: reusing %s", cohort_dir)
    else:
        make_cohort(cohort_dir, num_slides=num_slides, seed=seed)
    if index_dir.is_dir():
        index = TileIndex.open(index_dir)
    else:
        index = build_index(cohort_dir / "clusters.csv", index_dir)
    log.info("index: %d tiles over %d slides", len(index), len(index.slide_names))

    cfg = load_train_config(packaged_config("train/cpu_smoke.yaml"), [
        f"data.index={index_dir}", f"data.slides={cohort_dir / 'slides'}", f"train.seed={seed}", *overrides,
    ])
    summary = run_training(cfg, out / "train")

    # 4-fold cross-validation by slide: one fixed split holds 4 test slides, too few to rank two backbones
    eval_cfg = {"datasets": {"synthetic": {"root": str(cohort_dir)}}, "heads": {"linear": {"n_runs": 3}},
                "preprocess": {"size": cfg.crops.global_crops_size}, "cross_validation": {"folds": FOLDS}}
    trained = teacher_backbone(summary["checkpoint"])
    torch.manual_seed(seed)
    random_init = build_student_backbone(cfg).eval()
    results = {"summary": summary}
    for name, backbone in (("trained", trained), ("random_init", random_init)):
        results[name] = run_benchmarks(backbone, ["synthetic"], eval_cfg, out / "eval" / name)["synthetic"]
    return results


COMPARISON_FILE = "comparison.md"


def comparison_table(results: dict) -> str:
    """The trained teacher against its random initialisation, as a markdown table."""
    lines = [f"Synthetic tissue-type probe: balanced accuracy (%) on held-out slides, mean over {FOLDS} "
             f"cross-validation folds by slide (linear: ± its spread over the folds).", "",
             "| backbone | linear | kNN (k=20) | logreg |", "|---|---|---|---|"]
    for name in ("trained", "random_init"):
        score = probe_scores(results[name])
        lines.append(f"| {name} | {100 * score['linear']:.1f} ± "
                     f"{100 * results[name]['linear']['balanced_accuracy_std']:.1f} | "
                     f"{100 * score['knn']:.1f} | {100 * score['logreg']:.1f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.train.cli import summary_lines

    results = run_demo(args.output_dir, num_slides=args.num_slides, seed=args.seed, overrides=args.overrides)
    out = Path(args.output_dir)
    table = comparison_table(results)
    atomic_write_text(out / COMPARISON_FILE, table)
    print("\ncpu_smoke " + "\n".join(summary_lines(results["summary"])))
    print(f"\n{table}")
    print(f"outputs: {out.resolve()} (this table: {out / COMPARISON_FILE})")
    return 0
