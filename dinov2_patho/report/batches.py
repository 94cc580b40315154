"""Panel b, batches: the training sampler's telemetry, and the same measures for a uniform sampler
over the same index, replayed here, so a reader sees what stratification changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinov2_patho.progress import progress_bar
from dinov2_patho.report.figures import figure_uri, plot_series, pyplot
from dinov2_patho.report.page import Panel
from dinov2_patho.report.run import Metrics, RunInputs
from dinov2_patho.samplers import SamplerError, build_sampler, subset_view
from dinov2_patho.samplers.telemetry import TelemetrySummary, batch_stats

TELEMETRY = ("sampler/clusters", "sampler/slides", "sampler/per_cluster_min", "sampler/per_cluster_max")
SUMMARY_KEYS = ("cluster_coverage", "tile_coverage", "distinct_slides", "balance_entropy",
                "slides_mean", "per_cluster_min_mean", "per_cluster_max_mean")


def fill_panel(panel: Panel, run: RunInputs) -> None:
    panel.figure(telemetry_figure(run.metrics), "telemetry")
    index, sampler_cfg, data = run.tile_index, run.config.get("sampler", {}), run.config.get("data", {})
    if index is None:
        panel.notes.append(run.index_note)
    elif sampler_cfg:
        steps = max(1, min(run.batch_steps, len(run.metrics)))
        batch = global_batch(run.sessions, run.metrics, run.config)
        subset = data.get("subset")
        replays, notes = compare_samplers(index, sampler_cfg, batch, run.level, steps, run.progress,
                                          subset=subset)
        panel.notes += notes
        if replays:
            level_name = index.level_names[run.level - 1]
            which = ("The run's sampler and a uniform sampler over the same index" if subset is None else
                     f"The run's sampler over its data.subset {subset} and a uniform sampler over the "
                     "whole index")
            panel.text(f"{which}, replayed here for their "
                       f"first {steps} batches of {batch} tiles; clusters at "
                       f"{level_name}.")
            panel.figure(comparison_figure(replays, level_name), "comparison")
            panel.table(summary_rows(replays))


def global_batch(sessions: list[dict[str, Any]], metrics: Metrics, config: dict[str, Any]) -> int:
    """The run's global batch: as its log says, else from its throughput, else its config's per-GPU one."""
    for event in reversed(sessions):
        if "global_batch" in event:
            return int(event["global_batch"])
    samples, seconds = metrics.get("samples_per_s"), metrics.get("iter_time")
    if samples is not None and seconds is not None:
        return int(round(samples[0] * seconds[0]))
    return int(config.get("train", {}).get("batch_size_per_gpu", 1))


@dataclass
class Replay:
    """Per-batch measures at one tree level, and cumulative coverage, for one sampler's first batches."""

    name: str
    per_batch: list[dict[str, Any]] = field(default_factory=list)
    tile_coverage: list[float] = field(default_factory=list)
    cluster_coverage: list[float] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def replay(sampler, name: str, level: int, steps: int, progress: bool) -> Replay:
    index = sampler.index
    labels = index.level(level)
    sizes = index.cluster_sizes(level)
    nonempty = max(int((sizes > 0).sum()), 1)
    seen_tiles = np.empty(0, np.int64)  # sorted positions: no per-row array over a 350M-row index
    seen_clusters = np.zeros(len(sizes), bool)
    telemetry = TelemetrySummary(sampler)
    out = Replay(name)
    for _ in progress_bar(range(steps), desc=f"batches ({name})", unit="batch", disable=not progress):
        batch = sampler.next_batch()
        positions = sampler.rows.to_positions(batch)
        telemetry.update(batch)
        out.per_batch.append(batch_stats(sampler.columns, positions, labels))
        seen_tiles = np.union1d(seen_tiles, positions)
        seen_clusters[np.asarray(labels[np.sort(positions)]).astype(np.int64)] = True
        out.tile_coverage.append(len(seen_tiles) / max(sampler.eligible, 1))
        out.cluster_coverage.append(float(seen_clusters.sum()) / nonempty)
    out.summary = telemetry.summary()
    return out


def compare_samplers(index, sampler_cfg: dict[str, Any], global_batch: int, level: int, steps: int,
                     progress: bool, subset: str | None = None) -> tuple[list[Replay], list[str]]:
    """Replays of the run's sampler, over its `data.subset` view as the trainer draws it when `subset`
    is set, and of a uniform sampler over the whole index with the same seed; notes on what failed."""
    cfg = dict(sampler_cfg)
    replays, notes = [], []
    try:
        trained_index = index if subset is None else subset_view(index, subset)
    except SamplerError as e:
        trained_index = None
        notes.append(f"sampler trained: {cfg.get('name')} not replayed: {e}")
    candidates = [] if trained_index is None else [(f"trained: {cfg.get('name')}", cfg, trained_index)]
    if cfg.get("name") != "uniform" or subset is not None:
        candidates.append(("uniform", {"name": "uniform", "seed": cfg.get("seed", 0)}, index))
    for name, section, view in candidates:
        try:
            sampler = build_sampler(section, view, global_batch)
        except (SamplerError, OSError) as e:
            notes.append(f"sampler {name} not replayed: {e}")
            continue
        replays.append(replay(sampler, name, level, steps, progress))
    return replays, notes


def telemetry_figure(metrics: Metrics) -> str | None:
    keys = [k for k in TELEMETRY if metrics.get(k) is not None]
    if not keys:
        return None
    plt = pyplot()
    it = metrics.columns["iteration"]
    fig, ax = plt.subplots(figsize=(9, 2.8))
    for key in keys:
        plot_series(ax, it, metrics.get(key), label=key.removeprefix("sampler/"))
    ax.set(xlabel="iteration", title="training batches, as logged (sampler telemetry)", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure_uri(fig)


def comparison_figure(replays: list[Replay], level_name: str) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(13, 2.8))
    panels = (("clusters", f"distinct {level_name} clusters / batch"), ("slides", "distinct slides / batch"))
    for r in replays:
        steps = np.arange(1, len(r.per_batch) + 1)
        for ax, (key, title) in zip(axes[:2], panels):
            plot_series(ax, steps, np.array([s[key] for s in r.per_batch], float), label=r.name)
            ax.set(title=title, xlabel="batch")
        lo = np.array([s["per_cluster_min"] for s in r.per_batch], float)
        hi = np.array([s["per_cluster_max"] for s in r.per_batch], float)
        (line,) = axes[2].plot(steps, hi, linewidth=1, label=f"{r.name} max")
        axes[2].plot(steps, lo, linewidth=1, linestyle="--", color=line.get_color(), label=f"{r.name} min")
        axes[3].plot(steps, r.tile_coverage, color=line.get_color(), label=f"{r.name} tiles")
        axes[3].plot(steps, r.cluster_coverage, color=line.get_color(), linestyle="--",
                     label=f"{r.name} {level_name} clusters")
    axes[2].set(title=f"tiles per {level_name} cluster (min, max)", xlabel="batch")
    axes[3].set(title="cumulative coverage", xlabel="batch", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_uri(fig)


def summary_rows(replays: list[Replay]) -> list[list[str]]:
    rows = [["measure", *(r.name for r in replays)]]
    for key in SUMMARY_KEYS:
        values = [r.summary.get(key) for r in replays]
        if any(v is not None for v in values):
            rows.append([key, *("" if v is None else f"{v:.4g}" for v in values)])
    return rows
