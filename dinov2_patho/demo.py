"""`dinov2-patho demo`: the whole job on the embedded default, on a CPU, in minutes.

Synthetic cohort -> tile index -> cpu_smoke training (batches stratified by tissue
type) -> linear probe of the trained teacher against a randomly initialised backbone on
the cohort's tissue-type labels. Every stage is skipped when its output is already
there, so a second run only re-evaluates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dinov2_patho.config import packaged_config
from dinov2_patho.logging import get_logger, setup_logging

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", metavar="DIR")
    parser.add_argument("--num-slides", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="overrides of configs/train/cpu_smoke.yaml")


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.data.index import TileIndex, build_index
    from dinov2_patho.data.synthetic import make_cohort
    from dinov2_patho.eval.runner import run_benchmarks
    from dinov2_patho.train.backbone import build_student_backbone
    from dinov2_patho.train.config import load_train_config
    from dinov2_patho.train.export import teacher_backbone
    from dinov2_patho.train.trainer import run_training

    out = Path(args.output_dir)
    setup_logging(out)
    cohort_dir, index_dir = out / "cohort", out / "index"
    if (cohort_dir / "labels.csv").is_file():
        log.info("cohort: reusing %s", cohort_dir)
    else:
        make_cohort(cohort_dir, num_slides=args.num_slides, seed=args.seed)
    if index_dir.is_dir():
        index = TileIndex.open(index_dir)
    else:
        index = build_index(cohort_dir / "clusters.csv", index_dir)
    log.info("index: %d tiles over %d slides", len(index), len(index.slide_names))

    cfg = load_train_config(packaged_config("train/cpu_smoke.yaml"), [
        f"data.index={index_dir}", f"data.slides={cohort_dir / 'slides'}", f"train.seed={args.seed}",
        *args.overrides,
    ])
    summary = run_training(cfg, out / "train")

    eval_cfg = {"datasets": {"synthetic": {"root": str(cohort_dir)}}, "heads": {"linear": {"n_runs": 3}}}
    trained = teacher_backbone(summary["checkpoint"])
    torch.manual_seed(args.seed)
    random_init = build_student_backbone(cfg).eval()
    results = {
        name: run_benchmarks(backbone, ["synthetic"], eval_cfg, out / "eval" / name)["synthetic"]
        for name, backbone in (("trained", trained), ("random_init", random_init))
    }
    print(f"\ncpu_smoke: {summary['iteration']} iterations, last losses "
          f"{json.dumps({k: round(v, 4) for k, v in summary['losses'].items()})}")
    print("synthetic tissue-type probe, balanced accuracy on the test slides:")
    for name, res in results.items():
        lin_mean, lin_std = res["linear"]["balanced_accuracy"], res["linear"]["balanced_accuracy_std"]
        print(f"  {name:12s} linear {100 * lin_mean:5.1f} ± {100 * lin_std:.1f}"
              f"  kNN(k=20) {100 * res['knn'][20]['balanced_accuracy']:5.1f}"
              f"  logreg {100 * res['logreg']['balanced_accuracy']:5.1f}")
    print(f"outputs: {out.resolve()}")
    return 0
