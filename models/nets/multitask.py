"""Click and conversion tasks: which towers a model has, their losses and their metrics.

The decomposition (../shared/papers/multitask-rnn.md, the ESMM idea):

    P(click ∧ conversion | impression) = P(click | impression) · P(conversion | click, impression)
    pCTCVR                             = pCTR                  · pCVR

A model's `tasks` say which towers sit on its shared representation; its logits have one
column per task, in this order:

* `("ctr",)`: the click model (every model's default).
* `("ctr", "cvr")`: the multi-task model. Both towers read the same user/item representation;
  the loss is BCE(pCTR, click) + BCE(pCTR·pCVR, click ∧ conversion), both over ALL impressions,
  so the CVR tower is never trained on the clicked subsample alone (no sample-selection bias,
  no starvation) and pCVR is only ever supervised through the product.
* `("cvr",)`: the conventional conversion model, trained on clicked impressions only with the
  conversion as its label. It is the baseline the multi-task model is measured against
  (pCTR of a `("ctr",)` model × pCVR of this one), not something to serve.

Decisions ([proposal]):
* The CTCVR term is computed in log space, log(1 − σ(a)σ(b)) = logsumexp(0, a, b) −
  softplus(a) − softplus(b), which stays finite where 1 − pCTR·pCVR rounds to 0 in float32.
* The two loss terms have weight 1 each, as in the paper's L(θ_click, θ_conversion).
* Early stopping of a multi-task model selects on the mean of the validation CTR AUC and
  CTCVR AUC (`selection`): both probabilities are served, and ranking by expected value uses
  the product.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.training.metrics import auc, logloss

CTR, CVR = "ctr", "cvr"
TASK_CHOICES: tuple[tuple[str, ...], ...] = ((CTR,), (CTR, CVR), (CVR,))


def validate_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """The tasks as a tuple; ValueError names the accepted combinations."""
    chosen = tuple(tasks)
    if chosen not in TASK_CHOICES:
        accepted = ", ".join(",".join(choice) for choice in TASK_CHOICES)
        raise ValueError(f"tasks must be one of {accepted}; got {','.join(chosen) or 'nothing'}")
    return chosen


def needs_conversions(tasks: Sequence[str]) -> bool:
    return CVR in tasks


def log1m_product_sigmoid(a: Tensor, b: Tensor) -> Tensor:
    """log(1 − σ(a)·σ(b)), exactly, from 1 − σ(a)σ(b) = (1 + e^a + e^b) / ((1 + e^a)(1 + e^b))."""
    zero = torch.zeros_like(a)
    return torch.logsumexp(torch.stack([zero, a, b]), dim=0) - F.softplus(a) - F.softplus(b)


def ctcvr_bce(ctr_logit: Tensor, cvr_logit: Tensor, target: Tensor) -> Tensor:
    """Mean BCE of pCTCVR = σ(ctr)·σ(cvr) against click ∧ conversion, in log space."""
    log_p = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    log_q = log1m_product_sigmoid(ctr_logit, cvr_logit)
    return -(target * log_p + (1.0 - target) * log_q).mean()


def task_losses(
    logits: Tensor, click: Tensor, conversion: Tensor | None, tasks: Sequence[str]
) -> dict[str, Tensor]:
    """logits [B, T] (one column per task) -> the named loss terms to add up.

    For `("cvr",)` the rows must already be clicked impressions (the task filters them).
    """
    if needs_conversions(tasks) and conversion is None:
        raise ValueError("the model has a conversion task but the batch has no conversions")
    if tuple(tasks) == (CTR,):
        return {CTR: F.binary_cross_entropy_with_logits(logits[:, 0], click)}
    assert conversion is not None
    if tuple(tasks) == (CVR,):
        return {CVR: F.binary_cross_entropy_with_logits(logits[:, 0], conversion)}
    return {
        CTR: F.binary_cross_entropy_with_logits(logits[:, 0], click),
        "ctcvr": ctcvr_bce(logits[:, 0], logits[:, 1], click * conversion),
    }


def task_metrics(
    probs: np.ndarray, click: np.ndarray, conversion: np.ndarray | None, tasks: Sequence[str]
) -> dict[str, float]:
    """probs [n, T] -> {"auc", "logloss", "n"} of the first task, plus the conversion metrics.

    * CTR first: auc/logloss over all rows against the click.
    * CVR first (the baseline): auc/logloss over the clicked rows against the conversion.
    * With a CVR tower and conversions: `cvr_auc` over the clicked rows; with both towers also
      `ctcvr_auc`/`ctcvr_logloss` of pCTR·pCVR over all rows and `selection` (see above).
    """
    clicked = click > 0.5
    first = probs[:, 0]
    if tasks[0] == CTR:
        metrics = {"auc": auc(click, first), "logloss": logloss(click, first), "n": int(click.size)}
    else:
        target = conversion[clicked] if conversion is not None else np.zeros(0)
        y, p = target, first[clicked]
        metrics = {"auc": auc(y, p), "logloss": logloss(y, p), "n": int(y.size)}
    if conversion is None or CVR not in tasks:
        return metrics
    pcvr = probs[:, list(tasks).index(CVR)]
    metrics["cvr_auc"] = auc(conversion[clicked], pcvr[clicked])
    if CTR in tasks:
        ctcvr = first * pcvr
        metrics["ctcvr_auc"] = auc(conversion, ctcvr)
        metrics["ctcvr_logloss"] = logloss(conversion, ctcvr)
        metrics["selection"] = (metrics["auc"] + metrics["ctcvr_auc"]) / 2
    return metrics


def selection_labels(
    click: np.ndarray, conversion: np.ndarray | None, tasks: Sequence[str]
) -> dict[str, np.ndarray]:
    """The labels of the AUCs that early stopping ranks epochs by (`auc`, or the `selection`
    mean of `task_metrics`), keyed by the file column each comes from."""
    if not needs_conversions(tasks):
        return {"label": click}
    if conversion is None:
        raise ValueError("the model has a conversion task but there are no conversions")
    if tuple(tasks) == (CVR,):
        return {"conversion": conversion[click > 0.5]}  # over the clicked rows only
    return {"label": click, "conversion": click * conversion}
