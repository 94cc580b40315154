"""`curate embed`: a frozen backbone's features of every tile of a tile list, sharded over ranks.

EMB_DIR holds:

    embeddings.npy   float16 [N, D] (.npy, open with np.load(mmap_mode="r")): row i = row i of the tile list
    slides.csv       slide_id,start_row,end_row (end exclusive), in tile-list order
    manifest.json    backbone (path, weights sha256, arch, token), tile settings, N, D: written last,
                     its presence marks a complete run
    .lock            the pid and host of the run writing here, or that wrote here last (dirlock.py)
    run.json         while running: the same settings, so a resumed run never mixes two backbones
    progress/        while running: rows done per shard (rows_<start>_<stop>.json)
    embeddings.partial.npy  while running: the rows so far, renamed to embeddings.npy once complete,
                     so no reader ever takes an unfinished matrix for embeddings

Rank r of W embeds rows [N r / W, N (r + 1) / W) through the feature engine (backbones/features.py),
writing into its slice of the one preallocated .npy; a killed run resumes each shard at its first
missing row (with the same world size; a different one starts unfinished shards over).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_patho.config_files import NON_NEGATIVE, check_section
from dinov2_patho.data.folders import EMBEDDINGS, SETTINGS, tile_index_dir, tile_settings
from dinov2_patho.data.index import tile_list_fingerprint
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path, atomic_write_text, sha256_file
from dinov2_patho.jsonfile import first_difference, read_json
from dinov2_patho.logging import get_logger

log = get_logger(__name__)

FORMAT_VERSION = 1
SLIDES, MANIFEST = "slides.csv", "manifest.json"
RUN, PROGRESS, PARTIAL = "run.json", "progress", "embeddings.partial.npy"
TOKENS = ("cls", "patch_mean", "cls+patch_mean")  # what of the backbone's output is a tile's row


@dataclass
class EmbedConfig:
    """The `embed` section of the curation config (`curate embed`)."""

    token: str = "cls"                # cls | patch_mean | cls+patch_mean (the paper: raw UNI CLS outputs)
    weights_format: str = "auto"      # as `eval run`: auto | ours | dinov2 | timm
    model: dict[str, Any] = field(default_factory=dict)  # extra kwargs of our backbone or timm's model
    seed: int = 0                     # random-init baseline (no --backbone): every rank builds the same model
    batch_size: int = 128
    size: int | None = None           # tiles resized to size x size px before the backbone (bicubic, as the
                                      # training crops); null: as read (224)
    num_workers: int = 2              # DataLoader workers reading tiles (per rank)
    amp: str = "bf16"                 # autocast on CUDA: bf16 | fp16 | none (CPU runs in float32)
    device: str = "auto"              # auto: cuda:LOCAL_RANK when available, else cpu
    checkpoint_seconds: float = 30    # flush rows + record progress at most this often (a kill loses <= this)

    def __post_init__(self) -> None:
        from dinov2_patho.backbones.features import AMP_DTYPES
        from dinov2_patho.distributed import DEVICES
        from dinov2_patho.models.weights import FORMATS

        check_section("embed", self, numbers={"checkpoint_seconds": NON_NEGATIVE},
                      integers={"seed": 0, "batch_size": 1, "num_workers": 0, "size": 1}, optional=("size",),
                      choices={"token": TOKENS, "weights_format": FORMATS, "amp": tuple(AMP_DTYPES),
                               "device": DEVICES})


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file, or over the files of a training run / checkpoint directory."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{sha256_file(f)}".encode())
    return h.hexdigest()


def shard(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


def check_settings(emb_dir: Path, settings: dict[str, Any]) -> bool:
    """True when EMB_DIR already holds these embeddings; a manifest or run of other settings is an error."""
    for name, what in ((MANIFEST, "embeddings"), (RUN, "an unfinished run")):
        path = emb_dir / name
        if path.is_file():
            recorded = read_json(path, f"{what} record", "delete that directory or use another --out",
                                 shape={"settings": dict}, version=FORMAT_VERSION)["settings"]
            diff = first_difference(recorded, settings)
            if diff is not None:
                raise UserError(f"{path}: {what} of different settings ({diff}); refusing to mix them: "
                                "use another --out or delete that directory")
            if name == MANIFEST:
                return True
    return False


def tile_dataset(index_dir: Path, slides: str, mpp_override: float | None, tiles_cfg: Any,
                 size: int | None = None) -> Any:
    """The tile list's tiles (uint8 [3, 224, 224], or [3, size, size]) and row ids."""
    import functools

    from dinov2_patho.data.augment import resize
    from dinov2_patho.data.dataset import TileDataset, build_tile_source
    from dinov2_patho.data.index import TileIndex

    index = TileIndex.open(index_dir)
    source = build_tile_source({"backend": tiles_cfg.get("backend", "openslide"), "slides": slides,
                                "fallback": tiles_cfg.get("fallback", "tiffslide"),
                                "mpp_override": mpp_override, "cache_size": 4}, mpp_key="tiles.mpp_override")
    return TileDataset(index, source, None if size is None else functools.partial(resize, size=size))


def _settings(backbone_path: str | Path | None, arch: str, cfg: EmbedConfig, tiles: dict[str, Any],
              num_rows: int, dim: int, fingerprint: str, mean: tuple[float, ...],
              std: tuple[float, ...]) -> dict[str, Any]:
    from dinov2_patho.data.readers import TILE_PX, TILE_UM

    backbone = None if backbone_path is None else Path(backbone_path).resolve()
    return {
        "backbone": {"path": None if backbone is None else str(backbone),
                     "weights_sha256": None if backbone is None else weights_sha256(backbone),
                     "arch": arch, "weights_format": cfg.weights_format,
                     "model": dict(cfg.model),
                     "seed": cfg.seed if backbone is None else None, "token": cfg.token},
        "tiles": {"um": TILE_UM, "px": TILE_PX, "size": cfg.size,
                  "mpp_override": tiles.get("mpp_override"),
                  "num_rows": num_rows, "fingerprint": fingerprint,
                  "normalisation": {"mean": list(mean), "std": list(std)}},
        "dim": dim,
    }


def embed_tiles(tiles: str | Path, out: str | Path, *, slides: str | Path | None = None,
                backbone: str | Path | None = None, arch: str = "vit_small",
                config: EmbedConfig | None = None, progress: bool = True) -> Path:
    """`curate embed`: the backbone's features of every tile of `tiles` (a `curate tiles` folder or a tile
    index) into OUT (module docstring), sharded over the ranks under torchrun; resumed, or nothing to do
    when OUT already holds them. `slides`: default the folder `curate tiles` read; `backbone`: a run,
    checkpoint or weights file (None: `arch` at random init, seeded); `config`: None for the defaults.
    Returns OUT's embeddings.npy."""
    import torch

    from dinov2_patho.backbones.features import feature_dim
    from dinov2_patho.backbones.hub import check_token, normalisation
    from dinov2_patho.backbones.load import backbone_label, load_backbone
    from dinov2_patho.backbones.preprocess import normalise_on_device
    from dinov2_patho.data.readers import TILE_PX
    from dinov2_patho.dirlock import exclusive_directory
    from dinov2_patho.distributed import broadcast_object, distributed_context, ranks_agree

    cfg = EmbedConfig() if config is None else config
    backbone = None if backbone is None else str(backbone)
    index_dir, out, tiles_arg = tile_index_dir(tiles), Path(out), tiles
    tiles = tile_settings(index_dir)
    slides = slides or tiles.get("slides")
    if slides is None:
        raise UserError(f"--tiles {tiles_arg}: no {SETTINGS} of `curate tiles` naming the slides; "
                        "pass --slides")
    dataset = tile_dataset(index_dir, str(slides), tiles.get("mpp_override"), tiles, cfg.size)
    index = dataset.index
    n = len(index)
    with distributed_context(cfg.device, "embed.device") as ctx:
        model_kwargs = dict(cfg.model)
        # seeded: a random-init baseline has the same weights on every rank and every run
        model = load_backbone(backbone, arch, cfg.weights_format, seed=int(cfg.seed),
                              **model_kwargs).to(ctx.device)
        check_token(model, cfg.token, "embed.token")
        mean, std = normalisation(model)
        on_device = normalise_on_device(mean, std)
        side = cfg.size or TILE_PX
        dim = feature_dim(model, on_device(torch.zeros(1, 3, side, side, dtype=torch.uint8))[0], cfg.token)
        fingerprint = broadcast_object(tile_list_fingerprint(index_dir) if ctx.is_main else None, ctx)
        settings = _settings(backbone, arch, cfg, tiles, n, dim, fingerprint, mean, std)
        if check_settings(out, settings):
            if (out / RUN).exists() or (out / PROGRESS).exists():  # killed after the manifest, before this
                with exclusive_directory(out, "curate embed", ctx), ranks_agree(ctx):
                    if ctx.is_main:
                        _drop_run_state(out)
            if ctx.is_main:
                print(f"curate embed: {out} already holds these embeddings ({n} x {dim}); nothing to do")
            return out / EMBEDDINGS
        with exclusive_directory(out, "curate embed", ctx):  # one writer: a second run stops
            with ranks_agree(ctx):  # a failure on any rank (a full disk, a worker's error) stops every rank
                if ctx.is_main:
                    _prepare(out, settings, n, dim)
            with ranks_agree(ctx):
                _embed_shard(out, (n, dim), range(*shard(n, ctx.rank, ctx.world_size)), model, dataset,
                             cfg, on_device, progress=progress and ctx.is_main,
                             desc=f"curate embed (rank {ctx.rank}/{ctx.world_size})")
            with ranks_agree(ctx):
                if ctx.is_main:
                    _finish(out, index, settings, ctx.world_size)
            if ctx.is_main:
                print(f"curate embed: {n} tiles x {dim} ({cfg.token}, "
                      f"{backbone_label(backbone, arch, model)}) -> {out / EMBEDDINGS}")
    return out / EMBEDDINGS


def _embed_shard(out: Path, shape: tuple[int, int], rows_range: range, model: Any, dataset: Any,
                 cfg: EmbedConfig, on_device: Any, progress: bool, desc: str) -> None:
    """Rows `rows_range` of the preallocated matrix, resumed at the shard's first missing row."""
    import torch

    from dinov2_patho.backbones.features import fill_features

    (n, dim), start, stop = shape, rows_range.start, rows_range.stop
    if stop <= start:
        return
    full = np.load(out / PARTIAL, mmap_mode="r")
    if full.shape != (n, dim) or full.dtype != np.float16:
        raise UserError(f"{out / PARTIAL}: shape {full.shape} {full.dtype}, expected "
                        f"({n}, {dim}) float16; delete the directory to start over")
    rows = np.memmap(out / PARTIAL, np.float16, "r+", offset=full.offset + start * dim * 2,
                     shape=(stop - start, dim))
    del full
    fill_features(model, torch.utils.data.Subset(dataset, rows_range),
                  {"embeddings": (rows, cfg.token)}, out / PROGRESS / f"rows_{start}_{stop}.json",
                  batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=progress, unit="tile",
                  desc=desc, amp=cfg.amp, on_device=on_device, checkpoint_seconds=cfg.checkpoint_seconds)
    del rows


def _prepare(out: Path, settings: dict[str, Any], n: int, dim: int) -> None:
    """A fresh run: the preallocated (sparse) .npy, then run.json; a resumed one keeps both."""
    if (out / RUN).is_file() and not (out / PARTIAL).exists() and (out / EMBEDDINGS).is_file():
        os.replace(out / EMBEDDINGS, out / PARTIAL)  # killed in _finish after its rename: every shard is done
    if (out / RUN).is_file() and (out / PARTIAL).is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / PROGRESS, ignore_errors=True)
    for stale in (EMBEDDINGS, SLIDES):  # of an older run whose manifest was removed: never mixed in
        (out / stale).unlink(missing_ok=True)
    with atomic_path(out / PARTIAL) as tmp:
        np.lib.format.open_memmap(tmp, "w+", np.float16, (n, dim)).flush()
    (out / PROGRESS).mkdir()
    run_state = {"format_version": FORMAT_VERSION, "settings": settings}
    atomic_write_text(out / RUN, json.dumps(run_state, indent=1))


def _slide_runs(index: Any) -> Iterator[tuple[int, int, int]]:
    """(slide, first row, end row) of each run of rows of one slide, in row order, read a chunk at a time
    (the whole slide column is 1.4 GB at 350M rows)."""
    slide, start = -1, 0
    for chunk in index.chunks():
        s = index.slides(chunk)
        for i in np.flatnonzero(np.r_[s[0] != slide, s[1:] != s[:-1]]).tolist():
            if slide >= 0:
                yield slide, start, chunk.start + i
            slide, start = int(s[i]), chunk.start + i
    if slide >= 0:
        yield slide, start, len(index)


def _finish(out: Path, index: Any, settings: dict[str, Any], world_size: int) -> None:
    """Check every shard is complete, then embeddings.npy, slides.csv, manifest.json (last); drop the run
    state."""
    from dinov2_patho.backbones.features import rows_done

    n = settings["tiles"]["num_rows"]
    for rank in range(world_size):
        start, stop = shard(n, rank, world_size)
        path = out / PROGRESS / f"rows_{start}_{stop}.json"
        if stop > start and (not path.is_file() or rows_done(path, stop - start) != stop - start):
            raise UserError(f"{path}: shard of rank {rank} is incomplete; rerun to resume it")
    with atomic_path(out / SLIDES) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("slide_id", "start_row", "end_row"))
        for slide, a, b in _slide_runs(index):
            w.writerow((index.slide_names[slide], a, b))
    os.replace(out / PARTIAL, out / EMBEDDINGS)
    manifest = {"format_version": FORMAT_VERSION, "settings": settings, "num_rows": n, "dim": settings["dim"],
                "dtype": "float16", "world_size": world_size}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    _drop_run_state(out)


def _drop_run_state(out: Path) -> None:
    """run.json and progress/ of a complete run (its manifest in place)."""
    (out / RUN).unlink(missing_ok=True)
    shutil.rmtree(out / PROGRESS, ignore_errors=True)
