"""Panel a, training: losses, schedules, throughput from metrics.jsonl; the run's sessions and config."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import pyarrow.compute
import pyarrow.json

from dinov2_patho.errors import UserError
from dinov2_patho.jsonfile import complete_lines, parse_lines
from dinov2_patho.report.figures import figure_uri, plot_series, pyplot
from dinov2_patho.textfile import one_line
from dinov2_patho.train.metrics_log import METRICS_FILE, RECORD, RECORD_FIX, RECORD_WHAT

LOSSES = ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss")
SCHEDULES = ("lr", "wd", "teacher_temp", "momentum")
# The trainer logs one line per (re)start; a start after iteration 0 is a resume.
_SESSION = re.compile(r"^(\S+) .*training iterations (\d+)\.\.(\d+), global batch (\d+) over (\d+) rank")
_STOP = re.compile(r"^(\S+) .*stop requested: checkpoint (\S+) written, leaving at iteration (\d+)")


@dataclass
class Metrics:
    """metrics.jsonl as one float column per key (NaN where a record lacks the key)."""

    columns: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    evals: dict[str, np.ndarray] = field(default_factory=dict)  # learning curve: "iteration", "eval/..."

    def __len__(self) -> int:
        return len(self.columns.get("iteration", ()))

    def get(self, key: str) -> np.ndarray | None:
        column = self.columns.get(key)
        return None if column is None or not np.isfinite(column).any() else column


def read_metrics(run_dir: Path) -> Metrics:
    """Every complete record of RUN_DIR/metrics.jsonl. A last line cut short by a killed run is left
    out with a note; a bad line before it is an error naming the line.

    pyarrow parses the file (a 170k-iteration run is 150 MB: 5x faster than json.loads per line); when
    it refuses, the lines are parsed one by one to name the bad one."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}: not a training run directory (or it never "
                        f"reached its first iteration)")
    data, note = complete_lines(path, RECORD_WHAT, RECORD_FIX)
    notes = [] if note is None else [note]
    if not data.strip():
        return Metrics({"iteration": np.empty(0)}, notes)
    try:
        table, error = pyarrow.json.read_json(io.BytesIO(data)), "no integer 'iteration' in some record"
    except pyarrow.ArrowException as e:
        table, error = None, one_line(e)
    if table is None or "iteration" not in table.column_names or table["iteration"].null_count \
            or not pyarrow.types.is_integer(table["iteration"].type):
        parse_lines(path, data, RECORD_WHAT, RECORD_FIX, shape=RECORD)  # names the first bad line
        raise UserError(f"{path}: metrics records pyarrow cannot read as columns ({error}); {RECORD_FIX}")
    columns = {}
    for name in table.column_names:
        column = table[name]
        if pyarrow.types.is_integer(column.type) or pyarrow.types.is_floating(column.type):
            columns[name] = pyarrow.compute.cast(column, pyarrow.float64()).to_numpy(zero_copy_only=False)
    # the trainer's periodic evaluations (learning_curve_record) are rows of their own, not iterations
    is_eval = np.isfinite(columns.pop("eval_iteration", np.full(len(table), np.nan)))
    evals = {k: v[is_eval] for k, v in columns.items() if k.startswith("eval/")}
    if evals:
        evals["iteration"] = columns["iteration"][is_eval] + 1
    columns = {k: v[~is_eval] for k, v in columns.items() if not k.startswith("eval/")}
    return Metrics(columns, notes, evals)


def read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    """Starts and requested stops of the run, in log order, from RUN_DIR/log.txt."""
    log = run_dir / "log.txt"
    if not log.is_file():
        return []
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if m := _SESSION.match(line):
            start, end, batch, ranks = map(int, m.group(2, 3, 4, 5))
            events.append({"time": m.group(1), "event": "resumed" if start else "started", "iteration": start,
                           "until": end, "global_batch": batch, "ranks": ranks})
        elif m := _STOP.match(line):
            events.append({"time": m.group(1), "event": "stopped (requested)", "iteration": int(m.group(3)),
                           "checkpoint": m.group(2)})
    return events


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
