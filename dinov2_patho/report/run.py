"""What the report reads of a run: metrics.jsonl as columns (`read_metrics`), the sessions of log.txt
(`read_sessions`), and `RunInputs`, everything the panels draw from (gathered by `build.write_report`)."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import pyarrow.compute
import pyarrow.json

from dinov2_patho.errors import UserError
from dinov2_patho.jsonfile import complete_lines, parse_lines
from dinov2_patho.textfile import one_line
from dinov2_patho.train.metrics_log import METRICS_FILE, RECORD, RECORD_FIX, RECORD_WHAT

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


@dataclass
class RunInputs:
    """A run and what its report reads besides; each panel module's `fill_panel` draws from it."""

    run_dir: Path
    metrics: Metrics
    config: dict[str, Any]  # config.yaml ({} without one)
    sessions: list[dict[str, Any]]
    tile_index: Any  # TileIndex, or None (then `index_note` says why)
    index_note: str
    level: int | None  # the level batches and mosaics are drawn at
    embeddings: str | Path | None  # as given
    emb: np.ndarray | None  # their rows, checked against the index
    source: Any  # TileSource the tiles are drawn by, or None
    source_notes: list[str]  # why there is no source (the tree panel's first notes)
    metadata: str | Path | None
    eval_dirs: Sequence[str | Path]
    map_points: int
    mosaic_clusters: int
    tiles_per_cluster: int
    batch_steps: int
    seed: int
    progress: bool
