"""`dinov2-patho demo`: the flags of `demo.method.run_demo`, parsed; the comparison table written and
printed with where each output is."""

from __future__ import annotations

import argparse
from pathlib import Path

from dinov2_patho.demo.method import (
    COMPARISON_FILE,
    DEMO_GRID,
    DEMO_SLIDES,
    LESION_TILES,
    ROUND_1,
    ROUND_2,
    comparison_table,
    run_demo,
)
from dinov2_patho.io import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", metavar="DIR",
                        help="cohort, curation, both training rounds, evaluations, comparison.md and "
                             "report.html "
                             "(default runs/demo); stages already there are reused")
    parser.add_argument("--num-slides", type=int, default=DEMO_SLIDES,
                        help=f"slides in the synthetic cohort (default {DEMO_SLIDES})")
    parser.add_argument("--grid", type=int, default=DEMO_GRID, metavar="N",
                        help=f"a slide is N x N tiles (default {DEMO_GRID})")
    parser.add_argument("--lesion-tiles", type=int, default=LESION_TILES, metavar="N",
                        help=f"tiles of a positive slide's necrosis lesion (default {LESION_TILES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohort and of training (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="overrides of configs/train/cpu_smoke.yaml (e.g. sampler.level=2)")


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.train.cli import summary_lines

    out = Path(args.output_dir)
    results = run_demo(out, num_slides=args.num_slides, grid=args.grid, lesion_tiles=args.lesion_tiles,
                       seed=args.seed, overrides=args.overrides,
                       progress=not args.no_progress)
    table = comparison_table(results)
    atomic_write_text(out / COMPARISON_FILE, table)
    print("\nround 1, cpu_smoke " + "\n".join(summary_lines(results["round_1"])))
    print("\nround 2, cpu_smoke " + "\n".join(summary_lines(results["summary"])))
    print(f"\n{table}")
    print(f"outputs: {out.resolve()}")
    for what, path in (("curated tree", out / "curation" / "clusters"), ("round 1", out / ROUND_1),
                       ("re-curated", out / "recuration" / "clusters"), ("round 2", out / ROUND_2),
                       ("evaluations", out / "eval"), ("this table", out / COMPARISON_FILE),
                       ("report", results["report"])):
        print(f"  {what + ':':14s}{path}")
    return 0
