"""results.md says what its scores and counts are: cross-validation means, or the benchmark's splits."""

from __future__ import annotations

import csv

from dinov2_patho.eval.report import COLUMNS, summary_rows, write_tables


def _head(acc: float) -> dict:
    return {"balanced_accuracy": acc, "balanced_accuracy_std": 0.01, "macro_f1": acc, "auroc": acc}


def test_results_md_says_when_scores_are_cross_validation_means_and_what_n_eval_counts(tmp_path):
    results = {
        "crc": {"eval_split": "test", "sizes": {"train": 80, "val": 10, "test": 20}, "linear": _head(0.9)},
        "synthetic": {"eval_split": "test", "sizes": {"train": 200, "val": 50, "test": 50}, "cv_folds": 4,
                      "linear": _head(0.8), "logreg": _head(0.7)},
    }
    write_tables(summary_rows(results), tmp_path)
    text = (tmp_path / "results.md").read_text()
    cv_note = ("- synthetic: 4-fold cross-validation by slide/patient; scores are the mean over the 4 test "
               "folds, balanced_accuracy_std their spread over folds; n_train and n_eval are images per fold "
               "(mean)\n")
    splits_note = ("- crc: the benchmark's own splits; n_train and n_eval are the images of train and of "
                   "eval_split\n")
    assert cv_note in text and splits_note in text
    assert text.count("- synthetic:") == 1  # one note per benchmark, not per head
    header = next(csv.reader((tmp_path / "results.csv").read_text().splitlines()))
    assert tuple(header) == COLUMNS


def test_slide_results_count_slides_and_say_why_an_auroc_is_missing(tmp_path):
    # a 4-slide cohort in 4 folds: one slide, so one class, in each test set
    results = {"cohort": {"eval_split": "test", "sizes": {"train": 2, "val": 1, "test": 1}, "cv_folds": 4,
                          "tiles_per_slide": 60.0, "abmil": {**_head(0.5), "auroc": float("nan")}}}
    write_tables(summary_rows(results), tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "n_train and n_eval are slides per fold (mean)" in text  # said "images"
    row = next(line for line in text.splitlines() if line.startswith("| cohort | abmil |"))
    assert row.split(" | ")[COLUMNS.index("auroc")] == "n/a: one class in each test set"  # was a bare nan
    assert "images" not in text
