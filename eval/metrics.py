"""Classification metrics on numpy arrays, as eva and the paper report them: scikit-learn's,
behind a thin wrapper that fixes the class set and gives NaN for a class absent from the targets.

Balanced accuracy is the mean per-class recall over the classes present in the targets
(scikit-learn's definition, and torchmetrics' macro MulticlassAccuracy that eva
monitors); macro F1 averages over the classes seen in the targets or the predictions,
as scikit-learn's `f1_score(average="macro")` does.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import cohen_kappa_score, f1_score, recall_score, roc_auc_score


def _targets(y_true: np.ndarray, num_classes: int) -> np.ndarray:
    y_true = np.asarray(y_true, np.int64)
    bad = (y_true < 0) | (y_true >= num_classes)
    if bad.any():
        raise ValueError(f"target {int(y_true[np.argmax(bad)])} is not a class index in [0, {num_classes})")
    return y_true


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class 0..C-1; NaN for a class absent from the targets."""
    return recall_score(_targets(y_true, num_classes), y_pred, labels=np.arange(num_classes), average=None,
                        zero_division=np.nan)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    return float(np.nanmean(per_class_recall(y_true, y_pred, num_classes)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    return float(f1_score(_targets(y_true, num_classes), y_pred, average="macro", zero_division=0))


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC on the positive class's probability for 2 classes; otherwise the
    macro one-vs-rest AUROC over the classes present in the targets. NaN when the targets
    hold fewer than two classes (scikit-learn raises there)."""
    probs = np.asarray(probs, np.float64)
    y_true = _targets(y_true, probs.shape[1])
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y_true == 1, probs[:, 1]))
    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in present]))


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights over ordered classes 0..C-1 (PANDA's ISUP grade metric).
    NaN when targets and predictions hold one class between them (chance agreement is then total;
    scikit-learn warns there)."""
    y_true = _targets(y_true, num_classes)
    if len(np.union1d(y_true, y_pred)) < 2:
        return float("nan")
    return float(cohen_kappa_score(y_true, y_pred, labels=np.arange(num_classes), weights="quadratic"))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           classes: list[str] | tuple[str, ...], ordinal: bool = False) -> dict:
    """Every metric we report, from targets [N] and class probabilities [N, C]; for `ordinal`
    classes (listed in order) also the quadratic-weighted kappa."""
    num_classes = len(classes)
    y_pred = np.asarray(probs).argmax(axis=1)
    recall = per_class_recall(y_true, y_pred, num_classes)
    out = {
        "balanced_accuracy": float(np.nanmean(recall)),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
        "auroc": auroc(y_true, probs),
        "per_class_recall": {name: float(r) for name, r in zip(classes, recall)},
    }
    if ordinal:
        out["quadratic_kappa"] = quadratic_kappa(y_true, y_pred, num_classes)
    return out
