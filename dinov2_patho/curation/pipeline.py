"""The curation chain in one call, as the demo and benchmarks run it: slides -> `curate tiles` ->
`curate embed` -> `curate kmeans` -> `curate write`, each stage the function its command calls
(`tissue_tiles`, `embed_tiles`, `build_tree`, `write_tree`), skipped when its output is complete, so a
rerun resumes.

`tree_agreement` scores a written tree against known per-tile labels (the synthetic cohort's
planted tissue types): adjusted Rand index and normalised mutual information per level.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from dinov2_patho.data.index import TileIndex
from dinov2_patho.errors import UserError
from dinov2_patho.textfile import open_text


@dataclass(frozen=True)
class Curation:
    """Where one run of the chain put its outputs (see `curate`)."""

    root: Path

    @property
    def tiles(self) -> Path:
        return self.root / "tiles"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def index(self) -> Path:
        return self.clusters / "index"

    @property
    def clusters_csv(self) -> Path:
        return self.clusters / "clusters.csv"


def curate(slides: str | Path, out: str | Path, *, config_file: str | Path,
           backbone: str | Path | None = None, arch: str = "vit_small", overrides: tuple[str, ...] = (),
           tiles: str | Path | None = None, progress: bool = True) -> Curation:
    """Curate the slides of `slides` into `out`: tiles/, embeddings/, tree/, clusters/ (CSV + index).
    `backbone`: a checkpoint or training run to embed with (None: `arch` at random init). `tiles`:
    reuse another curation's tile list instead of detecting tissue again (re-curation)."""
    from dinov2_patho.curation.config import load_curation_config
    from dinov2_patho.curation.embed import embed_tiles
    from dinov2_patho.curation.hierarchy import build_tree
    from dinov2_patho.curation.tissue import tissue_tiles
    from dinov2_patho.curation.write import write_tree

    c = Curation(Path(out))
    config = load_curation_config(config_file, overrides)
    if tiles is not None:
        c_tiles = Path(tiles)
    else:
        c_tiles = c.tiles
        if not (c_tiles / "index" / "manifest.json").is_file():
            tissue_tiles(slides, c_tiles, config=config.tiles, progress=progress)
    if not (c.embeddings / "manifest.json").is_file():
        embed_tiles(c_tiles, c.embeddings, slides=slides, backbone=backbone, arch=arch, config=config.embed,
                    progress=progress)
    if not (c.tree / "manifest.json").is_file():
        build_tree(c.embeddings, c.tree, config=config.kmeans, progress=progress)
    if not (c.index / "manifest.json").is_file():
        write_tree(c_tiles, c.tree, c.clusters, progress=progress)
    return c


def planted_labels(index: TileIndex, labels_csv: str | Path, column: str = "tissue_type") -> np.ndarray:
    """The `column` of `labels_csv` (slide_id,tile_x,tile_y,...) for every row of `index`, "" where
    the CSV has no such tile (tissue found by `curate tiles` beyond the planted tissue)."""
    truth: dict[tuple[str, int, int], str] = {}
    with open_text(labels_csv) as f:
        for row in csv.DictReader(f):
            truth[row["slide_id"], int(row["tile_x"]), int(row["tile_y"])] = row[column]
    names = np.asarray(index.slide_names)
    labels = []
    for chunk in index.chunks():  # tuples per chunk, never per row of the whole index
        (x, y), slides = index.coords(chunk), names[index.slides(chunk)]
        labels += [truth.get((s, int(a), int(b)), "") for s, a, b in zip(slides, x, y)]
    return np.array(labels)


def tree_agreement(index: str | Path | TileIndex, labels_csv: str | Path,
                   column: str = "tissue_type") -> list[dict]:
    """Per level of the tree in `index`: clusters, tiles scored, adjusted Rand index and NMI of the
    clusters against the planted `column` (tiles without a planted label are left out)."""
    index = index if isinstance(index, TileIndex) else TileIndex.open(index)
    truth = planted_labels(index, labels_csv, column)
    known = truth != ""
    if not known.any():
        raise UserError(f"{labels_csv}: none of the {len(index)} tiles of {index.path} has a planted label")
    rows = []
    for level in range(1, index.num_levels + 1):
        clusters = np.asarray(index.level(level))[known]
        rows.append({"level": level, "clusters": int(len(np.unique(clusters))), "tiles": int(known.sum()),
                     "ari": float(adjusted_rand_score(truth[known], clusters)),
                     "nmi": float(normalized_mutual_info_score(truth[known], clusters))})
    return rows
