"""Panel c, the tree: clusters per level, cluster sizes (log-log), tile mosaics of one level's clusters."""

from __future__ import annotations

from typing import Any

import numpy as np

from dinov2_patho.data.mosaic import cluster_groups, draw_grid, largest_and_smallest, read_grid
from dinov2_patho.data.readers import TileSource
from dinov2_patho.report.figures import figure_uri, image_uri, pyplot
from dinov2_patho.report.page import Panel
from dinov2_patho.report.run import RunInputs

MOSAIC_PX = 64


def fill_panel(panel: Panel, run: RunInputs) -> None:
    panel.notes += run.source_notes
    index = run.tile_index
    if index is None:
        panel.notes.append(run.index_note)
        return
    panel.table(level_rows(index))
    panel.figure(size_figure(index), "cluster sizes")
    if run.source is not None:
        images, errors = mosaics(index, run.source, run.level, run.mosaic_clusters, run.tiles_per_cluster,
                                 MOSAIC_PX, run.seed, run.progress)
        panel.notes += errors[:5]
        for name, uri in images.items():
            panel.heading(f"{name} clusters of {index.level_names[run.level - 1]}")
            panel.figure(uri, f"{name} clusters")


def level_rows(index: Any) -> list[list[str]]:
    rows = [["level", "clusters", "non-empty", "min size", "median size", "max size"]]
    for k, name in enumerate(index.level_names, 1):
        sizes = index.cluster_sizes(k)
        nonempty = sizes[sizes > 0]
        stats = (nonempty.min(), np.median(nonempty), nonempty.max()) if len(nonempty) else ()
        rows.append([name, f"{index.num_clusters(k):,}", f"{len(nonempty):,}", *(f"{v:,.0f}" for v in stats)])
    return rows


def size_figure(index: Any) -> str:
    """Cluster size against its rank, largest first, one line per level (log-log)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, name in enumerate(index.level_names, 1):
        sizes = np.sort(index.cluster_sizes(k))[::-1]
        sizes = sizes[sizes > 0]
        # a 3.5M-cluster level is drawn at log-spaced ranks
        ranks = np.unique(np.geomspace(1, len(sizes), num=min(len(sizes), 2000)).astype(np.int64))
        ax.plot(ranks, sizes[ranks - 1], marker="." if len(sizes) < 50 else None,
                label=f"{name} ({len(sizes):,})")
    ax.set(xscale="log", yscale="log", xlabel="cluster rank (largest first)", ylabel="tiles in cluster",
           title="cluster sizes per level")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return figure_uri(fig)


def mosaics(index: Any, source: TileSource, level: int, clusters: int, per_cluster: int, px: int, seed: int,
            progress: bool) -> tuple[dict[str, str], list[str]]:
    """'largest' / 'smallest' -> JPEG data URI of a grid (one row per cluster, its size in the label),
    and the read errors."""
    largest, smallest = largest_and_smallest(index.cluster_sizes(level), clusters)
    images, errors = {}, []
    for name, codes in (("largest", largest), ("smallest", smallest)):
        if len(codes) == 0:
            continue
        grid = read_grid(index, source, cluster_groups(index, level, codes, per_cluster, seed), px,
                         progress=progress, desc=f"mosaic ({name} clusters)")
        errors += grid.errors
        images[name] = image_uri(draw_grid(grid, px))
    return images, errors
