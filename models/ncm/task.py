"""The slate training task (a `models.training.loop.TrainingTask`) and the slate evaluation.

* Loss: BCE-with-logits over every valid position of every slate (MODELS.md §3.9), plus the
  auxiliary losses a model's `forward_train` returns (AdvNCM).
* Evaluation (§3.9): the last 20% of slates of each session are the targets, the earlier
  slates their context (`models.ncm.data`). AUC and LogLoss need no threshold; F1 and accuracy
  use the model's `click_threshold`.
* The threshold: every time the task evaluates (each epoch), it first predicts a fixed sample
  of *training* sessions under the same protocol, takes the F1-maximising grid threshold and
  stores it in the model's `click_threshold` buffer, so the selected epoch's checkpoint carries
  its own threshold and `ctr evaluate` needs no training data.
* [proposal] K (the static slate width) is the longest training slate; longer slates are cut
  to K. It is saved as the feature spec's `slate_size` (the models read K from their inputs, so
  their configs do not repeat it; an export pads slates to `slate_size`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.data.schema import load_slates
from models.ncm.base import SlateModel
from models.ncm.data import (
    SlateBatch,
    SlateSessions,
    encode_sessions,
    fit_slate_vocabs,
    iter_batches,
    longest_slate,
)
from models.ncm.metrics import fit_threshold, slate_metrics
from models.training.checkpoint import LoadedRun
from models.training.loop import TrainConfig
from runtime.features import FeatureSpec, Vocabulary, vocab_sizes


@dataclass
class SlateTask:
    """Implements `models.training.loop.TrainingTask` for `SlateModel`s; batches are sessions."""

    train: SlateSessions
    valid: SlateSessions
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    threshold_sessions: int = 2000  # training sessions the F1 threshold is fitted on
    _epoch: int = field(default=0, init=False, repr=False)  # 0-based, for forward_train

    def train_batches(self, epoch: int, skip: int = 0) -> Iterator[SlateBatch]:
        """`epoch` counts from 1 (the trainer's); models see it 0-based in `forward_train`.
        A resumed epoch skips `skip` batches by building them (they draw no random numbers)."""
        self._epoch = epoch - 1
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        batches = iter_batches(self.train, self.batch_size, evaluation=False, seed=seed)
        return itertools.islice(batches, skip, None)

    def valid_batches(self) -> Iterator[SlateBatch]:
        return iter_batches(self.valid, self.eval_batch_size, evaluation=True)

    def loss(self, model: nn.Module, batch: SlateBatch) -> tuple[Tensor, dict[str, float]]:
        assert isinstance(model, SlateModel)
        batch = batch.to(_device_of(model))
        out = model.forward_train(batch, self._epoch)
        bce = masked_bce(out.logits, batch.clicks, batch.target)
        total = bce + sum(out.aux_losses.values(), torch.zeros((), device=bce.device))
        parts = {"bce": float(bce.detach())}
        parts.update({name: float(value.detach()) for name, value in out.aux_losses.items()})
        return total, parts

    def rng_state(self) -> dict[str, Any]:
        return {}  # its models draw from torch's generator, which the checkpoint holds

    def set_rng_state(self, state: dict[str, Any]) -> None:
        pass

    def evaluate(self, model: nn.Module, batches: Iterable[SlateBatch]) -> dict[str, float]:
        assert isinstance(model, SlateModel)
        sample = iter_batches(
            self.train, self.eval_batch_size, True, seed=self.seed, limit=self.threshold_sessions
        )
        labels, probs = predict_targets(model, sample)
        model.click_threshold.fill_(fit_threshold(labels, probs))
        return evaluate_slates(model, batches)


def build_slate_task(
    train_path: Path, valid_path: Path, config: TrainConfig
) -> tuple[dict[str, int], SlateTask, FeatureSpec, dict[str, Vocabulary]]:
    """`ctr train` for a slate model: loads both files, fits the vocabularies on the training
    file only, fixes K -> (embedding sizes, task, feature spec, vocabularies)."""
    train_frame = load_slates(train_path)
    vocabs = fit_slate_vocabs(train_frame)
    max_slate = longest_slate(train_frame)
    task = SlateTask(
        train=encode_sessions(train_frame, vocabs, max_slate),
        valid=encode_sessions(load_slates(valid_path), vocabs, max_slate),
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        seed=config.seed,
    )
    return vocab_sizes(vocabs), task, FeatureSpec(slate_size=max_slate), vocabs


def evaluate_slate_run(run: LoadedRun, data_path: Path) -> dict[str, float]:
    """`ctr evaluate` for a slate run: the last-20% protocol on `data_path`, slates cut to the
    run's K, F1 and accuracy at the run's own training-fitted threshold."""
    sessions = encode_sessions(load_slates(data_path), run.vocabs, run.spec.slate_size)
    batch_size = int(run.config["train_config"].get("eval_batch_size", TrainConfig.eval_batch_size))
    return evaluate_slates(run.model, iter_batches(sessions, batch_size, evaluation=True))


def evaluate_slates(model: nn.Module, batches: Iterable[SlateBatch]) -> dict[str, float]:
    """-> {"auc", "logloss", "f1", "accuracy", "threshold", "n"} on the target positions."""
    assert isinstance(model, SlateModel)
    labels, probs = predict_targets(model, batches)
    # The buffer is float32: 0.12 reads back as 0.11999999..; the grid has two decimals.
    return slate_metrics(labels, probs, round(float(model.click_threshold), 6))


def predict_targets(
    model: nn.Module, batches: Iterable[SlateBatch]
) -> tuple[np.ndarray, np.ndarray]:
    """-> (clicks, click probabilities) at the target positions, model in eval mode.

    The `noise` input (used only by NCM's sampling readout) comes from a fixed seed, so an
    evaluation is deterministic whatever the readout.
    """
    device = _device_of(model)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    labels, probs = [], []
    with torch.no_grad():
        for batch in batches:
            noise = torch.rand(batch.clicks.shape, generator=generator).to(device)
            batch = batch.to(device)
            logits = model(batch.items, batch.cats, batch.mask, batch.hist_clicks, noise)
            probs.append(torch.sigmoid(logits[batch.target]).cpu().numpy())
            labels.append(batch.clicks[batch.target].cpu().numpy())
    if not labels:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(labels), np.concatenate(probs)


def masked_bce(logits: Tensor, clicks: Tensor, target: Tensor) -> Tensor:
    """Mean BCE-with-logits over the target positions, [B,S,K] -> scalar."""
    weight = target.to(logits.dtype)
    per_item = F.binary_cross_entropy_with_logits(logits, clicks, reduction="none")
    return (per_item * weight).sum() / weight.sum().clamp_min(1.0)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
