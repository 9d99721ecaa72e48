"""The behaviour-CTR training task: encoded samples -> batches, BCE loss, AUC/LogLoss.

The loss is BCE-with-logits on the model's logits plus every auxiliary loss its `forward_train`
returns (already weighted by the model, e.g. SARN's positional and interest losses). Negative
history items are sampled only for models whose class sets `needs_negatives`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import BehaviorModel
from models.batch import BehaviorBatch
from models.dataset import (
    CONTEXT_PREFIX,
    BehaviorArrays,
    NegativeSampler,
    encode_behavior,
    fit_vocabularies,
    iterate_batches,
)
from models.features import FeatureSpec, Vocabulary, vocab_sizes
from models.metrics import auc, logloss
from models.schema import DataError, load_behavior
from models.train import TrainConfig


@dataclass
class BehaviorTask:
    """Implements `models.train.TrainingTask` for `BehaviorModel`s."""

    train: BehaviorArrays
    valid: BehaviorArrays
    batch_size: int = 128
    eval_batch_size: int = 1024
    seed: int = 0
    sampler: NegativeSampler | None = None  # set for models with `needs_negatives`

    def train_batches(self, epoch: int) -> SizedBatches:
        # A different, reproducible shuffle every epoch.
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        batches = iterate_batches(
            self.train, self.batch_size, shuffle=True, seed=seed, sampler=self.sampler
        )
        return SizedBatches(batches, -(-len(self.train) // self.batch_size))

    def valid_batches(self) -> Iterator[BehaviorBatch]:
        return eval_batches(self.valid, self.eval_batch_size)

    def loss(self, model: nn.Module, batch: BehaviorBatch) -> tuple[Tensor, dict[str, float]]:
        assert isinstance(model, BehaviorModel)
        batch = batch.to(_device_of(model))
        out = model.forward_train(batch)
        ctr = F.binary_cross_entropy_with_logits(out.logits, batch.label)
        total = ctr + sum(out.aux_losses.values(), torch.zeros((), device=ctr.device))
        parts = {"ctr": float(ctr.detach())}
        parts.update({name: float(value.detach()) for name, value in out.aux_losses.items()})
        return total, parts

    def evaluate(self, model: nn.Module, batches: Iterable[BehaviorBatch]) -> dict[str, float]:
        return evaluate_behavior(model, batches)


@dataclass
class SizedBatches:
    """An iterator of batches that knows how many it yields (the progress bar's total)."""

    batches: Iterator[BehaviorBatch]
    count: int

    def __iter__(self) -> Iterator[BehaviorBatch]:
        return self.batches

    def __len__(self) -> int:
        return self.count


def eval_batches(arrays: BehaviorArrays, batch_size: int) -> Iterator[BehaviorBatch]:
    """The fixed (unshuffled, negative-free) batches that every evaluation uses."""
    return iterate_batches(arrays, batch_size, shuffle=False, seed=0, sampler=None)


def predict(model: nn.Module, batches: Iterable[BehaviorBatch]) -> tuple[np.ndarray, np.ndarray]:
    """-> (labels [n], click probabilities [n]) with the model in eval mode."""
    device = _device_of(model)
    model.eval()
    labels, probs = [], []
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            probs.append(torch.sigmoid(model(batch)).cpu().numpy())
            labels.append(batch.label.cpu().numpy())
    if not labels:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(labels), np.concatenate(probs)


def evaluate_behavior(model: nn.Module, batches: Iterable[BehaviorBatch]) -> dict[str, float]:
    """-> {"auc", "logloss", "n"} over all batches."""
    labels, probs = predict(model, batches)
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs), "n": int(labels.size)}


def context_fields_of(frame: pd.DataFrame) -> list[str]:
    """Context field names (without the prefix) in file order."""
    return [c[len(CONTEXT_PREFIX) :] for c in frame.columns if c.startswith(CONTEXT_PREFIX)]


def load_arrays(path: Path, spec: FeatureSpec, vocabs: dict[str, Vocabulary]) -> BehaviorArrays:
    """A behaviour file encoded with a trained run's vocabularies and spec."""
    frame = load_behavior(path)
    for name in spec.context_fields:
        if CONTEXT_PREFIX + name not in frame.columns:
            message = f"the model was trained with context field {name!r}; the file has no column"
            raise DataError(path, message, column=CONTEXT_PREFIX + name)
    return encode_behavior(frame, vocabs, spec.max_len, spec.context_fields)


def build_behavior_task(
    train_path: Path, valid_path: Path, config: TrainConfig, negatives: bool
) -> tuple[dict[str, int], BehaviorTask, FeatureSpec, dict[str, Vocabulary]]:
    """Loads both files, fits the vocabularies on the training file only and encodes both.

    -> (embedding sizes, task, feature spec, vocabularies).
    """
    train_frame = load_behavior(train_path)
    fields = context_fields_of(train_frame)
    vocabs = fit_vocabularies(train_frame, fields)
    spec = FeatureSpec(max_len=config.max_len, context_fields=fields)
    train = encode_behavior(train_frame, vocabs, config.max_len, fields)
    task = BehaviorTask(
        train=train,
        valid=load_arrays(valid_path, spec, vocabs),
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        seed=config.seed,
        sampler=NegativeSampler(train, config.seed) if negatives else None,
    )
    return vocab_sizes(vocabs), task, spec, vocabs


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
