"""Tiles/s of `curate embed` against raw tile reading plus a bare forward pass of the same model.

On a synthetic cohort (`make_cohort`) tiled by `curate tiles`. The reference builds the model,
reads every tile of the list with `SlideTileSource.read` in batches, normalises and calls
`forward_features`, nothing else; `curate embed` does the same work through the feature engine
(index lookups, DataLoader, resumable progress, float16 memmap writes, manifest). Both run in
this process on one thread (`embed.num_workers=0`), timed in process CPU time (tiles per
core-second), so other jobs on a shared machine move neither; rounds alternate, the best of each
is reported. Target: ratio >= 0.9.

    .venv/bin/python benchmarks/curate_embed.py [--quick] [--arch vit_small] [--patch-size 32]
    .venv/bin/python benchmarks/curate_embed.py --arch timm/vit_tiny_patch16_224 \
        --model '{"embed_dim": 32, "depth": 1, "num_heads": 2}'    # reading-bound
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dinov2_patho.backbones.load import load_backbone
from dinov2_patho.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD
from dinov2_patho.curation.embed import EmbedConfig, embed_tiles
from dinov2_patho.curation.tissue import TilesConfig, tissue_tiles
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.readers import SlideTileSource
from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.demo.cohort import make_cohort

TARGET = 0.9


def reference(tiles_dir: Path, slides: Path, arch: str, model_kwargs: dict, batch_size: int) -> None:
    """Build the model, read every tile, forward it: the least any embedding tool must do."""
    model = load_backbone(None, arch, seed=0, **model_kwargs)
    index = TileIndex.open(tiles_dir / "index")
    names = [index.slide_names[s] for s in index.slides(TileIndex.ALL)]  # a demo-sized tile list
    xs, ys = index.coords(TileIndex.ALL)
    source = SlideTileSource(SlideRegistry.from_spec(slides))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        for start in range(0, len(index), batch_size):
            rows = range(start, min(start + batch_size, len(index)))
            tiles = np.stack([source.read(names[i], int(xs[i]), int(ys[i])) for i in rows])
            x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous().float() - mean) / std
            model.forward_features(x)


def ours(tiles_dir: Path, out: Path, arch: str, model_kwargs: dict, batch_size: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    config = EmbedConfig(batch_size=batch_size, num_workers=0, device="cpu", model=dict(model_kwargs))
    embed_tiles(tiles_dir, out, arch=arch, config=config, progress=False)


def cpu_seconds(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 slides, 2 rounds (a smoke run)")
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--patch-size", type=int, default=32,
                    help="of our ViT (fewer tokens: reading weighs more)")
    ap.add_argument("--model", default=None, metavar="JSON",
                    help="model kwargs instead of --patch-size (see the usage above: a near-free forward, "
                         "reading-bound as on a GPU)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    slides_n, rounds = (3, 2) if args.quick else (8, args.rounds)
    model_kwargs = json.loads(args.model) if args.model else {"patch_size": args.patch_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cohort = make_cohort(tmp / "cohort", num_slides=slides_n, seed=0)
        tiles_dir = tmp / "tiles"
        tissue_tiles(cohort.slides_dir, tiles_dir, config=TilesConfig(workers=1), progress=False)
        n = len(TileIndex.open(tiles_dir / "index"))
        ref_t, our_t = [], []
        for _ in range(rounds):
            ref_t.append(cpu_seconds(lambda: reference(tiles_dir, cohort.slides_dir, args.arch, model_kwargs,
                                                       args.batch_size)))
            our_t.append(cpu_seconds(lambda: ours(tiles_dir, tmp / "emb", args.arch, model_kwargs,
                                                  args.batch_size)))
            print(f"round: reference {n / ref_t[-1]:.1f} tiles/s, curate embed {n / our_t[-1]:.1f} tiles/s",
                  flush=True)
        ref, our = n / min(ref_t), n / min(our_t)
        ratio = our / ref
        print(f"{n} tiles, {args.arch} {model_kwargs}, batch {args.batch_size}, 1 thread, CPU time, best of "
              f"{rounds}: reference (read + forward) {ref:.1f} tiles/s, curate embed {our:.1f} tiles/s, "
              f"ratio {ratio:.3f} (target >= {TARGET})")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
