"""`ctr train`: data -> vocabularies -> model -> `fit` -> run directory.

The one dispatch point between the two kinds of task: slate click models train on
`models.ncm.task`, every other model on `models.training.behavior_task`. It imports both tasks
and the loop; the tasks import the loop only, so there is no import circle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.ncm.task import build_slate_task
from models.registry import is_slate_model, model_class
from models.training.behavior_task import build_behavior_task
from models.training.checkpoint import config_from_dict, save_run
from models.training.loop import TrainConfig, TrainingTask, fit, to_builtin


def train_run(
    model_name: str,
    train_path: Path,
    valid_path: Path,
    run_dir: Path,
    config: TrainConfig,
    model_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`ctr train`: fits vocabularies on the training file only, builds the `--model`, trains
    it with early stopping and writes the run directory (`models.training.checkpoint`).

    `model_overrides` are fields of the model's config dataclass. -> the metrics written to
    RUN/metrics.json.
    """
    cls = model_class(model_name)
    model_config = config_from_dict(cls.config_class, model_overrides or {})
    task: TrainingTask
    if is_slate_model(model_name):
        sizes, task, spec, vocabs = build_slate_task(train_path, valid_path, config)
    else:
        negatives = bool(getattr(cls, "needs_negatives", False))
        sizes, task, spec, vocabs = build_behavior_task(
            train_path, valid_path, config, negatives, model_config.tasks
        )
    torch.manual_seed(config.seed)
    model = cls(sizes, model_config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_log.jsonl").unlink(missing_ok=True)
    metrics = to_builtin({"model": model_name, **fit(model, task, config, run_dir, progress)})
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
    return metrics
