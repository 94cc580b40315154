"""`curate export`: an EMB_DIR (`curate embed` or `curate import`) -> one trident-style `<slide_id>.h5` per
slide (`features` float32 [N, D], `coords` int64 [N, 2] level-0 x, y), the layout trident writes and
Patho-Bench reads. The coords come from the tile list the embeddings were made from: EMB_DIR's own
`index/` after `curate import`, else `--tiles` (checked against the fingerprint `curate embed` recorded).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_patho.curation.embed import EMBEDDINGS, MANIFEST, SLIDES
from dinov2_patho.data.feature_files import feature_file_name, write_feature_file
from dinov2_patho.data.folders import INDEX, SLIDES_CSV, embeddings_file, tile_index_dir, tiles_folder
from dinov2_patho.data.index import TileIndex, tile_list_fingerprint
from dinov2_patho.data.readers import TILE_PX
from dinov2_patho.errors import UserError
from dinov2_patho.jsonfile import read_json
from dinov2_patho.progress import progress_bar
from dinov2_patho.textfile import open_text


def tile_list_of(emb_dir: Path, tiles: Path | None, manifest: dict[str, Any]) -> TileIndex:
    """The tile list row-aligned with EMB_DIR's embeddings, checked: same rows, and the same list where
    `curate embed` recorded its fingerprint."""
    if tiles is None:
        if not (emb_dir / INDEX / "manifest.json").is_file():
            raise UserError(f"{emb_dir}: no {INDEX}/ (made by `curate embed`, not `curate import`); pass "
                            "--tiles, the TILES_DIR it embedded")
        tiles = emb_dir
    index = TileIndex.open(tile_index_dir(tiles))
    expected = manifest["settings"].get("tiles", {}).get("fingerprint")
    if len(index) != manifest["num_rows"] or (expected is not None
                                              and tile_list_fingerprint(Path(index.path)) != expected):
        raise UserError(f"{tiles}: not the tile list {emb_dir} was embedded from ({len(index)} tiles, "
                        f"{manifest['num_rows']} embeddings)")
    return index


def level0_tile_px(tiles: Path | None) -> dict[str, int]:
    """slide id -> tile size in level-0 px, from `curate tiles`' report (trident's `patch_size_level0`)."""
    report = None if tiles is None else tiles / SLIDES_CSV
    if report is None or not report.is_file():
        return {}
    with open_text(report) as f:
        rows = csv.DictReader(f)
        if "tile_px" not in (rows.fieldnames or []):
            return {}
        return {r["slide_id"]: int(r["tile_px"]) for r in rows if r["tile_px"]}


def export_features(embeddings: str | Path, out: str | Path, *, tiles: str | Path | None = None,
                    progress: bool = True) -> Path:
    """`curate export`: the EMB_DIR `embeddings` (of `curate embed` or `curate import`) -> one trident-style
    OUT/<slide_id>.h5 per slide. `tiles`: the tile list the embeddings were made from (default: EMB_DIR's
    own index/, from `curate import`). Returns OUT."""
    emb_dir, out = embeddings_file(embeddings).parent, Path(out)
    tiles = None if tiles is None else Path(tiles)
    manifest = read_json(emb_dir / MANIFEST, "embeddings manifest", "finish `curate embed` / `curate import` "
                         "there first", shape={"num_rows": int, "settings": dict})
    index = tile_list_of(emb_dir, tiles, manifest)
    tile_px = level0_tile_px(None if tiles is None else tiles_folder(tile_index_dir(tiles)))
    embeddings = np.load(emb_dir / EMBEDDINGS, mmap_mode="r")
    slide_number = {name: i for i, name in enumerate(index.slide_names)}
    with open_text(emb_dir / SLIDES) as f:
        slides = [(r["slide_id"], int(r["start_row"]), int(r["end_row"])) for r in csv.DictReader(f)]
    out.mkdir(parents=True, exist_ok=True)
    for slide_id, a, b in progress_bar(slides, desc="curate export", unit="slide", disable=not progress):
        path = out / feature_file_name(slide_id, str(emb_dir / SLIDES))
        # pop: a slide listed twice would overwrite its own file
        if (index.slides(slice(a, b)) != slide_number.pop(slide_id, -1)).any():
            raise UserError(f"{emb_dir / SLIDES}: rows {a}..{b} of slide {slide_id!r} are not that slide's "
                            f"(only) rows in the tile list {index.path}")
        attrs = {"patch_size": TILE_PX}
        if slide_id in tile_px:
            attrs["patch_size_level0"] = tile_px[slide_id]
        write_feature_file(path, embeddings[a:b], np.stack(index.coords(slice(a, b)), 1), attrs)
    print(f"curate export: {len(slides)} slides, {manifest['num_rows']} tiles -> {out}/<slide_id>.h5")
    return out
