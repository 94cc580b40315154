"""`curate write`: the tile list + the cluster tree -> `clusters.csv` in the paper's format
(`slide_id,tile_x,tile_y,level_1..level_L`, row i = tile row i) and the tile index built from it, so
that `sampler.name=cluster_stratified sampler.level=k data.index=OUT_DIR/index` trains on the tree.

The CSV is streamed in chunks of rows (pyarrow's CSV writer over numpy columns); the index comes
from `build_index`, the one reader of that format, so both outputs describe the same rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from dinov2_patho.curation.tree import MANIFEST as TREE_MANIFEST
from dinov2_patho.curation.tree import ClusterTree
from dinov2_patho.curation.tree_check import check_tree
from dinov2_patho.data.folders import tile_index_dir
from dinov2_patho.data.index import TileIndex, build_index
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path
from dinov2_patho.progress import progress_bar

CSV_NAME = "clusters.csv"
INDEX_NAME = "index"
_CHUNK_ROWS = 1 << 21  # ~100 MB of CSV text per step
_STRUCTURAL = (",", '"', "\n", "\r")


def write_clusters(tiles: str | Path, tree_dir: str | Path, out_dir: str | Path, *,
                   progress: bool = True) -> TileIndex:
    """Write OUT_DIR/clusters.csv and OUT_DIR/index/ (each replaced whole, never left partial)."""
    tile_list = TileIndex.open(tile_index_dir(tiles))
    tree = ClusterTree.open(tree_dir)
    if len(tile_list) != tree.num_points:
        raise UserError(f"{tile_list.path} lists {len(tile_list)} tiles but {Path(tree_dir) / TREE_MANIFEST} "
                        f"has num_points {tree.num_points}: the tree was built on another tile list")
    check_tree(tree, progress=progress)
    out = Path(out_dir)
    csv = out / CSV_NAME
    with atomic_path(csv) as tmp:
        _write_csv(tmp, tile_list, tree, progress)
    try:
        return build_index(csv, out / INDEX_NAME, progress=progress)
    except BaseException:
        csv.unlink(missing_ok=True)  # a CSV without its index would pass for a finished output
        raise


def _write_csv(path: Path, tile_list: TileIndex, tree: ClusterTree, progress: bool) -> None:
    levels = [f"level_{k}" for k in range(1, tree.num_levels + 1)]
    names = pa.array(tile_list.slide_names, pa.string())
    tile_level = tree.array(1, "assignment")
    parents = [np.asarray(tree.array(k, "assignment")) for k in range(2, tree.num_levels + 1)]
    # unquoted, as the paper's CSV; if a slide_id holds a comma, quote or line break, all slide_ids are quoted
    quote = any(c in s for s in tile_list.slide_names for c in _STRUCTURAL)
    options = pcsv.WriteOptions(include_header=False, quoting_style="needed" if quote else "none")
    schema = pa.schema([("slide_id", pa.string()), ("tile_x", pa.int32()), ("tile_y", pa.int32()),
                        *[(name, pa.int32()) for name in levels]])
    with open(path, "wb") as f, progress_bar(total=len(tile_list), unit="row", unit_scale=True,
                                             desc="write CSV", disable=not progress) as bar:
        f.write((",".join(schema.names) + "\n").encode())  # pyarrow would quote the header names
        with pcsv.CSVWriter(f, schema, write_options=options) as writer:
            for chunk in tile_list.chunks(_CHUNK_ROWS):
                x, y = tile_list.coords(chunk)
                labels = [np.asarray(tile_level[chunk])]
                for parent in parents:  # level k = the parent of the level-(k-1) cluster
                    labels.append(parent[labels[-1]])
                writer.write_table(pa.table([names.take(pa.array(tile_list.slides(chunk))), x, y, *labels],
                                            schema=schema))
                bar.update(chunk.stop - chunk.start)


def write_tree(tiles: str | Path, tree: str | Path, out: str | Path, *, progress: bool = True) -> TileIndex:
    """`curate write`: the tile list `tiles` (a `curate tiles` folder or a tile index) and the cluster tree
    `tree` (`curate kmeans`'s folder) -> OUT/clusters.csv and the tile index OUT/index a training samples
    by (`sampler.name=cluster_stratified sampler.level=K data.index=OUT/index`). Returns that index."""
    index = write_clusters(tiles, tree, out, progress=progress)
    out = Path(out)
    print(f"{out / CSV_NAME}: {len(index):,} tiles, levels 1..{index.num_levels} "
          f"({', '.join(f'{index.num_clusters(k):,}' for k in range(1, index.num_levels + 1))} clusters)")
    print(f"{out / INDEX_NAME}: train on it with data.index={out / INDEX_NAME} "
          "sampler.name=cluster_stratified sampler.level=K")
    return index
