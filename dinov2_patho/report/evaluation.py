"""Panel e, evaluation: the tables and plots that `eval run` (and `eval slide`) wrote under the run."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

from dinov2_patho.report.page import Panel
from dinov2_patho.report.run import RunInputs
from dinov2_patho.textfile import open_text

SCORES = ("balanced_accuracy", "balanced_accuracy_std", "macro_f1", "auroc", "kappa", "quadratic_kappa")


def fill_panel(panel: Panel, run: RunInputs) -> None:
    found = find_results([run.run_dir, *map(Path, run.eval_dirs)])
    if not found:
        panel.notes.append(f"no evaluation results (results.csv of `eval run`) under {run.run_dir}"
                           + "".join(f" or {p}" for p in run.eval_dirs))
    for directory in found:
        for name, rows, plot in result_tables(directory):
            panel.heading(f"{directory} / {name} (scores in %)")
            panel.table(rows)
            panel.figure(plot, name)


def find_results(roots: list[Path]) -> list[Path]:
    """Directories holding a results CSV, under any of `roots`, sorted, each once."""
    found = {p.parent.resolve(): p.parent for root in roots if root.is_dir()
             for p in root.rglob("*results*.csv")}
    return [found[k] for k in sorted(found)]


def _cell(column: str, value: str) -> str:
    if column in SCORES:
        try:
            return f"{100 * float(value):.2f}"
        except ValueError:
            return value
    return value


def result_tables(directory: Path) -> list[tuple[str, list[list[str]], str | None]]:
    """(csv name, rows with a header row, PNG data URI of the same-stem plot or None) per results CSV."""
    out = []
    for path in sorted(directory.glob("*results*.csv")):
        with open_text(path) as f:
            rows = list(csv.reader(f))
        if not rows:
            continue
        header = rows[0]
        body = [[_cell(c, v) for c, v in zip(header, row)] for row in rows[1:]]
        plot = path.with_suffix(".png")
        uri = ("data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode("ascii")
               if plot.is_file() else None)
        out.append((path.name, [header, *body], uri))
    return out
