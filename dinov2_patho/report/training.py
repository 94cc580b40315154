"""Panel a, training: losses, schedules, throughput from metrics.jsonl; the run's sessions and config."""

from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import OmegaConf

from dinov2_patho.checkpoint_files import CHECKPOINTS
from dinov2_patho.report.figures import figure_uri, plot_series, pyplot
from dinov2_patho.report.page import Panel
from dinov2_patho.report.run import Metrics, RunInputs

LOSSES = ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss")
SCHEDULES = ("lr", "wd", "teacher_temp", "momentum")


def fill_panel(panel: Panel, run: RunInputs) -> None:
    panel.notes += run.metrics.notes
    checkpoints = sorted(p.name for p in (run.run_dir / CHECKPOINTS).glob("iter_*"))
    panel.table([["", ""], *run_facts(run.metrics, run.config, run.sessions, checkpoints)], header=False)
    for name, uri in training_figures(run.metrics).items():
        panel.figure(uri, name)
    if run.config:
        panel.preformatted("resolved config (config.yaml)", OmegaConf.to_yaml(OmegaConf.create(run.config)))
    else:
        panel.notes.append(f"no config.yaml in {run.run_dir}")


def training_figures(metrics: Metrics) -> dict[str, str]:
    """Figure name -> PNG data URI, for the series the run logged."""
    plt = pyplot()
    it = metrics.columns["iteration"]
    figures = {}
    losses = [k for k in LOSSES if metrics.get(k) is not None]
    if losses:
        fig, ax = plt.subplots(figsize=(9, 3.4))
        for key in losses:
            plot_series(ax, it, metrics.get(key), label=key)
        ax.set(xlabel="iteration", ylabel="loss", title="losses")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        figures["losses"] = figure_uri(fig)
    schedules = [k for k in SCHEDULES if metrics.get(k) is not None]
    if schedules:
        fig, axes = plt.subplots(1, len(schedules), figsize=(2.6 * len(schedules), 2.4), squeeze=False)
        for ax, key in zip(axes[0], schedules):
            plot_series(ax, it, metrics.get(key))
            ax.set(title=key, xlabel="iteration")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        figures["schedules"] = figure_uri(fig)
    curves = sorted(k for k in metrics.evals if k != "iteration")
    if curves:  # how the backbone gets better, not only the loss: the trainer's periodic evaluations
        fig, ax = plt.subplots(figsize=(9, 3.0))
        for key in curves:
            y = 100 * metrics.evals[key]
            keep = np.isfinite(y)
            ax.plot(metrics.evals["iteration"][keep], y[keep], marker="o", markersize=3,
                    linewidth=1.2, label=key.removeprefix("eval/"))
        ax.set(xlabel="iteration", ylabel="balanced accuracy (%)",
               title="learning curve: the teacher on held-out data (iteration 0: its initialisation)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        figures["learning_curve"] = figure_uri(fig)
    samples, data, total = metrics.get("samples_per_s"), metrics.get("data_time"), metrics.get("iter_time")
    if samples is not None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
        plot_series(axes[0], it, samples)
        axes[0].set(title="samples/s", xlabel="iteration")
        if data is not None and total is not None:
            plot_series(axes[1], it, 100 * data / np.maximum(total, 1e-12))
            axes[1].set(title="data time, % of the iteration", xlabel="iteration", ylim=(0, 100))
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        figures["throughput"] = figure_uri(fig)
    return figures


def run_facts(metrics: Metrics, config: dict[str, Any] | None, sessions: list[dict[str, Any]],
              checkpoints: list[str]) -> list[tuple[str, str]]:
    """(what, value) rows: how far the run got and how it got there."""
    it = metrics.columns["iteration"]
    planned = (config or {}).get("train", {}).get("iterations")
    done = int(it.max()) + 1 if len(it) else 0
    rows = [("iterations logged", f"{len(it):,}" + (f" (last {done - 1:,})" if len(it) else ""))]
    if planned is not None:
        planned = int(planned)
        share = f"{100 * done / max(planned, 1):.1f}%"
        state = "complete" if done >= planned else f"stopped at {done:,} of {planned:,} ({share})"
        rows.append(("run", state))
    for event in sessions:
        detail = f"at iteration {event['iteration']:,}"
        if "ranks" in event:
            detail += f", global batch {event['global_batch']}, {event['ranks']} rank(s)"
        rows.append((f"{event['event']} {event['time']}", detail))
    rows.append(("checkpoints", ", ".join(checkpoints) if checkpoints else "none"))
    if len(it):
        for key in ("total_loss", "samples_per_s"):
            column = metrics.get(key)
            if column is not None:
                tail = column[-min(len(column), 100):]
                rows.append((f"{key}, last {len(tail)} iterations", f"{np.nanmean(tail):.4g}"))
    return rows
