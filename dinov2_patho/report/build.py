"""`write_report`: gather a run's panels and write the page. A partial run gets what exists; each
missing input is a note in its panel, each wrong one a one-line error."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dinov2_patho.checkpoint_files import CHECKPOINTS
from dinov2_patho.config_files import read_yaml, to_container
from dinov2_patho.data.dataset import build_tile_source
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.mosaic import parse_level
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_write_text
from dinov2_patho.logging import get_logger
from dinov2_patho.report import batches, embedding, evaluation, training, tree
from dinov2_patho.report.page import Panel, render

log = get_logger(__name__)

MOSAIC_PX = 64
MAP_THUMB_PX = 64


def _global_batch(sessions: list[dict[str, Any]], metrics: training.Metrics, config: dict[str, Any]) -> int:
    for event in reversed(sessions):
        if "global_batch" in event:
            return int(event["global_batch"])
    samples, seconds = metrics.get("samples_per_s"), metrics.get("iter_time")
    if samples is not None and seconds is not None:
        return int(round(samples[0] * seconds[0]))
    return int(config.get("train", {}).get("batch_size_per_gpu", 1))


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
    metrics = training.read_metrics(run_dir)
    panels = {key: Panel(key) for key in ("training", "batches", "tree", "embedding", "evaluation")}
    config_path = run_dir / "config.yaml"
    config = to_container(read_yaml(config_path)) if config_path.is_file() else {}

    # a. training
    a = panels["training"]
    a.notes += metrics.notes
    sessions = training.read_sessions(run_dir)
    checkpoints = sorted(p.name for p in (run_dir / CHECKPOINTS).glob("iter_*"))
    a.table([["", ""], *training.run_facts(metrics, config, sessions, checkpoints)], header=False)
    for name, uri in training.training_figures(metrics).items():
        a.figure(uri, name)
    if config:
        a.preformatted("resolved config (config.yaml)", OmegaConf.to_yaml(OmegaConf.create(config)))
    else:
        a.notes.append(f"no config.yaml in {run_dir}")

    # the index, the level, the tiles
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
    source = _tile_source(data, slides, panels["tree"].notes) if tile_index is not None else None
    if metadata is None:
        metadata = sampler_cfg.get("metadata_csv")

    # b. batches
    b = panels["batches"]
    b.figure(batches.telemetry_figure(metrics), "telemetry")
    if tile_index is None:
        b.notes.append(note)
    elif sampler_cfg:
        steps = max(1, min(batch_steps, len(metrics)))
        global_batch = _global_batch(sessions, metrics, config)
        subset = data.get("subset")
        replays, notes = batches.compare_samplers(tile_index, sampler_cfg, global_batch, level, steps,
                                                  progress, subset=subset)
        b.notes += notes
        if replays:
            which = ("The run's sampler and a uniform sampler over the same index" if subset is None else
                     f"The run's sampler over its data.subset {subset} and a uniform sampler over the "
                     "whole index")
            b.text(f"{which}, replayed here for their "
                   f"first {steps} batches of {global_batch} tiles; clusters at "
                   f"{tile_index.level_names[level - 1]}.")
            b.figure(batches.comparison_figure(replays, tile_index.level_names[level - 1]), "comparison")
            b.table(batches.summary_rows(replays))

    # c. the tree
    c = panels["tree"]
    if tile_index is None:
        c.notes.append(note)
    else:
        c.table(tree.level_rows(tile_index))
        c.figure(tree.size_figure(tile_index), "cluster sizes")
        if source is not None:
            images, errors = tree.mosaics(tile_index, source, level, mosaic_clusters, tiles_per_cluster,
                                          MOSAIC_PX, seed, progress)
            c.notes += errors[:5]
            for name, uri in images.items():
                c.heading(f"{name} clusters of {tile_index.level_names[level - 1]}")
                c.figure(uri, f"{name} clusters")

    # d. embedding map
    d = panels["embedding"]
    if embeddings is None:
        d.notes.append("no embeddings given (--embeddings: `curate embed`'s embeddings.npy or its directory)")
    elif emb is None:
        d.notes.append(note)
    else:
        errors: list[str] = []
        d.embedding_map(embedding.embedding_map(tile_index, emb, source, points=map_points, seed=seed,
                                                metadata_csv=metadata, thumb_px=MAP_THUMB_PX, errors=errors,
                                                progress=progress))
        d.notes += errors[:5]
        if source is None:
            d.notes.append("no tile source: points show no tile (give --slides)")

    # e. evaluation
    e = panels["evaluation"]
    found = evaluation.find_results([run_dir, *map(Path, eval_dirs)])
    if not found:
        e.notes.append(f"no evaluation results (results.csv of `eval run`) under {run_dir}"
                       + "".join(f" or {p}" for p in eval_dirs))
    for directory in found:
        for name, rows, plot in evaluation.result_tables(directory):
            e.heading(f"{directory} / {name} (scores in %)")
            e.table(rows)
            e.figure(plot, name)

    subtitle = (f"{run_dir.resolve()} · {len(metrics):,} iterations logged · written "
                f"{time.strftime('%Y-%m-%d %H:%M')}")
    atomic_write_text(out, render(f"dinov2-patho report: {run_dir.name}", subtitle, panels))
    log.info("report %s written in %.1f s", out, time.perf_counter() - t0)
    return Path(out)
