"""`dinov2-patho curate ACTION ...`: one action per stage of the curation pipeline.

Each action lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
Those modules import torch, faiss and the slide readers inside functions, so building this
parser (and `--help`) stays fast.
"""

from __future__ import annotations

import argparse
import importlib

# action -> (module, one-line help)
ACTIONS: dict[str, tuple[str, str]] = {
    "tiles": ("dinov2_patho.curation.tissue", "tissue detection: slides -> tile list slide_id,tile_x,tile_y"),
    "embed": ("dinov2_patho.curation.embed", "frozen-backbone embeddings of every tile -> (N, D) float16"),
    "import": ("dinov2_patho.curation.import_features", "trident/CLAM feature files (<slide_id>.h5) -> "
                                                        "embeddings and tile list, as `curate embed` writes"),
    "export": ("dinov2_patho.curation.export_features", "embeddings -> one trident-style <slide_id>.h5 per "
                                                        "slide (features, coords)"),
    "kmeans": ("dinov2_patho.curation.hierarchy", "hierarchical k-means with resampling over the embeddings"),
    "write": ("dinov2_patho.curation.write", "the cluster tree as a clustering CSV and a tile index"),
    "sample": ("dinov2_patho.curation.sampling", "hierarchical balanced subset of the tree -> row ids .npy"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (module, help_text) in ACTIONS.items():
        action_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(action_parser)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(ACTIONS[args.action][0]).run(args) or 0)
