"""`dinov2-patho report RUN_DIR --out report.html`: the run report as one self-contained HTML file.

    dinov2-patho report runs/t1_bs --out runs/t1_bs/report.html          # index, slides from config.yaml
    dinov2-patho report runs/t1_bs --embeddings emb/ --metadata meta.csv --level 3 --out report.html
"""

from __future__ import annotations

import argparse

from dinov2_patho.data.folders import EMBEDDINGS_HELP
from dinov2_patho.data.slides import SLIDES_HELP
from dinov2_patho.errors import UserError
from dinov2_patho.report.build import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="training output directory (metrics.jsonl, config.yaml)")
    parser.add_argument("--out", required=True, help="HTML file to write")
    parser.add_argument("--index", help="tile index directory (default: the run's data.index)")
    parser.add_argument("--slides", help=f"{SLIDES_HELP} (default: the run's data section)")
    parser.add_argument("--embeddings", help=f"{EMBEDDINGS_HELP}, or an (N, D) .npy, aligned with the "
                                             "index rows")
    parser.add_argument("--level", help="tree level for batches, mosaics (1..K or level_K; default: the "
                        "sampler's level, else the coarsest)")
    parser.add_argument("--metadata", help="slide_id,... CSV whose columns colour the map (default: the "
                        "sampler's metadata_csv)")
    parser.add_argument("--eval-dir", action="append", default=[], help="another directory searched for "
                        "`eval run` and `eval slide` results (repeatable; RUN_DIR is always searched)")
    parser.add_argument("--map-points", type=int, default=800, help="tiles on the embedding map")
    parser.add_argument("--mosaic-clusters", type=int, default=6, help="largest and smallest clusters shown")
    parser.add_argument("--tiles-per-cluster", type=int, default=10, help="tiles per mosaic row")
    parser.add_argument("--batch-steps", type=int, default=200, help="batches replayed per sampler")
    parser.add_argument("--seed", type=int, default=0, help="seed of the map's sample and the mosaics' tiles")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if min(args.map_points, args.tiles_per_cluster) < 1 or min(args.mosaic_clusters, args.batch_steps) < 0:
        raise UserError(f"--map-points and --tiles-per-cluster must be >= 1, --mosaic-clusters and "
                        f"--batch-steps >= 0 (0: none), got {args.map_points}, {args.tiles_per_cluster}, "
                        f"{args.mosaic_clusters}, {args.batch_steps}")
    out = write_report(args.run_dir, args.out, index=args.index, slides=args.slides,
                       embeddings=args.embeddings, level=args.level, metadata=args.metadata,
                       eval_dirs=args.eval_dir,
                       map_points=args.map_points, mosaic_clusters=args.mosaic_clusters,
                       tiles_per_cluster=args.tiles_per_cluster, batch_steps=args.batch_steps, seed=args.seed,
                       progress=not args.no_progress)
    print(f"report: {out.resolve()} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0
