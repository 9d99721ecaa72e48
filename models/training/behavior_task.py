"""The behaviour-CTR training task: encoded samples -> batches, BCE loss, AUC/LogLoss.

The loss is the model's task losses (`models.nets.multitask.task_losses`: BCE of the click, plus
the CTCVR term for a multi-task model) plus every auxiliary loss its `forward_train` returns
(already weighted by the model, e.g. SARN's positional and interest losses), plus
`TrainConfig.embedding_l2` times the squared norm of the embedding tables when it is set.
Negative history items are sampled only for models whose class sets `needs_negatives`. A
conversion-only model (`tasks=("cvr",)`) trains and validates on the clicked rows alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from models.data.batch import BehaviorBatch
from models.data.dataset import (
    CONTEXT_PREFIX,
    BehaviorArrays,
    NegativeSampler,
    encode_behavior,
    fit_vocabularies,
    iterate_batches,
)
from models.data.schema import DataError, load_behavior
from models.nets.base import BehaviorModel
from models.nets.multitask import (
    CVR,
    needs_conversions,
    selection_labels,
    task_losses,
    task_metrics,
)
from models.training.loop import TrainConfig
from runtime.features import FeatureSpec, Vocabulary, vocab_sizes


@dataclass
class BehaviorTask:
    """Implements `models.training.loop.TrainingTask` for `BehaviorModel`s."""

    train: BehaviorArrays
    valid: BehaviorArrays
    batch_size: int = 128
    eval_batch_size: int = 1024
    seed: int = 0
    sampler: NegativeSampler | None = None  # set for models with `needs_negatives`
    embedding_l2: float = 0.0  # TrainConfig.embedding_l2

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
        terms = {
            **task_losses(out.logits, batch.label, batch.conversion, model.tasks),
            **out.aux_losses,
        }
        if self.embedding_l2 > 0:
            terms["embedding_l2"] = self.embedding_l2 * embedding_norm(model)
        total = sum(terms.values(), torch.zeros((), device=out.logits.device))
        return total, {name: float(value.detach()) for name, value in terms.items()}

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


@dataclass
class Predictions:
    """Every row of the scored batches, in order."""

    probs: np.ndarray  # [n, T] one probability column per task of the model
    label: np.ndarray  # [n] clicks
    conversion: np.ndarray | None  # [n], when the data has conversions


def predict(model: nn.Module, batches: Iterable[BehaviorBatch]) -> Predictions:
    """The model's probabilities with the model in eval mode."""
    assert isinstance(model, BehaviorModel)
    device = _device_of(model)
    model.eval()
    probs, labels, conversions = [], [], []
    with torch.no_grad():
        for batch in batches:
            probs.append(torch.sigmoid(model(batch.to(device))).cpu().numpy())
            labels.append(batch.label.numpy())
            if batch.conversion is not None:
                conversions.append(batch.conversion.numpy())
    if not labels:
        return Predictions(np.zeros((0, len(model.tasks))), np.zeros(0), None)
    conversion = np.concatenate(conversions) if len(conversions) == len(labels) else None
    return Predictions(np.concatenate(probs), np.concatenate(labels), conversion)


def evaluate_behavior(model: nn.Module, batches: Iterable[BehaviorBatch]) -> dict[str, float]:
    """-> {"auc", "logloss", "n"} of the model's first task over all batches, plus the
    conversion metrics of a model with a CVR tower (`models.nets.multitask.task_metrics`)."""
    assert isinstance(model, BehaviorModel)
    out = predict(model, batches)
    return task_metrics(out.probs, out.label, out.conversion, model.tasks)


def context_fields_of(frame: pd.DataFrame) -> list[str]:
    """Context field names (without the prefix) in file order."""
    return [c[len(CONTEXT_PREFIX) :] for c in frame.columns if c.startswith(CONTEXT_PREFIX)]


def load_arrays(
    path: Path, spec: FeatureSpec, vocabs: dict[str, Vocabulary], tasks: Sequence[str] = ("ctr",)
) -> BehaviorArrays:
    """A behaviour file encoded with a trained run's vocabularies and spec; only the rows a
    model with `tasks` trains on (see `task_rows`)."""
    frame = task_rows(load_behavior(path), tasks, path)
    for name in spec.context_fields:
        if CONTEXT_PREFIX + name not in frame.columns:
            message = f"the model was trained with context field {name!r}; the file has no column"
            raise DataError(path, message, column=CONTEXT_PREFIX + name)
    return encode_behavior(frame, vocabs, spec.history_len, spec.context_fields)


def task_rows(frame: pd.DataFrame, tasks: Sequence[str], path: Path) -> pd.DataFrame:
    """Checks that conversion tasks have conversions; keeps only clicked rows for ("cvr",)."""
    if needs_conversions(tasks) and "conversion" not in frame.columns:
        message = f"the tasks {','.join(tasks)} need conversion labels; the file has no column"
        raise DataError(path, message, column="conversion")
    if tuple(tasks) != (CVR,):
        return frame
    clicked = frame[frame["label"] == 1].reset_index(drop=True)
    if clicked.empty:
        raise DataError(path, "a conversion model needs clicked rows; the file has none")
    return clicked


def check_selectable(valid: BehaviorArrays, tasks: Sequence[str], path: Path) -> None:
    """Early stopping ranks epochs by validation AUC: a target with one class would leave it
    undefined in every epoch and the first epoch kept blindly, so such a file is refused."""
    for column, labels in selection_labels(valid.label, valid.conversion, tasks).items():
        if np.unique(labels).size < 2:
            message = (
                "validation needs both classes (early stopping ranks epochs by AUC); "
                f"every row has {int(labels[0])}"
            )
            raise DataError(path, message, column=column)


def build_behavior_task(
    train_path: Path,
    valid_path: Path,
    config: TrainConfig,
    negatives: bool,
    tasks: Sequence[str] = ("ctr",),
) -> tuple[dict[str, int], BehaviorTask, FeatureSpec, dict[str, Vocabulary]]:
    """Loads both files, fits the vocabularies on the training file only and encodes both.

    A conversion-only model sees only the clicked rows, vocabularies included: an id that only
    ever appears in a non-clicked impression is unknown to it, as it is to any CVR model
    trained on clicks. -> (embedding sizes, task, feature spec, vocabularies).
    """
    train_frame = task_rows(load_behavior(train_path), tasks, train_path)
    fields = context_fields_of(train_frame)
    vocabs = fit_vocabularies(train_frame, fields)
    spec = FeatureSpec(history_len=config.history_len, context_fields=fields)
    train = encode_behavior(train_frame, vocabs, config.history_len, fields)
    valid = load_arrays(valid_path, spec, vocabs, tasks)
    check_selectable(valid, tasks, valid_path)
    task = BehaviorTask(
        train=train,
        valid=valid,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        seed=config.seed,
        sampler=NegativeSampler(train, config.seed) if negatives else None,
        embedding_l2=config.embedding_l2,
    )
    return vocab_sizes(vocabs), task, spec, vocabs


def embedding_norm(model: nn.Module) -> Tensor:
    """Sum of the squared weights of every embedding table of `model` (whole tables, as
    DeepCTR-Torch's `l2_reg_embedding` does; the padding rows stay 0 and add nothing)."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    return sum((w.pow(2).sum() for w in tables), torch.zeros((), device=_device_of(model)))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
