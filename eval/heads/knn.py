"""Weighted kNN on cosine similarity, as DINO/DINOv2 evaluate: each of the k nearest
training features votes for its class with weight exp(similarity / T)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dinov2_patho.logging import get_logger

from ..metrics import classification_metrics

log = get_logger(__name__)


def knn_probs(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int, k: int,
              temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Class probabilities [N_test, C]: normalised temperature-weighted votes."""
    # Features are often read-only memmaps of the feature cache, which torch cannot wrap (it warns);
    # np.require copies only what is not already writable float32 / int64 (fp16 caches: a copy anyway).
    train = F.normalize(torch.from_numpy(np.require(x_train, np.float32, "W")), dim=1)
    labels = torch.from_numpy(np.require(y_train, np.int64, "W"))
    test = F.normalize(torch.from_numpy(np.require(x_test, np.float32, "W")), dim=1)
    k = min(k, train.shape[0])
    out = torch.empty(test.shape[0], num_classes)
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes).scatter_add_(1, labels[idx], weights)
        out[start:start + chunk] = votes / votes.sum(1, keepdim=True)
    return out.numpy()


def knn_classify(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 classes: list[str], ks: tuple[int, ...] = (10, 20, 100, 200),
                 temperature: float = 0.07) -> dict[int, dict]:
    """Metrics and test `predictions` for each k (a k above the training images counts them all,
    said in a warning)."""
    too_large = [k for k in ks if k > len(train[1])]
    if too_large:
        log.warning("kNN: k=%s exceed the %d training images: each votes with all %d",
                    ", ".join(map(str, too_large)), len(train[1]), len(train[1]))
    results = {}
    for k in ks:
        probs = knn_probs(train[0], train[1], test[0], len(classes), k, temperature)
        results[k] = {**classification_metrics(test[1], probs, classes),
                      "predictions": np.asarray(probs).argmax(axis=1)}
    return results
