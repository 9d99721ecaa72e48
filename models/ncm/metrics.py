"""Slate metrics of MODELS.md §3.9: ROC-AUC, and F1 (click class) and accuracy at a threshold.

The threshold is the one that maximises F1 on *training* predictions, searched on the
authors' grid 0.01, 0.02, ..., 0.99 (a prediction is a click when its probability is ≥ the
threshold); it is then applied unchanged to the test predictions. AUC and LogLoss come from
`models.training.metrics`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from models.training.metrics import auc, logloss

THRESHOLD_GRID = np.round(np.arange(1, 100) / 100.0, 2)  # 0.01 .. 0.99


def f1_curve(labels: ArrayLike, probs: ArrayLike, grid: np.ndarray = THRESHOLD_GRID) -> np.ndarray:
    """F1 of the positive class at every threshold of `grid` -> [len(grid)] (0 when undefined)."""
    y, p = _arrays(labels, probs)
    order = np.argsort(p, kind="stable")
    sorted_p, sorted_y = p[order], y[order]
    # Positives among predictions < threshold, by prefix sums over the sorted probabilities.
    below = np.searchsorted(sorted_p, grid, side="left")  # [G] predictions under the threshold
    positives_below = np.concatenate([[0.0], np.cumsum(sorted_y)])[below]
    total_pos = float(sorted_y.sum())
    true_pos = total_pos - positives_below
    predicted_pos = p.size - below
    denominator = predicted_pos + total_pos  # 2TP + FP + FN
    return np.where(denominator > 0, 2 * true_pos / np.maximum(denominator, 1), 0.0)


def fit_threshold(labels: ArrayLike, probs: ArrayLike, grid: np.ndarray = THRESHOLD_GRID) -> float:
    """The grid threshold with the highest F1 (the smallest one on ties)."""
    return float(grid[int(np.argmax(f1_curve(labels, probs, grid)))])


def f1_accuracy(labels: ArrayLike, probs: ArrayLike, threshold: float) -> tuple[float, float]:
    """-> (F1 of the click class, accuracy) with clicks predicted where prob ≥ threshold."""
    y, p = _arrays(labels, probs)
    predicted = p >= threshold
    true_pos = float(np.sum(predicted & (y == 1)))
    denominator = float(predicted.sum() + y.sum())
    f1 = 2 * true_pos / denominator if denominator > 0 else 0.0
    accuracy = float(np.mean(predicted == (y == 1))) if y.size else float("nan")
    return f1, accuracy


def slate_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float) -> dict[str, float]:
    """-> {"auc", "logloss", "f1", "accuracy", "threshold", "n"} over the target positions."""
    y, p = _arrays(labels, probs)
    f1, accuracy = f1_accuracy(y, p, threshold)
    return {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "f1": f1,
        "accuracy": accuracy,
        "threshold": float(threshold),
        "n": int(y.size),
    }


def _arrays(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probs {p.shape} differ in length")
    return y, p
