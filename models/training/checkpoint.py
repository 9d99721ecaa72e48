"""Run directories: a trained model saved so that loading it executes no code.

A run directory written by `ctr train` holds

* `model.safetensors`: every parameter and buffer (safetensors: plain tensors, no pickle);
* `config.json`: the `--model` name, the model config dataclass as a dict, the train config,
  and the embedding table sizes, which is everything needed to rebuild the module;
* `feature_spec.json` + `vocab_<name>.json`: the feature contract (`FeatureSpec.save`);
* `metrics.json`: the training history and the selected epoch's validation metrics.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

from models.registry import is_slate_model, model_class
from runtime.features import FeatureSpec, Vocabulary

FORMAT = "slatectr-run/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
SPEC = "feature_spec.json"


class CheckpointError(Exception):
    """A run directory is missing a file, or a file is unreadable or inconsistent."""


@dataclass
class LoadedRun:
    name: str  # the `--model` name
    model: nn.Module  # in eval mode
    spec: FeatureSpec
    vocabs: dict[str, Vocabulary]
    config: dict[str, Any]  # config.json: model_config, train_config, sizes
    metrics: dict[str, Any]


def save_run(
    run_dir: Path,
    *,
    name: str,
    model: nn.Module,
    model_config: Any,
    train_config: Any,
    sizes: dict[str, int],
    spec: FeatureSpec,
    vocabs: dict[str, Vocabulary],
    metrics: dict[str, Any],
) -> None:
    """Writes a complete run directory (see the module docstring); configs are dataclasses."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(run_dir / WEIGHTS), metadata={"format": FORMAT, "model": name})
    config = {
        "format": FORMAT,
        "model": name,
        "model_config": dataclasses.asdict(model_config),
        "train_config": dataclasses.asdict(train_config),
        "sizes": sizes,
    }
    _write_json(run_dir / CONFIG, config)
    spec.save(run_dir, vocabs)
    _write_json(run_dir / METRICS, metrics)


def load_run(run_dir: Path, device: str = "cpu") -> LoadedRun:
    """Rebuilds the model of a run directory in eval mode; CheckpointError says what is wrong."""
    run_dir = Path(run_dir)
    for required in (WEIGHTS, CONFIG, METRICS, SPEC):
        if not (run_dir / required).is_file():
            raise CheckpointError(
                f"{run_dir} is not a complete run directory: {required} is missing"
            )
    config = _read_json(run_dir / CONFIG)
    metrics = _read_json(run_dir / METRICS)
    try:
        spec, vocabs = FeatureSpec.load(run_dir, slate=is_slate_model(str(config.get("model"))))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        message = f"{run_dir}: cannot read the feature spec or vocabularies: {exc}"
        raise CheckpointError(message) from exc
    model = _build_model(config, run_dir)
    try:
        load_model(model, str(run_dir / WEIGHTS), strict=True, device=device)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        message = f"{run_dir / WEIGHTS} is corrupt or does not fit the model: {exc}"
        raise CheckpointError(message) from exc
    return LoadedRun(config["model"], model.eval(), spec, vocabs, config, metrics)


def _build_model(config: dict[str, Any], run_dir: Path) -> nn.Module:
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{run_dir / CONFIG}: unknown format {config.get('format')!r}")
    try:
        cls = model_class(config["model"])
        model_config = config_from_dict(cls.config_class, config["model_config"])
        module: nn.Module = cls({k: int(v) for k, v in config["sizes"].items()}, model_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{run_dir / CONFIG} does not describe a model: {exc}") from exc
    return module


def config_from_dict(config_class: type[Any], values: dict[str, Any]) -> Any:
    """A config dataclass from its JSON form: unknown keys fail, JSON lists become tuples."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {sorted(unknown)}")
    return config_class(**{k: _tuples(v) for k, v in values.items()})


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=True) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return value
