"""`write_report`: gather a run's inputs, let each panel's module fill its panel, write the page. A
partial run gets what exists; each missing input is a note in its panel, each wrong one a one-line
error."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinov2_patho.config_files import read_yaml, to_container
from dinov2_patho.data.dataset import build_tile_source
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.mosaic import parse_level
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_write_text
from dinov2_patho.logging import get_logger
from dinov2_patho.report import batches, embedding, evaluation, training, tree
from dinov2_patho.report.page import PANELS, Panel, render
from dinov2_patho.report.run import RunInputs, read_metrics, read_sessions

log = get_logger(__name__)

PANEL_MODULES = {"training": training, "batches": batches, "tree": tree, "embedding": embedding,
                 "evaluation": evaluation}  # page.PANELS' keys -> the module that fills each


def _tile_source(data: dict[str, Any], slides: str | Path | None, notes: list[str]):
    data = dict(data)
    if slides is not None:
        backend = data.get("backend", "openslide")
        data.update(slides=str(slides), backend="openslide" if backend == "hdf5" else backend)
    try:
        return build_tile_source(data)
    except UserError as e:
        notes.append(f"no tiles drawn: {e} (give --slides)")
        return None


def write_report(run_dir: str | Path, out: str | Path, *, index: str | Path | None = None,
                 slides: str | Path | None = None, embeddings: str | Path | None = None,
                 level: int | str | None = None, metadata: str | Path | None = None,
                 eval_dirs: Sequence[str | Path] = (), map_points: int = 800, mosaic_clusters: int = 6,
                 tiles_per_cluster: int = 10, batch_steps: int = 200, seed: int = 0,
                 progress: bool = True) -> Path:
    """Write the HTML report of the training run in `run_dir` to `out`; returns `out`.

    `index`, `slides` default to the run's config.yaml (`data.index`, `data.slides` or its tile
    store); `level` to the sampler's stratification level, else the coarsest; `metadata` (a
    slide_id,... CSV for the map's colours) to `sampler.metadata_csv`. Evaluation results are
    searched under `run_dir` and `eval_dirs`."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    # paths given, checked before any work (a missing --metadata was a traceback once the map was drawn)
    if metadata is not None and not Path(metadata).is_file():
        raise UserError(f"metadata CSV {metadata} does not exist")
    for eval_dir in eval_dirs:
        if not Path(eval_dir).is_dir():
            raise UserError(f"eval directory {eval_dir} does not exist")
    run = _gather(run_dir, index, slides, embeddings, level, metadata, eval_dirs, map_points=map_points,
                  mosaic_clusters=mosaic_clusters, tiles_per_cluster=tiles_per_cluster,
                  batch_steps=batch_steps, seed=seed, progress=progress)
    panels = {key: Panel(key) for key, _ in PANELS}
    for key, panel in panels.items():
        PANEL_MODULES[key].fill_panel(panel, run)
    subtitle = (f"{run_dir.resolve()} · {len(run.metrics):,} iterations logged · written "
                f"{time.strftime('%Y-%m-%d %H:%M')}")
    atomic_write_text(out, render(f"dinov2-patho report: {run_dir.name}", subtitle, panels))
    log.info("report %s written in %.1f s", out, time.perf_counter() - t0)
    return Path(out)


def _gather(run_dir: Path, index: str | Path | None, slides: str | Path | None, embeddings: str | Path | None,
            level: int | str | None, metadata: str | Path | None,
            eval_dirs: Sequence[str | Path], **options: Any) -> RunInputs:
    """The run's metrics, sessions and config, and the index, level, embeddings and tile source the panels
    draw from (a mismatch fails here, before any panel's work); `options`: the panels' own."""
    metrics = read_metrics(run_dir)
    config_path = run_dir / "config.yaml"
    config = to_container(read_yaml(config_path)) if config_path.is_file() else {}
    sessions = read_sessions(run_dir)
    data = config.get("data", {})
    sampler_cfg = config.get("sampler", {})
    index_path = index if index is not None else data.get("index")
    tile_index = None
    if index_path is None:
        note = "no tile index: give --index (the run's config names none)"
    elif index is None and not Path(index_path).is_dir():
        note = f"the run's tile index {index_path} is not there: give --index"
    else:
        tile_index, note = TileIndex.open(index_path), ""
    if level is None:
        level = sampler_cfg.get("level") or (tile_index.num_levels if tile_index else None)
    if tile_index is not None:
        level = parse_level(tile_index, level)
    emb = None
    if embeddings is not None and tile_index is not None:
        emb = embedding.load_embeddings(embeddings, tile_index)  # a mismatch fails before any work
    source_notes: list[str] = []
    source = _tile_source(data, slides, source_notes) if tile_index is not None else None
    if metadata is None:
        metadata = sampler_cfg.get("metadata_csv")
    return RunInputs(run_dir=run_dir, metrics=metrics, config=config, sessions=sessions,
                     tile_index=tile_index, index_note=note, level=level, embeddings=embeddings, emb=emb,
                     source=source, source_notes=source_notes, metadata=metadata, eval_dirs=eval_dirs,
                     **options)
