"""The behaviour-CTR training task: encoded shards -> batches, BCE loss, AUC/LogLoss.

Every behaviour run streams: the data are prepared once into shards in the run directory
(`models.training.behavior_data`) and each epoch reads its rows back in a bounded shuffle
window (`models.data.stream.order`), so memory holds a window and the model, whatever the size
of the data. This replaced loading whole files into pandas for every run, large or small:
preparing counts and encodes about 100k rows/s on one core, and an epoch reads its rows back
at about 1.9M rows/s (docs/training.md); the batches are the same kind of batches.

In a data-parallel run each rank trains on its part of every epoch and evaluates its part of
the validation rows; `evaluate` gathers every rank's predictions, so the metrics are those of
the whole validation set, the same on every rank.

The loss is the model's task losses (`models.nets.multitask.task_losses`: BCE of the click, plus
the CTCVR term for a multi-task model) plus every auxiliary loss its `forward_train` returns
(already weighted by the model, e.g. SARN's positional and interest losses), plus
`TrainConfig.embedding_l2` times the squared norm of the embedding tables when it is set.
Negative history items are sampled only for models whose `samples_negatives(config)` is true
(SARN; FAT with its auxiliary loss), by a sampler seeded per rank. A conversion-only model
(`tasks=("cvr",)`) trains and validates on the clicked rows alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.data.batch import BehaviorBatch
from models.data.dataset import NegativeSampler, iterate_batches, make_batch
from models.data.encode import BehaviorArrays, rebatch
from models.data.schema import DataError
from models.data.stream.order import EpochOrder, rank_range, sequential_rows, train_rows
from models.data.stream.shards import Shards
from models.nets.base import BehaviorModel
from models.nets.multitask import task_losses, task_metrics
from models.training.behavior_data import prepare_behavior_data, stream_arrays
from models.training.distributed.ranks import Ranks
from models.training.loop import TrainConfig, forward_train, unwrap
from runtime.features import FeatureSpec, Vocabulary, vocab_sizes


@dataclass
class BehaviorTask:
    """Implements `models.training.loop.TrainingTask` for `BehaviorModel`s."""

    train: Shards
    valid: Shards
    order: EpochOrder  # this rank's epoch orders of the training rows
    batch_size: int = 128
    eval_batch_size: int = 1024
    ranks: Ranks = field(default_factory=Ranks)
    sampler: NegativeSampler | None = None  # set for models that sample negatives
    embedding_l2: float = 0.0  # TrainConfig.embedding_l2

    def train_batches(self, epoch: int, skip: int = 0) -> SizedBatches:
        rows = train_rows(self.train, self.order, epoch, self.batch_size, skip)
        batches = (make_batch(part, self.sampler) for part in rows)
        return SizedBatches(batches, self.order.steps(self.batch_size) - skip)

    def valid_batches(self) -> Iterator[BehaviorBatch]:
        """This rank's part of the validation rows, in order."""
        start, stop = rank_range(self.valid.rows, self.ranks.world, self.ranks.rank)
        for part in sequential_rows(self.valid, start, stop, self.eval_batch_size):
            yield make_batch(part)

    def loss(self, model: nn.Module, batch: BehaviorBatch) -> tuple[Tensor, dict[str, float]]:
        inner = unwrap(model)
        assert isinstance(inner, BehaviorModel)
        batch = batch.to(_device_of(inner))
        out = forward_train(model, batch)
        terms = {
            **task_losses(out.logits, batch.label, batch.conversion, inner.tasks),
            **out.aux_losses,
        }
        if self.embedding_l2 > 0:
            terms["embedding_l2"] = self.embedding_l2 * embedding_norm(model)
        total = sum(terms.values(), torch.zeros((), device=out.logits.device))
        return total, {name: float(value.detach()) for name, value in terms.items()}

    def evaluate(self, model: nn.Module, batches: Iterable[BehaviorBatch]) -> dict[str, float]:
        assert isinstance(model, BehaviorModel)
        out = predict(model, batches)
        conversion = out.conversion
        if self.valid.conversion and conversion is None:  # this rank had no rows
            conversion = np.zeros(0, dtype=np.float32)
        gathered = self.ranks.gather_rows(
            [out.probs, out.label, *([conversion] if conversion is not None else [])]
        )
        everyone = Predictions(gathered[0], gathered[1], gathered[2] if len(gathered) > 2 else None)
        return task_metrics(everyone.probs, everyone.label, everyone.conversion, model.tasks)

    def rng_state(self) -> dict[str, Any]:
        return {} if self.sampler is None else {"sampler": self.sampler.rng.bit_generator.state}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        if self.sampler is not None:
            self.sampler.rng.bit_generator.state = state["sampler"]


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
    """The fixed (unshuffled, negative-free) batches of in-memory arrays."""
    return iterate_batches(arrays, batch_size, shuffle=False, seed=0, sampler=None)


def file_batches(
    path: Path,
    spec: FeatureSpec,
    vocabs: dict[str, Vocabulary],
    tasks: Sequence[str],
    batch_size: int,
) -> Iterator[BehaviorBatch]:
    """A file's rows, encoded chunk by chunk, in batches of `batch_size` rows in file order:
    the batches validation reads from shards, without writing any."""
    for part in rebatch(stream_arrays(path, spec, vocabs, tasks), batch_size):
        yield make_batch(part)


def load_arrays(
    path: Path, spec: FeatureSpec, vocabs: dict[str, Vocabulary], tasks: Sequence[str] = ("ctr",)
) -> BehaviorArrays:
    """A behaviour file encoded in memory with a trained run's vocabularies and spec; only the
    rows a model with `tasks` sees."""
    return BehaviorArrays.concat(list(stream_arrays(path, spec, vocabs, tasks)))


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
    probs, labels, conversions = _Rows(), _Rows(), _Rows()
    with torch.no_grad():
        for batch in batches:
            probs.add(torch.sigmoid(model(batch.to(device))).cpu().numpy())
            labels.add(batch.label.numpy())
            if batch.conversion is not None:
                conversions.add(batch.conversion.numpy())
    if not len(labels):
        return Predictions(
            np.zeros((0, len(model.tasks)), np.float32), np.zeros(0, np.float32), None
        )
    conversion = conversions.array() if len(conversions) == len(labels) else None
    return Predictions(probs.array(), labels.array(), conversion)


class _Rows:
    """Rows added batch by batch into one buffer that doubles when full.

    Why not a list of the batches' arrays: hundreds of small arrays that outlive the batches
    sit between the batches' large temporary tensors on the heap, which then cannot shrink;
    scoring 255k rows in batches of 1,024 grew the resident set by 136 MiB that way, and by
    78 MiB with this buffer (docs/training.md)."""

    def __init__(self) -> None:
        self.buffer: np.ndarray | None = None
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, rows: np.ndarray) -> None:
        if self.buffer is None:
            self.buffer = np.empty((max(len(rows), 1024), *rows.shape[1:]), rows.dtype)
        if self.size + len(rows) > len(self.buffer):
            grown = np.empty((2 * (self.size + len(rows)), *rows.shape[1:]), rows.dtype)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : self.size + len(rows)] = rows
        self.size += len(rows)

    def array(self) -> np.ndarray:
        assert self.buffer is not None
        return self.buffer[: self.size].copy()


def evaluate_behavior(model: nn.Module, batches: Iterable[BehaviorBatch]) -> dict[str, float]:
    """-> {"auc", "logloss", "n"} of the model's first task over all batches, plus the
    conversion metrics of a model with a CVR tower (`models.nets.multitask.task_metrics`)."""
    assert isinstance(model, BehaviorModel)
    out = predict(model, batches)
    return task_metrics(out.probs, out.label, out.conversion, model.tasks)


def build_behavior_task(
    train_path: Path,
    valid_path: Path,
    config: TrainConfig,
    negatives: bool,
    tasks: Sequence[str],
    run_dir: Path,
    ranks: Ranks | None = None,
    progress: bool = False,
) -> tuple[dict[str, int], BehaviorTask, FeatureSpec, dict[str, Vocabulary]]:
    """Prepares (or finds) the run's data in `run_dir` and builds this rank's task.
    -> (embedding sizes, task, feature spec, vocabularies)."""
    ranks = ranks or Ranks()
    data = prepare_behavior_data(run_dir, train_path, valid_path, config, tasks, ranks, progress)
    order = EpochOrder(
        rows=data.train.rows,
        seed=config.seed,
        world=ranks.world,
        rank=ranks.rank,
        window_rows=config.shuffle_buffer,
    )
    if order.rank_rows == 0:
        message = f"{data.train.rows} training rows cannot be shared by {ranks.world} processes"
        raise DataError(train_path, message)
    seed = np.random.SeedSequence([config.seed, ranks.rank])
    task = BehaviorTask(
        train=data.train,
        valid=data.valid,
        order=order,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        ranks=ranks,
        sampler=NegativeSampler(data.frequencies, seed) if negatives else None,
        embedding_l2=config.embedding_l2,
    )
    return vocab_sizes(data.vocabs), task, data.spec, data.vocabs


def embedding_norm(model: nn.Module) -> Tensor:
    """Sum of the squared weights of every embedding table of `model` (whole tables, as
    DeepCTR-Torch's `l2_reg_embedding` does; the padding rows stay 0 and add nothing)."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    return sum((w.pow(2).sum() for w in tables), torch.zeros((), device=_device_of(model)))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
