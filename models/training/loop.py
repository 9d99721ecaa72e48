"""The training loop: Adam, per-epoch validation, early stopping on validation AUC.

`fit` is generic over a `TrainingTask`, which owns the data and the loss, so the behaviour
models (`models.training.behavior_task.BehaviorTask`) and the slate click models
(`models.ncm`) share one loop. The model owns neither its loss nor its optimizer (STYLE.md
§0.2). The tasks import this module; `models.training.run.train_run` (what `ctr train` calls)
imports the tasks, so nothing here imports a task.

Per-model defaults ([proposal], `MODEL_DEFAULTS`): SARN trains with Adam lr 0.01, the constant
rate of the official code (MODELS.md §1.3; the paper's "decaying lr" is not in the code); the
NCM family with lr 1e-3 and gradient-norm clipping at 1.0 (the authors' code, MODELS.md §3.9);
every other model with lr 1e-3. An explicit `--lr` wins. `history_len` defaults to
`runtime.features.DEFAULT_HISTORY_LEN` (50).

Repeatable: on CPU the same seed and world size give the same metrics (torch is seeded before
the model is built and again before training, shuffling and negative sampling use seeded numpy
Generators, and deterministic kernels are requested). CUDA runs may differ in the last bits.

Data-parallel: with several ranks (`models.training.distributed`) the model trains under
DistributedDataParallel, which averages the ranks' gradients, so one step sees world ×
batch_size samples. Each rank reads its own part of the data (the task's business); the
epoch's losses and samples are summed over the ranks (samples/s is the whole world's); the
task's `evaluate` gathers every rank's predictions, so every rank computes the same metrics and
takes the same early-stopping decision. Only rank 0 prints and writes.

Resumable: with a run directory, a checkpoint (`models.training.resume`) is written at the end
of every epoch, every `checkpoint_minutes` of training (rank 0's clock, agreed at the next
poll) and when a stop is requested (SIGTERM or SIGINT); then `fit` raises `Interrupted`.
`Session.snapshot` continues a run from its checkpoint with the same weights, optimizer state,
batch and random streams, so it ends where an uninterrupted run would have.

`steps_per_epoch` cuts every epoch to its first batches (the rest of the epoch's order is
skipped, validation is whole): for benchmarks and smoke runs on data too large to go through.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.data.stream.order import WINDOW_ROWS
from models.registry import SLATE_MODELS
from models.training.distributed.ranks import Ranks
from models.training.distributed.signals import Interrupted, StopRequest
from models.training.resume import EpochSums, LoopState, RankState, Snapshot, save_snapshot
from runtime.features import DEFAULT_HISTORY_LEN

POLL_STEPS = 16  # steps between two looks at the stop request and the checkpoint clock


class TrainingTask(Protocol):
    """What `fit` needs from a task: batches, a loss, and an evaluation."""

    def train_batches(self, epoch: int, skip: int = 0) -> Iterable[Any]:
        """The epoch's batches from batch `skip` on (a resumed epoch skips those it trained)."""
        ...

    def valid_batches(self) -> Iterable[Any]: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """-> (total loss to minimise, its named parts as floats for logging)."""
        ...

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """-> metrics; must include "auc" (behaviour tasks also "logloss" and "n"); an optional
        "selection" replaces "auc" as the early-stopping criterion."""
        ...

    def rng_state(self) -> dict[str, Any]:
        """The task's own random streams as JSON ({} when it has none), for checkpoints."""
        ...

    def set_rng_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # see MODEL_DEFAULTS for the per-model values `ctr train` uses
    weight_decay: float = 0.0  # Adam's L2 term on every parameter (`ctr train --set`)
    lr_decay: float = 1.0  # epoch e trains at lr × lr_decay^(e-1) (`ctr train --set`)
    embedding_l2: float = 0.0  # extra loss: this × sum of squared embedding weights (--set)
    patience: int = 2  # epochs without a better validation AUC before stopping
    seed: int = 0
    device: str = "auto"  # "auto" takes CUDA when available, else "cpu" or "cuda"
    history_len: int = DEFAULT_HISTORY_LEN  # history items the model reads (the newest ones)
    grad_clip: float | None = None  # max gradient norm; None: no clipping
    eval_batch_size: int = 1024
    min_count: int = 1  # behaviour models: ids seen fewer times in training map to OOV
    shuffle_buffer: int = WINDOW_ROWS  # behaviour models: rows of the streaming shuffle window
    checkpoint_minutes: float = 10.0  # training time between mid-epoch checkpoints
    steps_per_epoch: int | None = None  # at most this many batches an epoch (benchmarks, smoke)


MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "sarn": {"lr": 0.01},
    **{name: {"lr": 1e-3, "grad_clip": 1.0} for name in SLATE_MODELS},
}


# TrainConfig fields that `ctr train --set NAME=VALUE` reaches beside the model's config fields:
# the standard regularisation every model can take (issue 21).
TRAIN_SET_FIELDS = ("weight_decay", "embedding_l2", "lr_decay")


def train_config_for(model_name: str, **overrides: Any) -> TrainConfig:
    """TrainConfig defaults, then the model's defaults, then the given (non-None) overrides."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"TrainConfig has no field(s) {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(TrainConfig(), **{**MODEL_DEFAULTS.get(model_name, {}), **given})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


@contextlib.contextmanager
def deterministic(seed: int, enabled: bool) -> Iterator[None]:
    """Seeds torch and, when enabled (on CPU), asks for deterministic kernels; restores after."""
    torch.manual_seed(seed)
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled and not previous:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


@dataclass
class Session:
    """How `fit` runs beyond its config: its ranks, what stops it, what it resumes."""

    ranks: Ranks = field(default_factory=Ranks)
    stop: StopRequest = field(default_factory=StopRequest)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # saved with every checkpoint
    snapshot: Snapshot | None = None  # continue from this checkpoint


def fit(
    model: nn.Module,
    task: TrainingTask,
    config: TrainConfig,
    run_dir: Path | None = None,
    progress: bool = True,
    session: Session | None = None,
) -> dict[str, Any]:
    """Trains `model` in place and leaves it holding the epoch with the best validation AUC
    (or the task's `selection` metric when it reports one, e.g. a multi-task model).

    -> {"epochs": [per-epoch record], "best_epoch": int, "valid": metrics of the best epoch,
    "stopped_early": bool}. With a run_dir, each epoch's record is appended to
    RUN/train_log.jsonl as it finishes and checkpoints are written (module docstring).
    """
    session = session or Session()
    device = session.ranks.device if session.ranks.world > 1 else resolve_device(config.device)
    model.to(device)
    loop = _Loop(model, task, config, session, run_dir, progress and session.ranks.leader)
    with deterministic(config.seed, enabled=device.type == "cpu"):
        if session.snapshot is not None:
            loop.restore(session.snapshot)
        while not loop.state.finished:
            loop.train_epoch()
            loop.end_epoch()
    return loop.result()


def forward_train(model: nn.Module, *args: Any) -> Any:
    """`model.forward_train(*args)` for the model `fit` hands a task's `loss`: the model
    itself, or in a data-parallel run its DDP wrapper, whose forward is the model's
    forward_train (DDP synchronises gradients only for passes through its forward)."""
    if isinstance(model, DistributedDataParallel):
        return model(*args)
    return cast(Any, model).forward_train(*args)  # nn.Module types unknown attributes as Tensor


def unwrap(model: nn.Module) -> nn.Module:
    """The model behind what `fit` hands a task's `loss`."""
    if isinstance(model, DistributedDataParallel):
        inner: nn.Module = model.module.model
        return inner
    return model


class _TrainForward(nn.Module):
    """A module whose forward is the model's forward_train, for DDP to wrap."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> Any:
        return cast(Any, self.model).forward_train(*args)


class _Loop:
    """The state of one `fit` and its steps: epochs, polls, checkpoints, early stopping."""

    def __init__(
        self,
        model: nn.Module,
        task: TrainingTask,
        config: TrainConfig,
        session: Session,
        run_dir: Path | None,
        progress: bool,
    ) -> None:
        self.model, self.task, self.config, self.session = model, task, config, session
        self.ranks = session.ranks
        self.run_dir, self.progress = run_dir, progress
        self.trained = model if self.ranks.world == 1 else self.ranks.wrap(_TrainForward(model))
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.state = LoopState(finished=config.epochs < 1)
        self.sums = EpochSums()
        self.best: dict[str, Tensor] | None = None
        self.last_checkpoint = time.monotonic()

    def restore(self, snapshot: Snapshot) -> None:
        if len(snapshot.ranks) != self.ranks.world:
            raise ValueError(
                f"the checkpoint was written by {len(snapshot.ranks)} processes; "
                f"resume it with as many, not {self.ranks.world}"
            )
        self.model.load_state_dict(snapshot.model)
        self.optimizer.load_state_dict(snapshot.optimizer)
        self.best, self.state = snapshot.best_model, snapshot.loop
        mine = snapshot.ranks[self.ranks.rank]
        torch.set_rng_state(mine.torch_rng)
        if mine.cuda_rng is not None:
            torch.cuda.set_rng_state(mine.cuda_rng, self.ranks.device)
        self.task.set_rng_state(mine.task_rng)
        self.sums = mine.sums
        if self.run_dir is not None and self.ranks.leader:
            _write_log(self.run_dir, self.state.history)

    def train_epoch(self) -> None:
        """Trains the rest of the current epoch (all of it unless resumed mid-epoch)."""
        self.model.train()
        # A step decay set from the epoch number, not accumulated in the optimizer: a resumed
        # run trains each epoch at the rate an uninterrupted one would have.
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * self.config.lr_decay ** (self.state.epoch - 1)
        batches: Iterable[Any] = self.task.train_batches(self.state.epoch, self.state.step)
        total = self.state.step + len(batches) if isinstance(batches, Sized) else None
        cap = self.config.steps_per_epoch
        if cap is not None:  # the epoch's first `cap` batches, in the epoch's own order
            batches = itertools.islice(batches, max(cap - self.state.step, 0))
            total = min(total, cap) if total is not None else cap
        bar = tqdm(
            batches,
            total=total,
            initial=self.state.step,
            desc=f"epoch {self.state.epoch}",
            disable=not self.progress,
            file=sys.stderr,
        )
        started = time.perf_counter()
        for batch in bar:
            self._step(batch)
            bar.set_postfix(loss=f"{self.sums.losses['loss'] / self.state.step:.4f}", refresh=False)
            if self.state.step % POLL_STEPS == 0:
                self.sums.seconds += time.perf_counter() - started
                self._poll()
                started = time.perf_counter()
        self.sums.seconds += time.perf_counter() - started

    def end_epoch(self) -> None:
        """Epoch statistics, validation, the best epoch, early stopping, a checkpoint."""
        lr = self.optimizer.param_groups[0]["lr"]  # what this epoch trained at
        record = {"epoch": self.state.epoch, "lr": lr, **self._train_stats()}
        self.ranks.share_buffers(self.model)
        valid = _evaluate(self.model, self.task)
        record.update({f"valid_{k}": v for k, v in valid.items()})
        self.state.history.append(record)
        if self.ranks.leader:
            _log_epoch(record, self.run_dir, self.progress)
        score = _nan_to_low(valid.get("selection", valid["auc"]))
        if self.best is None or score > self.state.best_score:
            self.best = _copy_state(self.model)
            self.state.best_epoch, self.state.best_score = self.state.epoch, score
            self.state.best_valid = valid
        patience_out = self.state.epoch - self.state.best_epoch >= self.config.patience
        self.state.finished = patience_out or self.state.epoch >= self.config.epochs
        self.state.epoch, self.state.step, self.sums = self.state.epoch + 1, 0, EpochSums()
        self._checkpoint()
        (stop,) = self.ranks.any([self.session.stop.requested])
        if stop and not self.state.finished:
            raise Interrupted(f"stopped by a signal after epoch {self.state.epoch - 1}")

    def result(self) -> dict[str, Any]:
        assert self.best is not None, "TrainConfig.epochs must be at least 1"
        self.model.load_state_dict(self.best)
        return {
            "epochs": self.state.history,
            "best_epoch": self.state.best_epoch,
            "valid": self.state.best_valid,
            "stopped_early": len(self.state.history) < self.config.epochs,
        }

    def _step(self, batch: Any) -> None:
        loss, parts = self.task.loss(self.trained, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.state.step += 1
        self.sums.samples += len(batch) if isinstance(batch, Sized) else 0
        for name, value in {"loss": float(loss.detach()), **parts}.items():
            self.sums.losses[name] = self.sums.losses.get(name, 0.0) + value

    def _train_stats(self) -> dict[str, float]:
        """Mean loss parts over every rank's steps, wall time and the world's samples/s."""
        if self.state.step == 0:
            raise ValueError("the training task yielded no batches")
        names = sorted(self.sums.losses)
        *losses, samples = self.ranks.sum(
            [*(self.sums.losses[n] for n in names), self.sums.samples]
        )
        (seconds,) = self.ranks.max([self.sums.seconds])
        steps = self.state.step * self.ranks.world
        stats = {f"train_{name}": total / steps for name, total in zip(names, losses, strict=True)}
        # Data preparation is inside the timed loop on purpose: it is part of what training costs.
        return {**stats, "train_seconds": seconds, "train_samples_per_s": samples / seconds}

    def _poll(self) -> None:
        """Agrees with the other ranks on a stop request and on a checkpoint that is due."""
        interval = self.config.checkpoint_minutes * 60
        due = self.ranks.leader and time.monotonic() - self.last_checkpoint >= interval
        stop, checkpoint = self.ranks.any([self.session.stop.requested, due])
        if stop or checkpoint:
            self._checkpoint()
        if stop:
            where = f"epoch {self.state.epoch}, after batch {self.state.step}"
            raise Interrupted(f"stopped by a signal at {where}")

    def _checkpoint(self) -> None:
        if self.run_dir is None:
            return
        mine = RankState(
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(self.ranks.device)
            if self.ranks.device.type == "cuda"
            else None,
            task_rng=self.task.rng_state(),
            sums=replace(self.sums, losses=dict(self.sums.losses)),
        )
        states = self.ranks.gather_objects(mine)
        if self.ranks.leader:
            snapshot = Snapshot(
                loop=self.state,
                model=self.model.state_dict(),
                best_model=self.best,
                optimizer=self.optimizer.state_dict(),
                ranks=states,
                fingerprint=self.session.fingerprint,
            )
            save_snapshot(self.run_dir, snapshot)
        self.ranks.barrier()  # no rank leaves (or is killed by torchrun) before it is written
        self.last_checkpoint = time.monotonic()


def _evaluate(model: nn.Module, task: TrainingTask) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, task.valid_batches())
    if "auc" not in metrics:
        raise ValueError("TrainingTask.evaluate must return an 'auc'")
    return metrics


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _nan_to_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _log_epoch(record: dict[str, Any], run_dir: Path | None, progress: bool) -> None:
    if progress:
        shown = " ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
        )
        tqdm.write(shown, file=sys.stderr)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "train_log.jsonl").open("a") as log:
            log.write(json.dumps(record) + "\n")


def _write_log(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """train_log.jsonl as the resumed run's history says (a stop may cut it short)."""
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


def to_builtin(value: Any) -> Any:
    """numpy scalars -> Python numbers, recursively, so that metrics serialise to JSON."""
    if isinstance(value, dict):
        return {k: to_builtin(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_builtin(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value
