"""`dinov2-patho curate ACTION ...`: one action per stage of the curation pipeline.

Each action is a function of its own module (`tissue_tiles`, `embed_tiles`, `import_features`,
`export_features`, `build_tree`, `write_tree`, `balanced_subset`), callable from Python; this module only
parses the flags and calls it. The action modules (and torch, faiss, the slide readers) are imported
once the action runs, so building this parser (and `--help`) stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from dinov2_patho.curation.sampling import STRATEGIES
from dinov2_patho.data.folders import BACKBONE_HELP, EMBEDDINGS_HELP, TILES_HELP
from dinov2_patho.data.slides import SLIDES_HELP


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config-file` and trailing `key.path=value` overrides, for every curate action."""
    parser.add_argument("--config-file", help="curation config over the defaults (configs/curation/: "
                                              "t1.yaml, t2.yaml, cpu_smoke.yaml are shipped)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. kmeans.seed=1 tiles.min_tissue_fraction=0.6")


def _no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_tiles_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slides", required=True, help=SLIDES_HELP)
    parser.add_argument("--out", required=True, type=Path, help="TILES_DIR: tiles.csv, index/, slides.csv")
    parser.add_argument("--workers", type=int, help="processes over slides (default tiles.workers)")
    _no_progress(parser)
    add_config_arguments(parser)


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiles", required=True, type=Path, help=TILES_HELP)
    parser.add_argument("--slides", help=f"{SLIDES_HELP} (default: the one `curate tiles` read)")
    parser.add_argument("--out", required=True, type=Path, help="EMB_DIR: embeddings.npy, slides.csv, "
                                                                "manifest.json")
    parser.add_argument("--backbone", help=BACKBONE_HELP)
    parser.add_argument("--arch", default="vit_small", help="our backbone name, timm/<model name>, "
                                                            "local-dir:PATH or hf-hub:ORG/NAME (offline)")
    _no_progress(parser)
    add_config_arguments(parser)


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, type=Path,
                        help="folder of <slide_id>.h5 (trident/CLAM: features [N, D], coords [N, 2])")
    parser.add_argument("--out", required=True, type=Path, help="EMB_DIR: embeddings.npy, slides.csv, "
                                                                "manifest.json, tiles.csv, index/")
    _no_progress(parser)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, type=Path,
                        help=f"{EMBEDDINGS_HELP} (of `curate embed` or `curate import`)")
    parser.add_argument("--out", required=True, type=Path, help="folder for one <slide_id>.h5 per slide")
    parser.add_argument("--tiles", type=Path, help=f"the tiles the embeddings were made from, {TILES_HELP} "
                                                   "(default: EMB_DIR/index, from `curate import`)")
    _no_progress(parser)


def add_kmeans_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, help=f"{EMBEDDINGS_HELP}, or an (N, D) .npy")
    parser.add_argument("--out", required=True, help="tree directory (resumed when it holds finished levels)")
    parser.add_argument("--tiles", help=f"the tiles the embeddings were made from, {TILES_HELP} "
                                        "(row counts must match)")
    _no_progress(parser)
    add_config_arguments(parser)


def add_write_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiles", required=True, help=f"{TILES_HELP} (its rows are the tree's points)")
    parser.add_argument("--tree", required=True, help="cluster tree directory (from `curate kmeans`)")
    parser.add_argument("--out", required=True, help="output directory: clusters.csv and index/")
    _no_progress(parser)


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tree", required=True, help="cluster tree directory (from `curate kmeans`)")
    parser.add_argument("--target", required=True, type=int, help="tiles in the subset")
    parser.add_argument("--out", required=True, help="subset .npy of sorted int64 tile row ids (a JSON "
                                                     "summary is written beside it)")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="tiles within a level-1 cluster: random, or closest to its centroid "
                             "(default: sample.strategy)")
    parser.add_argument("--seed", type=int, help="random seed (default: sample.seed)")
    _no_progress(parser)
    add_config_arguments(parser)


def config_from_args(args: argparse.Namespace, *extra: str):
    """The curation config of `--config-file` and the overrides (then `extra` ones), every section checked."""
    from dinov2_patho.curation.config import load_curation_config

    return load_curation_config(args.config_file, [*args.overrides, *extra])


def _action(module: str, name: str) -> Callable:
    return getattr(importlib.import_module(f"dinov2_patho.curation.{module}"), name)


def run_tiles(args: argparse.Namespace) -> None:
    workers = () if args.workers is None else (f"tiles.workers={args.workers}",)  # checked with the rest
    _action("tissue", "tissue_tiles")(args.slides, args.out, config=config_from_args(args, *workers).tiles,
                                      progress=not args.no_progress)


def run_embed(args: argparse.Namespace) -> None:
    _action("embed", "embed_tiles")(args.tiles, args.out, slides=args.slides, backbone=args.backbone,
                                    arch=args.arch, config=config_from_args(args).embed,
                                    progress=not args.no_progress)


def run_import(args: argparse.Namespace) -> None:
    _action("import_features", "import_features")(args.features, args.out, progress=not args.no_progress)


def run_export(args: argparse.Namespace) -> None:
    _action("export_features", "export_features")(args.embeddings, args.out, tiles=args.tiles,
                                                  progress=not args.no_progress)


def run_kmeans(args: argparse.Namespace) -> None:
    _action("hierarchy", "build_tree")(args.embeddings, args.out, tiles=args.tiles,
                                       config=config_from_args(args).kmeans, progress=not args.no_progress)


def run_write(args: argparse.Namespace) -> None:
    _action("write", "write_tree")(args.tiles, args.tree, args.out, progress=not args.no_progress)


def run_sample(args: argparse.Namespace) -> None:
    _action("sampling", "balanced_subset")(args.tree, args.target, args.out, strategy=args.strategy,
                                           seed=args.seed, config=config_from_args(args).sample,
                                           progress=not args.no_progress)


# action -> (add its arguments, run it, one-line help)
ACTIONS: dict[str, tuple[Callable, Callable, str]] = {
    "tiles": (add_tiles_arguments, run_tiles,
              "tissue detection: slides -> tile list slide_id,tile_x,tile_y"),
    "embed": (add_embed_arguments, run_embed,
              "frozen-backbone embeddings of every tile -> (N, D) float16"),
    "import": (add_import_arguments, run_import, "trident/CLAM feature files (<slide_id>.h5) -> "
                                                 "embeddings and tile list, as `curate embed` writes"),
    "export": (add_export_arguments, run_export, "embeddings -> one trident-style <slide_id>.h5 per "
                                                 "slide (features, coords)"),
    "kmeans": (add_kmeans_arguments, run_kmeans,
               "hierarchical k-means with resampling over the embeddings"),
    "write": (add_write_arguments, run_write, "the cluster tree as a clustering CSV and a tile index"),
    "sample": (add_sample_arguments, run_sample,
               "hierarchical balanced subset of the tree -> row ids .npy"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (add, _, help_text) in ACTIONS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    ACTIONS[args.action][1](args)
    return 0
