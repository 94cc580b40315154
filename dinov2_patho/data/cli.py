"""`dinov2-patho tiles extract|preview`: the flags of `tilestore.extract_tile_store` and
`mosaic.preview_tiles`, parsed; both are imported once the action runs."""

from __future__ import annotations

import argparse

from dinov2_patho.data.readers import BACKENDS
from dinov2_patho.data.slides import SLIDES_HELP

PREVIEW_BY = ("random", "slide", "cluster")  # mosaic.PREVIEW_BY, without importing PIL for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    ext = sub.add_parser("extract", help="write the index's tiles into per-slide HDF5 files (resumable)")
    ext.add_argument("--index", required=True, help="tile index directory (`dinov2-patho index build`)")
    ext.add_argument("--slides", required=True, help=SLIDES_HELP)
    ext.add_argument("--out", required=True, help="tile store directory")
    ext.add_argument("--backend", default="openslide", choices=BACKENDS, help="whole-slide reader")
    ext.add_argument("--fallback", default="tiffslide", choices=(*BACKENDS, "none"),
                     help="reader tried when --backend cannot open a slide")
    ext.add_argument("--mpp-override", type=float, default=None, help="um/px for every slide")
    ext.add_argument("--slide-id", action="append", default=None, help="only this slide (repeatable)")
    ext.add_argument("--workers", type=int, default=1, help="processes, one slide each at a time")
    ext.add_argument("--overwrite", action="store_true", help="rewrite slides whose files exist")
    ext.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre = sub.add_parser("preview", help="an image grid of tiles, one row per slide, cluster or random draw, "
                         "read as training reads them (112 um at level 0, resized)")
    pre.add_argument("--index", required=True, help="tile index directory (`dinov2-patho index build`)")
    pre.add_argument("--slides", help=SLIDES_HELP)
    pre.add_argument("--tile-store", help="read from this tile store (`tiles extract`) instead of the slides")
    pre.add_argument("--out", required=True, help="image file to write, in the format its suffix says "
                                                  "(.png, .jpg, .webp, ...)")
    pre.add_argument("--by", default="random", choices=PREVIEW_BY,
                     help="one row per slide, per cluster of --level, or of random rows (default)")
    pre.add_argument("--rows", type=int, default=8, help="rows of the grid (slides, clusters or draws)")
    pre.add_argument("--cols", type=int, default=8, help="tiles per row")
    pre.add_argument("--level", default=None,
                     help="--by cluster: tree level, 1..K or level_K (default: the coarsest)")
    pre.add_argument("--cluster", action="append", default=None,
                     help="--by cluster: this cluster id, as in the CSV (repeatable; default: the largest)")
    pre.add_argument("--slide-id", action="append", default=None,
                     help="--by slide: this slide (repeatable; default: --rows random slides)")
    pre.add_argument("--tile-px", type=int, default=112, help="side of each tile in the grid, px")
    pre.add_argument("--seed", type=int, default=0, help="seed of the random choices")
    pre.add_argument("--backend", default="openslide", choices=BACKENDS, help="whole-slide reader")
    pre.add_argument("--fallback", default="tiffslide", choices=(*BACKENDS, "none"),
                     help="reader tried when --backend cannot open a slide")
    pre.add_argument("--mpp-override", type=float, default=None, help="um/px for every slide")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    fallback = None if args.fallback == "none" else args.fallback
    if args.action == "preview":
        from dinov2_patho.data.mosaic import preview_tiles

        preview_tiles(args.index, args.out, slides=args.slides, tile_store=args.tile_store, by=args.by,
                      rows=args.rows, cols=args.cols, level=args.level, clusters=args.cluster,
                      slide_ids=args.slide_id, tile_px=args.tile_px, seed=args.seed, backend=args.backend,
                      fallback=fallback, mpp_override=args.mpp_override, progress=not args.no_progress)
        return 0
    from dinov2_patho.data.tilestore import extract_tile_store

    extract_tile_store(args.index, args.slides, args.out, backend=args.backend, fallback=fallback,
                       mpp_override=args.mpp_override, slide_ids=args.slide_id, workers=args.workers,
                       overwrite=args.overwrite, progress=not args.no_progress)
    return 0
