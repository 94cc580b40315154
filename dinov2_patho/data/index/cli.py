"""`dinov2-patho index build --csv CSV --out DIR [--dedupe]` and `dinov2-patho index info DIR [--json]`."""

from __future__ import annotations

import argparse
import json

from dinov2_patho.data.index.tile_index import TileIndex, build_index
from dinov2_patho.logging import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="ingest a clustering CSV (or parquet) into a tile index")
    build.add_argument(
        "--csv", required=True, help="slide_id,tile_x,tile_y,level_1..level_k (.csv or .parquet)"
    )
    build.add_argument("--out", required=True, help="index directory to create (replaced atomically)")
    build.add_argument(
        "--dedupe",
        action="store_true",
        help="drop repeated (slide_id, tile_x, tile_y) rows instead of failing",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    info = sub.add_parser("info", help="rows, slides, clusters per level, cluster sizes")
    info.add_argument("dir", help="index directory")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")


def format_summary(s: dict) -> str:
    lines = [
        f"index      {s['path']}",
        f"source     {s['source']}",
        f"rows       {s['rows']:,}"
        + (f" ({s['duplicates_dropped']:,} duplicates dropped)" if s["duplicates_dropped"] else ""),
        f"slides     {s['slides']:,} ("
        + (
            "rows grouped by slide: slide ranges stored"
            if s["grouped_by_slide"]
            else "rows not grouped by slide: a slide id stored per row"
        )
        + ")",
        f"coords     {s['coords']}",
    ]
    if s["bytes_on_disk"] is not None:
        lines.append(f"disk       {s['bytes_on_disk']:,} bytes ({s['bytes_per_row']:.2f} bytes/row)")
    lines.append("level      clusters   dtype  size min / median / mean / max")
    for lv in s["levels"]:
        lines.append(
            f"{lv['name']:<10} {lv['clusters']:>9,}  {lv['dtype']:<5}  {lv['size_min']:,} / "
            f"{lv['size_median']:g} / {lv['size_mean']:.1f} / {lv['size_max']:,}"
        )
        if lv["nesting"]:
            lines.append(f"  warning: {lv['nesting']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    if args.action == "build":
        index = build_index(args.csv, args.out, dedupe=args.dedupe, progress=not args.no_progress)
    else:
        index = TileIndex.open(args.dir)
    summary = index.summary()
    print(json.dumps(summary, indent=1) if getattr(args, "json", False) else format_summary(summary))
    return 0
