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

Repeatable: on CPU the same seed gives the same metrics (torch is seeded before the model is
built and again before training, shuffling and negative sampling use seeded numpy Generators,
and deterministic kernels are requested). CUDA runs may differ in the last bits.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from models.registry import SLATE_MODELS
from runtime.features import DEFAULT_HISTORY_LEN


class TrainingTask(Protocol):
    """What `fit` needs from a task: batches, a loss, and an evaluation."""

    def train_batches(self, epoch: int) -> Iterable[Any]: ...

    def valid_batches(self) -> Iterable[Any]: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """-> (total loss to minimise, its named parts as floats for logging)."""
        ...

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """-> metrics; must include "auc" (behaviour tasks also "logloss" and "n"); an optional
        "selection" replaces "auc" as the early-stopping criterion."""
        ...


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # see MODEL_DEFAULTS for the per-model values `ctr train` uses
    weight_decay: float = 0.0  # Adam's L2 term on every parameter (`ctr train --set`)
    embedding_l2: float = 0.0  # extra loss: this × sum of squared embedding weights (--set)
    patience: int = 2  # epochs without a better validation AUC before stopping
    seed: int = 0
    device: str = "auto"  # "auto" takes CUDA when available, else "cpu" or "cuda"
    history_len: int = DEFAULT_HISTORY_LEN  # history items the model reads (the newest ones)
    grad_clip: float | None = None  # max gradient norm; None: no clipping
    eval_batch_size: int = 1024


MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "sarn": {"lr": 0.01},
    **{name: {"lr": 1e-3, "grad_clip": 1.0} for name in SLATE_MODELS},
}


# TrainConfig fields that `ctr train --set NAME=VALUE` reaches beside the model's config fields:
# the standard regularisation every model can take (issue 21).
TRAIN_SET_FIELDS = ("weight_decay", "embedding_l2")


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


def fit(
    model: nn.Module,
    task: TrainingTask,
    config: TrainConfig,
    run_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains `model` in place and leaves it holding the epoch with the best validation AUC
    (or the task's `selection` metric when it reports one, e.g. a multi-task model).

    -> {"epochs": [per-epoch record], "best_epoch": int, "valid": metrics of the best epoch,
    "stopped_early": bool}. With a run_dir, each epoch's record is appended to
    RUN/train_log.jsonl as it finishes.
    """
    device = resolve_device(config.device)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, Tensor], dict[str, float]] | None = None
    with deterministic(config.seed, enabled=device.type == "cpu"):
        for epoch in range(1, config.epochs + 1):
            train_stats = _train_epoch(model, task, optimizer, epoch, config, progress)
            valid = _evaluate(model, task)
            record = {"epoch": epoch, **train_stats, **{f"valid_{k}": v for k, v in valid.items()}}
            history.append(record)
            _log_epoch(record, run_dir, progress)
            score = _nan_to_low(valid.get("selection", valid["auc"]))
            if best is None or score > best[0]:
                best = (score, epoch, _copy_state(model), valid)
            elif epoch - best[1] >= config.patience:
                break
    assert best is not None, "TrainConfig.epochs must be at least 1"
    model.load_state_dict(best[2])
    return {
        "epochs": history,
        "best_epoch": best[1],
        "valid": best[3],
        "stopped_early": len(history) < config.epochs,
    }


def _train_epoch(
    model: nn.Module,
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: TrainConfig,
    progress: bool,
) -> dict[str, float]:
    """One pass over the training batches -> mean loss parts, wall time and samples/s."""
    model.train()
    sums: dict[str, float] = {}
    steps = samples = 0
    started = time.perf_counter()
    batches = task.train_batches(epoch)
    total = len(batches) if isinstance(batches, Sized) else None
    bar = tqdm(batches, total=total, desc=f"epoch {epoch}", disable=not progress, file=sys.stderr)
    for batch in bar:
        loss, parts = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        steps += 1
        samples += len(batch) if isinstance(batch, Sized) else 0
        for name, value in {"loss": float(loss.detach()), **parts}.items():
            sums[name] = sums.get(name, 0.0) + value
        bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}", refresh=False)
    if steps == 0:
        raise ValueError("the training task yielded no batches")
    seconds = time.perf_counter() - started
    stats = {f"train_{name}": value / steps for name, value in sums.items()}
    # Data preparation is inside the timed loop on purpose: it is part of what training costs.
    return {**stats, "train_seconds": seconds, "train_samples_per_s": samples / seconds}


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


def to_builtin(value: Any) -> Any:
    """numpy scalars -> Python numbers, recursively, so that metrics serialise to JSON."""
    if isinstance(value, dict):
        return {k: to_builtin(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_builtin(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value
