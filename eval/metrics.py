"""Classification metrics on numpy arrays, as eva and the paper report them.

Balanced accuracy is the mean per-class recall over the classes present in the targets
(scikit-learn's definition, and torchmetrics' macro MulticlassAccuracy that eva
monitors); macro F1 averages over the classes seen in the targets or the predictions,
as scikit-learn's `f1_score(average="macro")` does.
"""

from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts, rows = true class, columns = predicted."""
    idx = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall per class; NaN for a class absent from the targets."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    return float(np.nanmean(per_class_recall(confusion(y_true, y_pred, num_classes))))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    cm = confusion(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2TP + FP + FN
    f1 = 2 * tp / np.maximum(denom, 1)
    present = denom > 0
    return float(f1[present].mean())


def _binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U with midranks for ties; NaN when only one class is present."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(score.size, np.float64)
    # midrank of each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], score.size]
    mid = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mid, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC on the positive class's probability for 2 classes; otherwise the
    macro one-vs-rest AUROC over the classes present in the targets."""
    y_true = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    if probs.shape[1] == 2:
        return _binary_auroc(y_true == 1, probs[:, 1])
    scores = [_binary_auroc(y_true == c, probs[:, c]) for c in np.unique(y_true)]
    return float(np.nanmean(scores)) if len(scores) > 1 else float("nan")


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights over ordered classes 0..C-1 (PANDA's ISUP grade metric)."""
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(y_true, y_pred, labels=np.arange(num_classes), weights="quadratic"))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           classes: list[str] | tuple[str, ...], ordinal: bool = False) -> dict:
    """Every metric we report, from targets [N] and class probabilities [N, C]; for `ordinal`
    classes (listed in order) also the quadratic-weighted kappa."""
    num_classes = len(classes)
    y_pred = np.asarray(probs).argmax(axis=1)
    cm = confusion(y_true, y_pred, num_classes)
    recall = per_class_recall(cm)
    out = {
        "balanced_accuracy": float(np.nanmean(recall)),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
        "auroc": auroc(y_true, probs),
        "per_class_recall": {name: float(r) for name, r in zip(classes, recall)},
    }
    if ordinal:
        out["quadratic_kappa"] = quadratic_kappa(y_true, y_pred, num_classes)
    return out
