"""Offline metrics on numpy arrays: ROC-AUC and LogLoss (the SARN paper's Table II pair)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

LOGLOSS_EPS = 1e-7  # probabilities are clipped to [eps, 1 − eps] so one confident miss is finite


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Exact ROC-AUC; tied scores count one half (the Mann-Whitney statistic).

    Scores may be probabilities or logits (AUC only depends on their order). With a single
    class the AUC is undefined and NaN is returned rather than an exception, so that an epoch
    on a degenerate split still logs.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if y.size == 0 or np.all(y == y[0]):
        return float("nan")
    return float(roc_auc_score(y, s))


def logloss(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean binary cross-entropy of probabilities, clipped to [LOGLOSS_EPS, 1 − LOGLOSS_EPS]."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), LOGLOSS_EPS, 1 - LOGLOSS_EPS)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probs {p.shape} differ in length")
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
