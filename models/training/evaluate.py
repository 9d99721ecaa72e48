"""`ctr evaluate`: a trained run directory scored on a sample file (or a directory of them).

The metrics are those `ctr train` logs for validation (same batches, same code path), so
evaluating on the validation file reproduces metrics.json's "valid" numbers. Behaviour models
report {"model", "auc", "logloss", "n"}; a run with a conversion task (`ctr train --tasks`)
adds "cvr_auc" and, multi-task, "ctcvr_auc"/"ctcvr_logloss", and needs the file's
`conversion` column. Slate click models add "f1" and "accuracy" (their task in
`models.ncm.task` computes them). A metric that is undefined on the file (an AUC over one
class) is NaN here; the CLI prints it as null.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from models.nets.base import BehaviorModel
from models.registry import is_slate_model
from models.training.behavior_task import evaluate_behavior, file_batches
from models.training.checkpoint import load_run
from models.training.loop import TrainConfig, resolve_device


def evaluate_run(run_dir: Path, data_path: Path, device: str = "auto") -> dict[str, Any]:
    """-> {"model": name, "auc": .., "logloss": .., "n": .., ...} for the run on data_path."""
    run = load_run(run_dir)
    run.model.to(resolve_device(device))
    if is_slate_model(run.name):
        from models.ncm.task import evaluate_slate_run  # the one dispatch point for slate models

        metrics = evaluate_slate_run(run, data_path)
    else:
        batch_size = int(run.config["train_config"].get("eval_batch_size", _EVAL_BATCH))
        # the run's own tasks: a conversion model needs the file's conversions, and a file
        # without them is a DataError here rather than silently fewer metrics. The file is
        # streamed: memory holds a chunk and the predictions, not the file.
        batches = file_batches(data_path, run.spec, run.vocabs, _tasks(run.model), batch_size)
        metrics = evaluate_behavior(run.model, batches)
        metrics.pop("selection", None)  # the early-stopping criterion, not a test metric
    return {"model": run.name, **metrics}


_EVAL_BATCH = TrainConfig.eval_batch_size


def _tasks(model: nn.Module) -> tuple[str, ...]:
    assert isinstance(model, BehaviorModel), "slate models are evaluated by their own task"
    return model.tasks
