"""`ctr train`: data -> vocabularies -> model -> `fit` -> run directory.

The one dispatch point between the two kinds of task: slate click models train on
`models.ncm.task` (in memory, one process), every other model on
`models.training.behavior_task` (streamed from shards, one process or several). It imports
both tasks and the loop; the tasks import the loop only, so there is no import circle.

A run started by torchrun (`ctr train --nproc N`) joins its process group here; rank 0 writes
the run directory. With `resume=True` the run continues from its last checkpoint
(`models.training.resume`) when the run is the same one: the same model and options, the same
data files unchanged, the same number of processes; anything else is refused with what
differs. A complete run removes its checkpoints and shards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from models.ncm.task import build_slate_task
from models.registry import is_slate_model, model_class
from models.training.behavior_data import data_fingerprint, discard
from models.training.behavior_task import build_behavior_task
from models.training.checkpoint import CheckpointError, config_from_dict, save_run
from models.training.distributed.ranks import Ranks, process_group
from models.training.distributed.signals import StopRequest
from models.training.loop import (
    Session,
    TrainConfig,
    TrainingTask,
    fit,
    resolve_device,
    to_builtin,
)
from models.training.resume import Snapshot, clear_snapshots, load_snapshot
from runtime.features import FeatureSpec, Vocabulary

# Options a resumed run may change: where it runs and how often it checkpoints.
_FREE = ("device", "checkpoint_minutes")


def train_run(
    model_name: str,
    train_path: Path,
    valid_path: Path,
    run_dir: Path,
    config: TrainConfig,
    model_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """`ctr train`: fits vocabularies on the training data only, builds the `--model`, trains
    it with early stopping and writes the run directory (`models.training.checkpoint`).

    `model_overrides` are fields of the model's config dataclass. -> the metrics written to
    RUN/metrics.json. Raises `Interrupted` (after a checkpoint) when a signal stops it.
    """
    cls = model_class(model_name)
    model_config = config_from_dict(cls.config_class, model_overrides or {})
    with process_group(resolve_device(config.device)) as ranks:
        if ranks.world > 1 and is_slate_model(model_name):
            raise ValueError("slate click models train in one process (no --nproc)")
        fingerprint = {
            "model": model_name,
            "model_config": dataclasses.asdict(model_config),
            "train_config": _fixed(config),
            "world": ranks.world,
            "data": data_fingerprint(train_path, valid_path, config, model_config.tasks)
            if not is_slate_model(model_name)
            else [str(train_path), str(valid_path)],
        }
        snapshot = _snapshot(run_dir, fingerprint, resume, ranks)
        task, sizes, spec, vocabs = _task(
            model_name, (train_path, valid_path), run_dir, config, model_config, ranks, progress
        )
        torch.manual_seed(config.seed)
        model = cls(sizes, model_config)
        if ranks.leader and snapshot is None:
            (run_dir / "train_log.jsonl").unlink(missing_ok=True)
        session = Session(ranks, StopRequest(), fingerprint, snapshot)
        with session.stop.listening():
            result = fit(model, task, config, run_dir, progress, session)
        metrics = to_builtin({"model": model_name, **result})
        if ranks.leader:
            save_run(
                run_dir,
                name=model_name,
                model=model.cpu(),
                model_config=model_config,
                train_config=config,
                sizes=sizes,
                spec=spec,
                vocabs=vocabs,
                metrics=metrics,
            )
            clear_snapshots(run_dir)
            discard(run_dir)
        ranks.barrier()
    return metrics


def _task(
    model_name: str,
    paths: tuple[Path, Path],
    run_dir: Path,
    config: TrainConfig,
    model_config: Any,
    ranks: Ranks,
    progress: bool,
) -> tuple[TrainingTask, dict[str, int], FeatureSpec, dict[str, Vocabulary]]:
    """This rank's task -> (task, embedding sizes, feature spec, vocabularies)."""
    task: TrainingTask
    if is_slate_model(model_name):
        sizes, task, spec, vocabs = build_slate_task(*paths, config)
        return task, sizes, spec, vocabs
    negatives = bool(model_class(model_name).samples_negatives(model_config))
    sizes, task, spec, vocabs = build_behavior_task(
        *paths, config, negatives, model_config.tasks, run_dir, ranks, progress and ranks.leader
    )
    return task, sizes, spec, vocabs


def _snapshot(
    run_dir: Path, fingerprint: dict[str, Any], resume: bool, ranks: Ranks
) -> Snapshot | None:
    """The checkpoint to resume from (resume=True), after checking that it is this run's."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        ranks.barrier()  # nobody reads the old checkpoints rank 0 is about to remove
        if ranks.leader:
            clear_snapshots(run_dir)
        ranks.barrier()
        return None
    snapshot = load_snapshot(run_dir)
    if snapshot is None:
        raise CheckpointError(
            f"{run_dir} holds no checkpoint to resume (train it without --resume)"
        )
    differences = _differences(snapshot.fingerprint, fingerprint)
    if differences:
        raise CheckpointError(
            f"{run_dir} is a different run; --resume needs the options it was started with: "
            + "; ".join(differences)
        )
    return snapshot


def _fixed(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _FREE}


def _differences(saved: dict[str, Any], now: dict[str, Any], where: str = "") -> list[str]:
    """What differs between two fingerprints, as "name: was X, now Y" lines."""
    out = []
    for key in sorted(set(saved) | set(now)):
        name = f"{where}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{name}.")
        elif a != _jsonish(b):
            out.append(f"{name}: was {a!r}, now {b!r}")
    return out


def _jsonish(value: Any) -> Any:
    """Tuples as JSON lists, so a value read back from JSON compares equal."""
    if isinstance(value, tuple | list):
        return [_jsonish(v) for v in value]
    return value
