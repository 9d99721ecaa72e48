"""Step 2 (and 5) of `ctr bench gpu`: the models to check, trained on the device and exported.

A small world is simulated (`ctr simulate`), each model is trained for a couple of epochs on
it with `--device cuda` (`models.training.run.train_run`, what `ctr train` calls) and
exported with its fp16 variant (`exporters.pipeline.export_run`, what `ctr export --fp16`
calls, whose own gates — ONNX vs PyTorch on the CPU and the fp16 validation AUC — run on the
way). The training logs are step 5's evidence: the mean training loss of the last epoch
against the first.

With `--repo` (and `--world`), the models come from that repository and only the service's
model is trained, for step 5.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.gpu.config import CheckConfig, failure

Say = Callable[[str], None]


@dataclass
class Models:
    """What later steps read: where the models and their data are."""

    world: Path
    dirs: dict[str, Path] = field(default_factory=dict)  # name -> model version directory
    training: list[dict[str, Any]] = field(default_factory=list)
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # name -> why it is missing


def data_file(world: Path, model: str, split: str) -> Path:
    """The world's labelled samples a model trains on: behaviour rows or slate sessions."""
    from models.registry import is_slate_model

    return world / ("slates" if is_slate_model(model) else "behavior") / f"{split}.parquet"


def simulate(config: CheckConfig) -> Path:
    from models.simulate import SimulationConfig, simulate_world

    world = config.work_dir / "world"
    settings = SimulationConfig(
        n_users=config.world_users,
        n_items=config.world_items,
        n_categories=config.world_categories,
        events_per_user=config.world_events,
        sessions_per_user=config.world_sessions,
        seed=config.seed,
    )
    simulate_world(settings, world, progress=False)
    return world


def training_summary(name: str, device: str, batch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-epoch mean training loss and validation AUC; whether the loss fell."""
    epochs = metrics["epochs"]
    losses = [float(e["train_loss"]) for e in epochs]
    samples = [round(e["train_samples_per_s"] * e["train_seconds"]) for e in epochs]
    return {
        "model": name,
        "device": device,
        "epochs": len(epochs),
        "samples": sum(samples),
        "steps": sum(math.ceil(s / batch) for s in samples),  # batches of `batch` samples
        "seconds": sum(float(e["train_seconds"]) for e in epochs),
        "train_loss": losses,
        "valid_auc": [e.get("valid_auc") for e in epochs],
        "loss_fell": len(losses) > 1 and losses[-1] < losses[0],
    }


def train(config: CheckConfig, world: Path, name: str, device: str) -> tuple[Path, dict[str, Any]]:
    from models.registry import is_slate_model
    from models.training.loop import train_config_for
    from models.training.run import train_run

    run_dir = config.work_dir / "runs" / name
    batch = config.slate_batch_size if is_slate_model(name) else config.batch_size
    settings = train_config_for(
        name,
        epochs=config.epochs,
        batch_size=batch,
        history_len=config.history,
        device=device,
        seed=config.seed,
    )
    metrics = train_run(
        name,
        data_file(world, name, "train"),
        data_file(world, name, "test"),
        run_dir,
        settings,
        progress=False,
    )
    return run_dir, training_summary(name, device, batch, metrics)


def export(config: CheckConfig, world: Path, run_dir: Path, name: str) -> dict[str, Any]:
    from exporters.pipeline import ExportOptions, export_run

    options = ExportOptions(
        name=name, fp16=True, data=data_file(world, name, "test"), auc_rows=config.auc_rows
    )
    return export_run(run_dir, config.work_dir / "repo", options).summary()


def build(config: CheckConfig, device: str, say: Say) -> Models:
    """Simulate, train on `device` and export every model (or take them from `config.repo`).
    A model that fails is recorded in `errors` and left out of the later steps."""
    import torch

    torch.set_num_threads(1)  # as the export does; more threads on a shared box only contend
    if config.repo is not None:
        return _taken(config, device, say)
    say("simulating the world")
    models = Models(simulate(config))
    for name in config.models:
        try:
            say(f"training {name} on {device}")
            run_dir, summary = train(config, models.world, name, device)
            models.training.append(summary)
            say(f"exporting {name} (fp32 + fp16, with the export's own gates)")
            models.exports[name] = export(config, models.world, run_dir, name)
            models.dirs[name] = Path(models.exports[name]["dir"])
        except Exception as exc:  # one model's failure must not hide the others' figures
            models.errors[name] = failure(exc)
            say(f"{name} failed: {models.errors[name]}")
    return models


def _taken(config: CheckConfig, device: str, say: Say) -> Models:
    from runtime.repository import latest_version, model_dir

    assert config.repo is not None
    if config.world is None:
        raise ValueError("--repo needs --world: the world its models were trained on")
    models = Models(config.world)
    for name in config.models:
        models.dirs[name] = model_dir(config.repo, name, latest_version(config.repo, name))
    say(f"training {config.service_model} on {device} (the models come from {config.repo})")
    models.training.append(train(config, config.world, config.service_model, device)[1])
    return models
