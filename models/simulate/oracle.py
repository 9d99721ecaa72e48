"""The oracle: test metrics of the TRUE click probabilities, the ceiling no model can pass.

* Behaviour: AUC and LogLoss of p against the labels of the test users' samples; for the
  conversions, `cvr_auc` of q against the conversions of the clicked test samples (the CVR
  task is defined on clicks), `ctcvr_auc` / `ctcvr_logloss` of p · q against the conversions
  of all test samples (the ESMM task over impressions), and the rates `cvr` (conversions per
  click) and `ctcvr` (conversions per impression).
* Slates (the NCM protocol): AUC of p over the items of the last `slate_eval_fraction` of the
  slates of each test session (the first ⌊0.8·S⌋ slates are context), and F1 of the click
  class and accuracy at the threshold that maximises F1 on the training sessions' true
  probabilities (grid 0.01..0.99), as the NCM benchmark fits its threshold on training
  predictions. Decision: that threshold is fitted on every slate of the training sessions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.ncm.metrics import f1_accuracy, fit_threshold
from models.simulate.behavior import BehaviorLog
from models.simulate.config import SimulationConfig
from models.simulate.slates import SlateLog
from models.training.metrics import auc, logloss


def context_slates(config: SimulationConfig) -> int:
    """Number of leading slates per session that are context, never evaluated: ⌊0.8·S⌋."""
    s = config.slates_per_session
    n_ctx = int(np.floor(round((1.0 - config.slate_eval_fraction) * s, 9)))
    return min(max(n_ctx, 1), s - 1)


def behavior_oracle(log: BehaviorLog, is_test: np.ndarray) -> dict[str, Any]:
    """AUC/LogLoss of the true probabilities on the test users' samples."""
    return behavior_metrics(*held_out_truth(log, is_test))


def held_out_truth(log: BehaviorLog, is_test: np.ndarray) -> tuple[np.ndarray, ...]:
    """(label, p, conversion, q) of the test users' samples."""
    test = is_test[log.user]
    return log.label[test], log.prob[test], log.conversion[test], log.conversion_prob[test]


def behavior_metrics(
    y: np.ndarray, p: np.ndarray, conversion: np.ndarray, q: np.ndarray
) -> dict[str, Any]:
    """The behaviour oracle of test samples' labels, conversions and true probabilities."""
    return {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "n": len(y),
        "ctr": _rate(y),
        **_conversion_oracle(y, p, conversion, q),
    }


def _conversion_oracle(
    y: np.ndarray, p: np.ndarray, conversion: np.ndarray, q: np.ndarray
) -> dict[str, Any]:
    clicked = y == 1
    ctcvr_prob = p * q
    return {
        "cvr_auc": auc(conversion[clicked], q[clicked]),
        "ctcvr_auc": auc(conversion, ctcvr_prob),
        "ctcvr_logloss": logloss(conversion, ctcvr_prob),
        "cvr": _rate(conversion[clicked]),
        "ctcvr": _rate(conversion),
        "n_clicks": int(clicked.sum()),
        "n_conversions": int(conversion.sum()),
    }


def _rate(y: np.ndarray) -> float:
    return float(y.mean()) if len(y) else float("nan")


def slate_oracle(log: SlateLog, is_test: np.ndarray, config: SimulationConfig) -> dict[str, Any]:
    """AUC/F1/accuracy of the true probabilities on the evaluated slates of test sessions."""
    session_test = np.repeat(is_test, config.sessions_per_user)  # [Q]
    return slate_metrics_of(log.clicks, log.probs, session_test, config)


def slate_metrics_of(
    clicks: np.ndarray, probs: np.ndarray, session_test: np.ndarray, config: SimulationConfig
) -> dict[str, Any]:
    """The slate oracle of sessions' clicks and true probabilities [Q, S, K], test mask [Q]."""
    train_y = clicks[~session_test].ravel()
    train_p = probs[~session_test].ravel()
    threshold = fit_threshold(train_y, train_p)
    evaluated = slice(context_slates(config), None)
    y = clicks[session_test, evaluated].ravel()
    p = probs[session_test, evaluated].ravel()
    f1, accuracy = f1_accuracy(y, p, threshold)
    return {
        "auc": auc(y, p),
        "f1": f1,
        "accuracy": accuracy,
        "n": int(y.size),
        "threshold": threshold,
        "ctr": float(y.mean()) if y.size else float("nan"),
    }
