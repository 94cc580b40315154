"""Heads trained on frozen features: eva's linear probe, kNN, logistic regression."""

from dinov2_patho.eval.heads.knn import knn_classify
from dinov2_patho.eval.heads.linear import LinearProbeConfig, linear_probe, train_linear_probe
from dinov2_patho.eval.heads.logreg import logistic_regression

__all__ = ["LinearProbeConfig", "knn_classify", "linear_probe", "logistic_regression", "train_linear_probe"]
