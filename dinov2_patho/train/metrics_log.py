"""Per-iteration metrics: one JSON line each in `metrics.jsonl`, TensorBoard scalars
when tensorboard is installed, and a progress line every few iterations (rank 0)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from dinov2_patho.io import atomic_write_text
from dinov2_patho.jsonfile import read_json_lines
from dinov2_patho.logging import get_logger

log = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"
RECORD = {"iteration": int}
RECORD_WHAT = "metrics record (a JSON object with an integer 'iteration')"
RECORD_FIX = "delete that line, or the file (its log then starts afresh), and run again"


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] when there is none). A last line cut short by a killed run
    (SIGKILL, a SLURM requeue) is left out with a warning; any other bad line is a one-line error."""
    path = Path(path)
    if not path.is_file():
        return []
    return read_json_lines(path, RECORD_WHAT, RECORD_FIX, shape=RECORD)


class MetricsWriter:
    """Appends one record per iteration. A resumed run first drops the records of the
    iterations it is about to redo (those after its checkpoint), so the file reads as
    one uninterrupted run."""

    def __init__(self, output_dir: str | Path, *, start_iteration: int, total_iterations: int,
                 log_every: int, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.total = total_iterations
        self.log_every = max(1, log_every)
        self.path = Path(output_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        self._t0 = time.perf_counter()
        self._start = start_iteration
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path)  # a start from 0 keeps nothing (the -1 record either)
                if start_iteration > 0 and r.get("iteration", -1) < start_iteration]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the whole run, closed in close()
        if tensorboard:
            self._tb = _tensorboard_writer(Path(output_dir) / "tensorboard")

    def write(self, record: dict[str, Any], progress: bool = True) -> None:
        """Append `record`; with `progress`, an iteration's record, the progress line when due."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        it = int(record["iteration"])
        if self._tb is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, it)
        if progress and ((it + 1) % self.log_every == 0 or it + 1 == self.total or it == self._start):
            self._progress(record)

    def _progress(self, r: dict[str, Any]) -> None:
        it = int(r["iteration"])
        done = it + 1 - self._start
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.total - it - 1) if done > 0 else float("nan")
        losses = "  ".join(f"{k}={r[k]:.4f}" for k in sorted(r) if k.endswith("loss"))
        log.info(
            "it %d/%d  %s  lr=%.3g wd=%.3g mom=%.5f temp=%.4f  %.1f samples/s  data %.0f%%  eta %s",
            it + 1, self.total, losses, r["lr"], r["wd"], r["momentum"], r["teacher_temp"],
            r["samples_per_s"], 100 * r["data_time"] / max(r["iter_time"], 1e-9), _fmt_eta(eta),
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
