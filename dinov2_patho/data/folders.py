"""One meaning per path flag, in every command: a command's output folder, or the file inside it.

- `--tiles`: a `curate tiles` folder, its tiles.csv or its index/, or any tile index directory
  (`curate write`'s OUT/index, `index build`'s);
- `--embeddings`: a finished `curate embed` folder or its embeddings.npy, or any (N, D) .npy;
- `--slides`: a slide folder or a `slide_id,path` CSV (`SlideRegistry.from_spec`);
- `--backbone`: a training run or checkpoint folder, or a weights file (`backbones.load.load_backbone`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinov2_patho.data.index.format import MANIFEST as INDEX_MANIFEST
from dinov2_patho.errors import UserError
from dinov2_patho.jsonfile import read_json

# the flags' help, in every command's parser
TILES_HELP = "a `curate tiles` folder, its tiles.csv or its index/, or a tile index directory"
EMBEDDINGS_HELP = "a `curate embed` folder or its embeddings.npy"
BACKBONE_HELP = ("a training run or checkpoint folder (its teacher, at its own size: no --arch needed), "
                 "or a weights file (ours, DINOv2 hub or timm); omit for a random-init baseline")
# a `curate tiles` folder (curation/tissue.py)
TILES_CSV, SLIDES_CSV, SETTINGS, INDEX = "tiles.csv", "slides.csv", "tiles.json", "index"
SETTINGS_SHAPE = {"slides": str, "mpp_override": float | None, "backend": str | None, "fallback": str | None}
EMBEDDINGS = "embeddings.npy"  # of `curate embed`'s folder, renamed from its .partial.npy once complete


def tile_index_dir(path: str | Path, flag: str = "--tiles") -> Path:
    """The tile index directory that `path` is, holds (index/), or whose folder holds (a file in it)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    for candidate in (folder / INDEX, folder):
        if (candidate / INDEX_MANIFEST).is_file():
            return candidate
    raise UserError(f"{flag} {path}: neither a `curate tiles` folder nor a file in one (no "
                    f"{INDEX}/{INDEX_MANIFEST} beside {TILES_CSV}), nor a tile index (no {INDEX_MANIFEST})")


def tiles_folder(index_dir: Path) -> Path | None:
    """The `curate tiles` folder holding this tile index, or None for an index made otherwise."""
    return index_dir.parent if index_dir.name == INDEX else None


def tile_settings(index_dir: Path) -> dict:
    """What `curate tiles` recorded beside the index (slides, mpp override, backends); {} for others."""
    folder = tiles_folder(index_dir)
    return {} if folder is None else read_settings(folder)


def embeddings_file(path: str | Path, flag: str = "--embeddings") -> Path:
    """The .npy that `path` is, or a finished `curate embed` folder's embeddings.npy."""
    path = Path(path)
    if path.is_dir():
        if not (path / EMBEDDINGS).is_file():
            raise UserError(f"{flag} {path}: no {EMBEDDINGS}: not a `curate embed` folder, or it has not "
                            "finished there")
        return path / EMBEDDINGS
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist (a .npy file or a `curate embed` folder)")
    return path


def read_settings(out: Path) -> dict[str, Any]:
    """The settings `curate tiles` wrote in OUT ({} for a tile index made otherwise)."""
    path = Path(out) / SETTINGS
    if not path.is_file():
        return {}
    return read_json(path, "tile list settings", "rerun `dinov2-patho curate tiles` into that directory",
                     shape=SETTINGS_SHAPE)
