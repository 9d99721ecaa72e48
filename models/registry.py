"""`--model` names to model classes, imported lazily so that `ctr --help` stays fast."""

from __future__ import annotations

import importlib
from typing import Any

BEHAVIOR_MODELS: dict[str, str] = {
    "sarn": "models.nets.sarn:SARN",
    "fat": "models.nets.fat:FAT",
    "din": "models.nets.baselines:DIN",
    "gru": "models.nets.baselines:GRUCTR",
    "wdl": "models.nets.baselines:WideDeep",
}

SLATE_MODELS: dict[str, str] = {
    "ncm-lr": "models.ncm.models:SlateLogReg",
    "ncm-gru": "models.ncm.models:SlateGRU",
    "ncm": "models.ncm.models:NCM",
    "ncm-adv": "models.ncm.models:AdvNCM",
    "scot": "models.ncm.models:SCOT",
    "ncm-tgru": "models.ncm.models:TransformerGRU",
}

ALL_MODELS = {**BEHAVIOR_MODELS, **SLATE_MODELS}


def is_slate_model(name: str) -> bool:
    return name in SLATE_MODELS


def model_class(name: str) -> type[Any]:
    """The class behind a `--model` name; a clear error lists the names that exist."""
    try:
        target = ALL_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(ALL_MODELS))
        raise ValueError(f"unknown model {name!r}; choose one of: {known}") from None
    module_name, class_name = target.split(":")
    cls: type[Any] = getattr(importlib.import_module(module_name), class_name)
    return cls


def multitask_models() -> list[str]:
    """Behaviour models with a conversion tower (`ctr train --tasks ctr,cvr`)."""
    return [name for name in BEHAVIOR_MODELS if model_class(name).supports_multitask]
