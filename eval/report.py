"""Results as a table (CSV, Markdown) and a bar plot of balanced accuracy."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from dinov2_patho.io import atomic_path, atomic_write_text

COLUMNS = ("benchmark", "head", "balanced_accuracy", "balanced_accuracy_std", "macro_f1", "auroc", "n_train",
           "n_eval", "eval_split", "quadratic_kappa")
# heads with one result each, in table order (kNN has one per k); the slide tasks' abmil and mean_pool
SINGLE_HEADS = ("linear", "abmil", "logreg", "mean_pool")


def summary_rows(results: dict) -> list[dict]:
    """One row per benchmark (or slide task) and head (kNN: one per k); quadratic kappa where the
    labels are ordinal, else empty."""
    rows = []
    for name, res in results.items():
        split = res["eval_split"]
        common = {"benchmark": name, "n_train": res["sizes"]["train"], "n_eval": res["sizes"][split],
                  "eval_split": split, "cv_folds": res.get("cv_folds"),
                  "unit": "slides" if "tiles_per_slide" in res else "images"}
        heads = [(head, res[head]) for head in SINGLE_HEADS[:2] if head in res]
        heads += [(f"knn_k{k}", r) for k, r in res.get("knn", {}).items()]
        heads += [(head, res[head]) for head in SINGLE_HEADS[2:] if head in res]
        for head, r in heads:
            rows.append({**common, "head": head, "balanced_accuracy": r["balanced_accuracy"],
                         "balanced_accuracy_std": r.get("balanced_accuracy_std", ""),
                         "macro_f1": r["macro_f1"], "auroc": r["auroc"],
                         "quadratic_kappa": r.get("quadratic_kappa", "")})
    return rows


# AUROC needs two classes among the scored labels (see eval.metrics.auroc): a NaN means none had
NO_AUROC = "n/a: one class in each test set"


def format_score(value, column: str = "", digits: int = 2) -> str:
    """A score in %, or why there is none."""
    if isinstance(value, float):
        if math.isnan(value):
            return NO_AUROC if column == "auroc" else "nan"
        return f"{100 * value:.{digits}f}"
    return str(value)


def _notes(rows: list[dict]) -> str:
    """What the scores and the counts are, per benchmark: a markdown list."""
    notes = []
    for name, folds, unit in dict.fromkeys((r["benchmark"], r.get("cv_folds"), r.get("unit", "images"))
                                           for r in rows):
        if folds:
            notes.append(f"{name}: {folds}-fold cross-validation by slide/patient; scores are the mean over "
                         f"the {folds} test folds, balanced_accuracy_std their spread over folds; n_train "
                         f"and n_eval are {unit} per fold (mean)")
        else:
            notes.append(f"{name}: the benchmark's own splits; n_train and n_eval are the {unit} of train "
                         f"and of eval_split")
    return "".join(f"- {note}\n" for note in notes) + "\n" if notes else ""


def write_tables(rows: list[dict], output_dir: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(output_dir / "results.csv", buf.getvalue())
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_score(row[c], c) for c in COLUMNS) + " |" for row in rows]
    atomic_write_text(output_dir / "results.md",
                      "Scores in % (balanced accuracy, macro F1, AUROC, quadratic kappa); linear and abmil: "
                      "mean ± std over runs.\n\n"
                      + _notes(rows) + "\n".join(lines) + "\n")


def write_plot(rows: list[dict], output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    heads = list(dict.fromkeys(r["head"] for r in rows))
    width = 0.8 / len(heads)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(benchmarks) + 1), 3.5))
    for h, head in enumerate(heads):
        picked = {r["benchmark"]: r for r in rows if r["head"] == head}
        xs = [b + h * width for b, name in enumerate(benchmarks) if name in picked]
        values = [100 * picked[name]["balanced_accuracy"] for name in benchmarks if name in picked]
        errors = [100 * (picked[name]["balanced_accuracy_std"] or 0) for name in benchmarks if name in picked]
        ax.bar(xs, values, width, yerr=errors, label=head)
    ax.set_xticks([b + 0.4 - width / 2 for b in range(len(benchmarks))], benchmarks)
    ax.set_ylabel("balanced accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    with atomic_path(output_dir / "results.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_results(results: dict, output_dir: Path, plot: bool, record: dict | None = None) -> dict:
    """results.json (each result with `record`, what was evaluated, when given), results.csv/.md and,
    with `plot`, results.png; returns the results as written."""
    rows = summary_rows(results)
    if record is not None:
        results = {name: {**result, "backbone": record} for name, result in results.items()}
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=1, default=str))
    write_tables(rows, output_dir)
    if plot and rows:
        write_plot(rows, output_dir)
    return results
