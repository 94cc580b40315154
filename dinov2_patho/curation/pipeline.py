"""The curation chain in one call, as the demo and benchmarks run it: slides -> `curate tiles` ->
`curate embed` -> `curate kmeans` -> `curate write`, each stage through its own command (the same
parser and code a user runs) and skipped when its output is complete, so a rerun resumes.

`tree_agreement` scores a written tree against known per-tile labels (the synthetic cohort's
planted tissue types): adjusted Rand index and normalised mutual information per level.
"""

from __future__ import annotations

import csv
import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from dinov2_patho.data.index import TileIndex
from dinov2_patho.errors import UserError
from dinov2_patho.textfile import open_text


def run_command(*argv: str) -> None:
    """Run `dinov2-patho ARGV...` in this process; a UserError reaches the caller as raised."""
    from dinov2_patho.cli import COMMANDS, build_parser

    args = build_parser(argv[0]).parse_args(list(argv))
    importlib.import_module(COMMANDS[argv[0]][0]).run(args)


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
    c = Curation(Path(out))
    quiet = () if progress else ("--no-progress",)
    config = ("--config-file", str(config_file))
    if tiles is not None:
        c_tiles = Path(tiles)
    else:
        c_tiles = c.tiles
        if not (c_tiles / "index" / "manifest.json").is_file():
            run_command("curate", "tiles", "--slides", str(slides), "--out", str(c_tiles), *quiet, *config,
                        *overrides)
    if not (c.embeddings / "manifest.json").is_file():
        with_backbone = () if backbone is None else ("--backbone", str(backbone))
        run_command("curate", "embed", "--tiles", str(c_tiles), "--slides", str(slides), "--out",
                    str(c.embeddings), "--arch", arch, *with_backbone, *quiet, *config, *overrides)
    if not (c.tree / "manifest.json").is_file():
        run_command("curate", "kmeans", "--embeddings", str(c.embeddings), "--out", str(c.tree), *quiet,
                    *config, *overrides)
    if not (c.index / "manifest.json").is_file():
        run_command("curate", "write", "--tiles", str(c_tiles), "--tree", str(c.tree), "--out",
                    str(c.clusters), *quiet)
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
