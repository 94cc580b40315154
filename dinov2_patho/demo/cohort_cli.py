"""`dinov2-patho cohort`: the flags of `demo.cohort.make_cohort`, parsed."""

from __future__ import annotations

import argparse

from dinov2_patho.demo.cohort import ALL_TISSUE_TYPES, RARE_TISSUE, make_cohort


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (created; must be empty or absent)")
    parser.add_argument("--num-slides", type=int, default=8, help="slides in the cohort (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layouts and stains (default 0)")
    parser.add_argument("--grid", type=int, nargs=2, default=(10, 10), metavar=("ROWS", "COLS"),
                        help="slide size in 224-px tiles")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--tissue-mix", type=float, nargs="+", metavar="SHARE",
                        help=f"tile shares of {', '.join(ALL_TISSUE_TYPES)} (4 or 5 values), e.g. a long "
                             "tail 60 25 10 4 1; default: each slide holds 3-4 types of a rotating palette")
    parser.add_argument("--positive-fraction", type=float, default=0.0,
                        help=f"share of slides given a small {RARE_TISSUE} lesion; writes slide_labels.csv")
    parser.add_argument("--lesion-tiles", type=int, default=4, help="tiles per planted lesion")


def run(args: argparse.Namespace) -> int:
    cohort = make_cohort(args.out, num_slides=args.num_slides, seed=args.seed, grid=tuple(args.grid),
                         overwrite=args.overwrite, tissue_mix=args.tissue_mix,
                         positive_fraction=args.positive_fraction, lesion_tiles=args.lesion_tiles)
    print(f"wrote {len(cohort.slide_ids)} slides to {cohort.slides_dir}; tiles in {cohort.clusters_csv}")
    return 0
