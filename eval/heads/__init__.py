"""Heads trained on frozen features: eva's linear probe, kNN, logistic regression."""

from .knn import knn_classify
from .linear import LinearProbeConfig, linear_probe, train_linear_probe
from .logreg import logistic_regression

__all__ = ["LinearProbeConfig", "knn_classify", "linear_probe", "logistic_regression", "train_linear_probe"]
