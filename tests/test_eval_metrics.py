import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, recall_score, roc_auc_score

from dinov2_patho.eval.metrics import auroc, classification_metrics, quadratic_kappa


@st.composite
def predictions(draw, min_classes=2, max_classes=5):
    c = draw(st.integers(min_classes, max_classes))
    n = draw(st.integers(c, 40))
    y = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    # coarse scores create ties, which AUROC must rank as scikit-learn does (midranks)
    raw = np.array(draw(st.lists(st.integers(0, 4), min_size=n * c, max_size=n * c)), float)
    raw = raw.reshape(n, c) + 0.1
    return y, raw / raw.sum(1, keepdims=True), c


@settings(max_examples=60, deadline=None)
@given(predictions())
def test_metrics_match_scikit_learn(data):
    y, probs, c = data
    classes = [f"c{i}" for i in range(c)]
    pred = probs.argmax(1)
    with warnings.catch_warnings():  # ours: no warning a user would see, whatever the classes
        warnings.simplefilter("error")
        m = classification_metrics(y, probs, classes)
    with warnings.catch_warnings():  # the reference's notes on absent classes
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y, pred)
    assert m["balanced_accuracy"] == pytest.approx(balanced)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    recall = recall_score(y, pred, average=None, labels=np.unique(y), zero_division=0)
    for label, r in zip(np.unique(y), recall):
        assert m["per_class_recall"][classes[label]] == pytest.approx(r)
    present = np.unique(y)
    if len(present) < 2:
        assert np.isnan(m["auroc"])
    elif c == 2:
        assert m["auroc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    else:
        expected = np.mean([roc_auc_score(y == k, probs[:, k]) for k in present])
        assert m["auroc"] == pytest.approx(expected)


def test_multiclass_auroc_matches_sklearn_ovr_when_all_classes_present():
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(4), 25)
    probs = rng.dirichlet(np.ones(4), size=100)
    assert auroc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_absent_class_recall_is_nan_and_ignored_by_balanced_accuracy():
    y = np.array([0, 0, 1, 1])
    probs = np.eye(3)[[0, 1, 1, 1]]
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert np.isnan(m["per_class_recall"]["c"])
    assert m["balanced_accuracy"] == pytest.approx(0.75)


def test_absent_classes_give_nan_without_warnings_and_bad_targets_are_named():
    y = np.array([0, 0, 2, 2])
    probs = np.eye(4)[[0, 1, 2, 3]]  # predicts classes 1 and 3, which no target has
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, probs, ["a", "b", "c", "d"], ordinal=True)
    assert np.isnan(m["per_class_recall"]["b"]) and np.isnan(m["per_class_recall"]["d"])
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    with warnings.catch_warnings():  # one class in targets and predictions: kappa is undefined, quietly
        warnings.simplefilter("error")
        one = classification_metrics(np.array([2, 2, 2]), np.eye(4)[[2, 2, 2]], ["a", "b", "c", "d"],
                                     ordinal=True)
        assert np.isnan(one["quadratic_kappa"]) and np.isnan(one["auroc"])
        assert quadratic_kappa(np.array([2, 2]), np.array([1, 2]), 4) == pytest.approx(
            cohen_kappa_score([2, 2], [1, 2], labels=range(4), weights="quadratic"))
    with pytest.raises(ValueError, match=r"target 4 is not a class index in \[0, 4\)"):
        classification_metrics(np.array([0, 4]), np.eye(4)[[0, 1]], ["a", "b", "c", "d"])
