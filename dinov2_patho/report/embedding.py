"""Panel d, the embedding map: a deterministic sample of the tile embeddings in 2-D (UMAP when
umap-learn is installed, PCA otherwise), coloured by cluster or slide metadata, each point with its tile."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_patho.data.mosaic import read_thumbnails, sample_rows
from dinov2_patho.data.readers import TileSource
from dinov2_patho.errors import UserError
from dinov2_patho.report.figures import image_uri
from dinov2_patho.report.page import Panel
from dinov2_patho.report.run import RunInputs
from dinov2_patho.textfile import open_text

MAP_THUMB_PX = 64


def fill_panel(panel: Panel, run: RunInputs) -> None:
    if run.embeddings is None:
        panel.notes.append("no embeddings given (--embeddings: `curate embed`'s embeddings.npy or its "
                           "directory)")
    elif run.emb is None:
        panel.notes.append(run.index_note)
    else:
        errors: list[str] = []
        panel.embedding_map(embedding_map(run.tile_index, run.emb, run.source, points=run.map_points,
                                          seed=run.seed, metadata_csv=run.metadata, thumb_px=MAP_THUMB_PX,
                                          errors=errors, progress=run.progress))
        panel.notes += errors[:5]
        if run.source is None:
            panel.notes.append("no tile source: points show no tile (give --slides)")


def load_embeddings(path: str | Path, index: Any) -> np.ndarray:
    """The [N, D] embeddings memory-mapped (a .npy, or a `curate embed` directory), checked against the
    index's row count."""
    from dinov2_patho.data.folders import embeddings_file

    path = embeddings_file(path)
    try:
        emb = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"embeddings {path}: cannot read a .npy array: {e}") from e
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise UserError(f"embeddings {path}: want a float [N, D] array, got {emb.dtype} {emb.shape}")
    if len(emb) != len(index):
        raise UserError(f"embeddings {path} have {len(emb):,} rows but the index {index.path} has "
                        f"{len(index):,}: they must be aligned row for row")
    return emb


def project(x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """[n, 2] coordinates scaled to [0, 1], and the method's name."""
    try:
        import umap
    except ImportError:
        umap = None
    if umap is not None and len(x) > 15:
        xy, method = umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"
    else:
        from sklearn.decomposition import PCA

        xy, method = PCA(n_components=2, random_state=seed).fit_transform(x), "PCA"
    xy = xy - xy.min(axis=0)
    return xy / np.maximum(xy.max(axis=0), 1e-12), method


def _compact(codes: np.ndarray, names: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    """Codes renumbered over the values present (a 35,000-cluster level keeps only its sampled names)."""
    present, inverse = np.unique(codes, return_inverse=True)
    labels = [str(names[c]) if c >= 0 else "(none)" for c in present.tolist()]
    return {"codes": inverse.tolist(), "names": labels}


def metadata_columns(csv_path: str | Path) -> list[str]:
    with open_text(csv_path) as f:
        header = next(csv.reader(f), [])
    return [c for c in header if c != "slide_id"]


def embedding_map(index: Any, emb: np.ndarray, source: TileSource | None, *, points: int, seed: int,
                  metadata_csv: str | Path | None, thumb_px: int, errors: list[str],
                  progress: bool = False) -> dict[str, Any]:
    """The map's data for the page: coordinates, colourings, per-point slide/x/y and thumbnails."""
    rng = np.random.default_rng(seed)
    positions = sample_rows(len(emb), points, rng)
    rows = index.row_ids(positions)
    xy, method = project(np.asarray(emb[positions], np.float32), seed)
    view = index.select(rows)
    slides = index.slides(positions)
    xs, ys = index.coords(positions)
    colorings = {}
    for k, name in enumerate(index.level_names, 1):
        colorings[name] = _compact(np.asarray(view.level(k)), index.cluster_values(k))
    colorings["slide"] = _compact(slides, index.slide_names)
    if metadata_csv is not None:
        for column in metadata_columns(metadata_csv):
            per_slide, names = index.slide_metadata(metadata_csv, column)
            colorings[column] = _compact(per_slide[slides], names)
    thumbs = []
    if source is not None:
        tiles = read_thumbnails(index, source, rows, thumb_px, errors, progress=progress, desc="map tiles")
        thumbs = [image_uri(t, quality=75) for t in tiles]
    return {"method": method, "x": np.round(xy[:, 0], 4).tolist(), "y": np.round(xy[:, 1], 4).tolist(),
            "row": rows.tolist(), "slide": slides.tolist(), "slide_names": index.slide_names,
            "tile_x": xs.tolist(), "tile_y": ys.tolist(), "colorings": colorings, "thumbs": thumbs}
