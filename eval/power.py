"""How sure a comparison of backbones is: bootstrap intervals over slides, paired differences, and the
minimum detectable effect.

Tiles of one slide share its stain and its tissue layout, so they are not independent draws: every
interval here resamples whole slides (a cluster bootstrap), never single tiles. Two backbones scored on
the same out-of-fold predictions are compared paired: the same resampled slides score both, so what a
slide makes easy for one it makes easy for the other and only the difference varies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05  # two-sided
POWER = 0.8


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % interval and standard error (all in the metric's units)."""

    value: float
    low: float
    high: float
    se: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "se": self.se}


def _group_counts(y: np.ndarray, hits: np.ndarray, groups: np.ndarray, num_classes: int):
    """Per slide and class: tiles and correct predictions, [G, C] each."""
    _, g = np.unique(groups, return_inverse=True)
    n_groups = int(g.max()) + 1 if len(g) else 0
    total = np.zeros((n_groups, num_classes))
    correct = np.zeros((n_groups, num_classes))
    np.add.at(total, (g, y), 1.0)
    np.add.at(correct, (g, y), hits.astype(np.float64))
    return total, correct


def _balanced_accuracy(total: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Balanced accuracy of slide-weighted counts: total/correct [B, C] -> [B] (classes a resample
    lacks are left out of its mean, as balanced_accuracy does for a class absent from a test set)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = correct / total
    return np.nanmean(recall, axis=-1)


def _resample_weights(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, G]: how many times each slide is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    weights = np.zeros((n_boot, n_groups))
    np.add.at(weights, (np.arange(n_boot)[:, None], draws), 1.0)
    return weights


def _interval(point: float, boot: np.ndarray) -> Interval:
    boot = boot[np.isfinite(boot)]
    low, high = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    return Interval(float(point), float(low), float(high), float(boot.std(ddof=1)))


def bootstrap_balanced_accuracy(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, num_classes: int,
                                n_boot: int = 2000, seed: int = 0) -> Interval:
    """Balanced accuracy of `pred` against `y` with its 95 % percentile interval, slides resampled."""
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    total, correct = _group_counts(y, pred == y, np.asarray(groups), num_classes)
    weights = _resample_weights(len(total), n_boot, seed)
    boot = _balanced_accuracy(weights @ total, weights @ correct)
    return _interval(_balanced_accuracy(total.sum(0), correct.sum(0)).item(), boot)


def paired_bootstrap_difference(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, groups: np.ndarray,
                                num_classes: int, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Balanced accuracy of a minus that of b on the same tiles, with its 95 % interval from one set
    of resampled slides scoring both."""
    y = np.asarray(y, np.int64)
    groups = np.asarray(groups)
    total, correct_a = _group_counts(y, np.asarray(pred_a) == y, groups, num_classes)
    _, correct_b = _group_counts(y, np.asarray(pred_b) == y, groups, num_classes)
    weights = _resample_weights(len(total), n_boot, seed)
    boot_total = weights @ total
    boot = _balanced_accuracy(boot_total, weights @ correct_a) - _balanced_accuracy(boot_total,
                                                                                     weights @ correct_b)
    point = (_balanced_accuracy(total.sum(0), correct_a.sum(0))
             - _balanced_accuracy(total.sum(0), correct_b.sum(0))).item()
    return _interval(point, boot)


def minimum_detectable_effect(se: float, dof: int | None = None) -> float:
    """The smallest true difference a two-sided test at ALPHA finds with probability POWER, given the
    standard error of the estimated difference: (z_{1-α/2} + z_{power}) · se, with Student's t
    quantiles when the se comes from `dof` degrees of freedom (e.g. n seeds - 1)."""
    if dof is None:
        return float((stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)) * se)
    return float((stats.t.ppf(1 - ALPHA / 2, dof) + stats.t.ppf(POWER, dof)) * se)


def paired_seed_differences(a: list[float], b: list[float]) -> dict[str, float]:
    """Per-seed paired differences a - b: mean, their standard error, min, max, the 95 % t interval of
    the mean, the minimum detectable effect at this many seeds, and whether every seed agrees."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1) * se) if n > 1 else float("nan")
    return {"n": n, "mean": float(d.mean()), "se": se, "low": float(d.mean() - half),
            "high": float(d.mean() + half), "min": float(d.min()), "max": float(d.max()),
            "mde": minimum_detectable_effect(se, n - 1) if n > 1 else float("nan"),
            "all_positive": bool((d > 0).all()), "all_negative": bool((d < 0).all())}
