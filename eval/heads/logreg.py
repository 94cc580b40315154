"""scikit-learn logistic regression on standardised features, C chosen on a held-out split."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..metrics import balanced_accuracy, classification_metrics

# Features of at most this many values (rows x dimensions) are fitted on one BLAS thread: L-BFGS is then a
# chain of small matrix products, for which waking threads costs more than they save (the demo's 2,544 x 96:
# 10x faster on one; benchmarks/logreg_threads.py), and the result no longer depends on the thread count.
ONE_THREAD_VALUES = 1 << 22


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    with threadpool_limits(limits=1 if x.size <= ONE_THREAD_VALUES else None, user_api="blas"):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter)).fit(x, y)


def _probs(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    # classes missing from the training labels get probability 0
    probs = np.zeros((x.shape[0], num_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    return probs


def logistic_regression(train: tuple[np.ndarray, np.ndarray], heldout: tuple[np.ndarray, np.ndarray],
                        test: tuple[np.ndarray, np.ndarray], classes: list[str],
                        cs: tuple[float, ...] = tuple(10.0 ** np.arange(-4, 5)),
                        max_iter: int = 1000, ordinal: bool = False) -> dict:
    """Sweep C on `heldout` by balanced accuracy, refit on train + heldout, score `test` (with the
    quadratic kappa for `ordinal` classes); also the test `predictions`."""
    sweep = {}
    for c in cs:
        pred = _fit(*train, c, max_iter).predict(heldout[0])
        sweep[float(c)] = balanced_accuracy(heldout[1], pred, len(classes))
    best_c = max(sweep, key=lambda c: (sweep[c], -c))  # ties: the stronger regularisation
    x = np.concatenate([train[0], heldout[0]])
    y = np.concatenate([train[1], heldout[1]])
    model = _fit(x, y, best_c, max_iter)
    probs = _probs(model, test[0], len(classes))
    return {**classification_metrics(test[1], probs, classes, ordinal), "C": best_c, "sweep": sweep,
            "predictions": probs.argmax(axis=1)}
