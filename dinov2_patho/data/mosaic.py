"""Tile grids: rows of tiles chosen by slide, by cluster or at random, read through the tile dataset.

`dinov2-patho tiles preview` (`preview_tiles`) and the report's cluster mosaics both draw with this
module, so what a user previews is what the report (and training) sees: tiles of 112 um read at level 0
and resized to 224 px by the configured tile source, then shrunk to thumbnails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dinov2_patho.data.dataset import TileDataset
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.readers import TileReadError, TileSource
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path
from dinov2_patho.progress import progress_bar

# Level columns are scanned in chunks: a 350M-row index must not materialise per-cluster row lists.
_SCAN_CHUNK = 1 << 22
_LABEL_PX = 150
_UNREADABLE_RGB = (200, 60, 60)
PREVIEW_BY = ("random", "slide", "cluster")


@dataclass
class TileGroup:
    label: str
    row_ids: np.ndarray  # global row ids of the index


@dataclass
class TileGrid:
    groups: list[TileGroup]
    tiles: list[np.ndarray]  # per group: uint8 [n, px, px, 3]
    errors: list[str]  # one line per unreadable tile (drawn as a red square)


def parse_level(index: Any, level: int | str) -> int:
    """A level number 1..K, also given as the CSV's column name `level_K`."""
    text = str(level)
    number = text[len("level_"):] if text.startswith("level_") else text
    if index.num_levels == 0:
        raise UserError(f"the index {index.path} has no cluster levels (its CSV had no level_K columns); "
                        "cluster views need a clustering CSV's levels")
    if not number.isdigit() or not 1 <= int(number) <= index.num_levels:
        raise UserError(f"level {level!r} does not exist: the index {index.path} has levels "
                        f"1..{index.num_levels} ({', '.join(index.level_names)})")
    return int(number)


def sample_rows(candidates: np.ndarray | int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct picks of `candidates` (an array, or range(candidates)), sorted."""
    count = candidates if isinstance(candidates, int) else len(candidates)
    return np.sort(rng.choice(candidates, size=min(n, count), replace=False))


def slide_groups(index: Any, slide_ids: list[str], per_group: int, seed: int) -> list[TileGroup]:
    rng = np.random.default_rng(seed)
    return [TileGroup(sid, sample_rows(index.select_slides([sid]).row_ids(TileIndex.ALL), per_group, rng))
            for sid in slide_ids]


def random_groups(index: Any, groups: int, per_group: int, seed: int) -> list[TileGroup]:
    rng = np.random.default_rng(seed)
    picks = sample_rows(len(index), groups * per_group, rng)  # view positions
    picks = index.row_ids(picks)
    rng.shuffle(picks)
    return [TileGroup("random", np.sort(picks[g * per_group:(g + 1) * per_group])) for g in range(groups)
            if len(picks[g * per_group:(g + 1) * per_group])]


def cluster_groups(index: Any, level: int, clusters: np.ndarray, per_group: int,
                   seed: int) -> list[TileGroup]:
    """`per_group` random rows of each cluster code in `clusters` (uniform within the cluster), in one
    chunked pass over the level column: each matching row gets a random key and the smallest keys
    of each cluster are kept."""
    rng = np.random.default_rng(seed)
    clusters = np.asarray(clusters, np.int64)
    column = index.level(level)
    sizes = index.cluster_sizes(level)
    kept_pos = np.empty(0, np.int64)
    kept_lab = np.empty(0, np.int64)
    kept_key = np.empty(0, np.float64)
    for start in range(0, len(column), _SCAN_CHUNK):
        labels = np.asarray(column[start:start + _SCAN_CHUNK]).astype(np.int64)
        hit = np.flatnonzero(np.isin(labels, clusters))
        pos = np.concatenate([kept_pos, start + hit])
        lab = np.concatenate([kept_lab, labels[hit]])
        key = np.concatenate([kept_key, rng.random(len(hit))])
        order = np.lexsort((key, lab))
        lab_sorted = lab[order]
        first = np.searchsorted(lab_sorted, lab_sorted, side="left")
        keep = order[np.arange(len(order)) - first < per_group]
        kept_pos, kept_lab, kept_key = pos[keep], lab[keep], key[keep]
    kept_pos = index.row_ids(kept_pos)
    values = index.cluster_values(level)
    return [TileGroup(f"{index.level_names[level - 1]} = {values[c]}\n{int(sizes[c]):,} tiles",
                      np.sort(kept_pos[kept_lab == c])) for c in clusters.tolist()]


def largest_and_smallest(sizes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the n largest non-empty clusters (largest first) and of the n smallest (smallest
    first), without overlap."""
    nonempty = np.flatnonzero(sizes > 0)
    order = nonempty[np.argsort(-sizes[nonempty], kind="stable")]
    largest = order[:n]
    smallest = order[n:][::-1][:n]
    return largest, smallest


def read_thumbnails(index: Any, source: TileSource, row_ids: np.ndarray, px: int, errors: list[str], *,
                    progress: bool = False, desc: str = "tiles") -> np.ndarray:
    """uint8 [n, px, px, 3] of these rows; an unreadable tile is a red square, its error appended."""
    dataset = TileDataset(index, source)
    out = np.empty((len(row_ids), px, px, 3), np.uint8)
    rows = np.asarray(row_ids).tolist()
    for i, row in enumerate(progress_bar(rows, desc=desc, unit="tile", disable=not progress)):
        try:
            tile = dataset[row][0].permute(1, 2, 0).numpy()
        except TileReadError as e:
            errors.append(str(e))
            out[i] = _UNREADABLE_RGB
            continue
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize((px, px), Image.BILINEAR))
    return out


def read_grid(index: Any, source: TileSource, groups: list[TileGroup], px: int, *,
              progress: bool = True, desc: str = "tiles") -> TileGrid:
    errors: list[str] = []
    tiles = [read_thumbnails(index, source, g.row_ids, px, errors)
             for g in progress_bar(groups, desc=desc, unit="row", disable=not progress)]
    return TileGrid(groups, tiles, errors)


def draw_grid(grid: TileGrid, px: int, *, gap: int = 2) -> Image.Image:
    """One row per group: its label on the left, then its tiles."""
    cols = max((len(t) for t in grid.tiles), default=1) or 1
    width = _LABEL_PX + cols * (px + gap)
    height = max(len(grid.groups), 1) * (px + gap)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for r, (group, tiles) in enumerate(zip(grid.groups, grid.tiles)):
        top = r * (px + gap)
        draw.multiline_text((4, top + 4), group.label, fill="black")
        for c, tile in enumerate(tiles):
            image.paste(Image.fromarray(tile), (_LABEL_PX + c * (px + gap), top))
    return image


def preview_tiles(index: str | Path, out: str | Path, *, slides: str | Path | None = None,
                  tile_store: str | Path | None = None, by: str = "random", rows: int = 8, cols: int = 8,
                  level: int | str | None = None, clusters: list[str] | None = None,
                  slide_ids: list[str] | None = None, tile_px: int = 112, seed: int = 0,
                  backend: str = "openslide", fallback: str | None = "tiffslide",
                  mpp_override: float | None = None, progress: bool = True) -> TileGrid:
    """`tiles preview`: an image grid (OUT, in the format its suffix says) of tiles of the tile index
    `index`, read as training reads them from `slides` or the tile store `tile_store`: `rows` rows of
    `cols` tiles, one row per slide (`by="slide"`: `slide_ids`, default random ones), per cluster of
    `level` (`by="cluster"`: `clusters` as in the CSV, default the largest) or of random rows. Returns
    the grid drawn."""
    from dinov2_patho.data.dataset import build_tile_source

    if by not in PREVIEW_BY:
        raise UserError(f"--by {by}: choose one of {', '.join(PREVIEW_BY)}")
    if rows < 1 or cols < 1 or tile_px < 8:
        raise UserError(f"--rows and --cols must be >= 1 and --tile-px >= 8, got {rows}, {cols}, "
                        f"{tile_px}")
    image_format = _image_format(out)
    tile_index = TileIndex.open(index)
    source = build_tile_source({"backend": "hdf5" if tile_store else backend, "slides": slides,
                                "tile_store": tile_store, "mpp_override": mpp_override,
                                "fallback": fallback}, mpp_key="--mpp-override")
    rng = np.random.default_rng(seed)
    if by == "slide":
        chosen = slide_ids or [tile_index.slide_names[i] for i in
                               sample_rows(len(tile_index.slide_names), rows, rng)]
        tile_index.select_slides(chosen)  # an unknown slide is an error naming it
        groups = slide_groups(tile_index, chosen, cols, seed)
    elif by == "cluster":
        at = parse_level(tile_index, level or tile_index.num_levels)
        codes = _cluster_codes(tile_index, at, clusters, rows)
        groups = cluster_groups(tile_index, at, codes, cols, seed)
    else:
        groups = random_groups(tile_index, rows, cols, seed)
    grid = read_grid(tile_index, source, groups, tile_px, progress=progress)
    with atomic_path(out) as tmp:
        draw_grid(grid, tile_px).save(tmp, format=image_format)
    tiles = sum(len(g.row_ids) for g in groups)
    print(f"{out}: {len(groups)} rows, {tiles} tiles by {by}"
          + (f"; {len(grid.errors)} unreadable (red), first: {grid.errors[0]}" if grid.errors else ""))
    return grid


def _image_format(path: str | Path) -> str:
    """The PIL format that writes `path`, by its suffix (.jpg wrote PNG bytes once), or a UserError."""
    Image.init()
    suffix = Path(path).suffix.lower()
    image_format = Image.registered_extensions().get(suffix)
    if image_format not in Image.SAVE:
        raise UserError(f"--out {path}: cannot write an image with suffix {suffix or '(none)'!r}; give "
                        f".png, .jpg, .webp, ...")
    return image_format


def _cluster_codes(index: Any, level: int, clusters: list[str] | None, rows: int) -> np.ndarray:
    """Level codes of the cluster ids given (as in the CSV), or of the `rows` largest clusters."""
    if not clusters:
        return largest_and_smallest(index.cluster_sizes(level), rows)[0]
    code_of = {int(v): c for c, v in enumerate(index.cluster_values(level).tolist())}
    codes = []
    for cluster in clusters:
        if not cluster.lstrip("-").isdigit() or int(cluster) not in code_of:
            raise UserError(f"--cluster {cluster}: no such cluster at {index.level_names[level - 1]} of "
                            f"{index.path} ({len(code_of)} clusters)")
        codes.append(code_of[int(cluster)])
    return np.array(codes, np.int64)
