"""What the `ctr` command groups share: one JSON line of output, the exit for a user's mistake,
and the parsing of list, KEY=VALUE and --set options."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import typer

HISTORY_LEN_OPTION = typer.Option(
    "--history-len", "--max-len", help="History items the models read (the newest)."
)


def echo_json(value: Any) -> None:
    """One JSON line on stdout. An undefined metric (NaN: an AUC over one class) is printed as
    null, because NaN is not JSON and strict parsers reject the whole line."""
    typer.echo(json.dumps(_finite_or_null(value), allow_nan=False))


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


def parsed_sets(model: str, assignments: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set NAME=VALUE assignments for `model`, typed: (its config fields, the training ones
    such as weight_decay); BadParameter names the known fields."""
    from models.overrides import parse_assignments
    from models.registry import model_class
    from models.training.loop import TRAIN_SET_FIELDS, TrainConfig

    for_training = [a for a in assignments if _set_name(a) in TRAIN_SET_FIELDS]
    for_model = [a for a in assignments if _set_name(a) not in TRAIN_SET_FIELDS]
    try:
        overrides = parse_assignments(model_class(model).config_class(), for_model)
        return overrides, parse_assignments(TrainConfig(), for_training)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None


def _set_name(assignment: str) -> str:
    """The NAME of a --set NAME=VALUE, as `models.overrides` reads it."""
    return assignment.partition("=")[0].strip().replace("-", "_")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input files and run directories end with a one-line message and exit code 2; a
    training run stopped by a signal says how to resume it and exits as a signalled process."""
    from models.data.schema import DataError
    from models.training.checkpoint import CheckpointError
    from models.training.distributed.signals import EXIT_INTERRUPTED, Interrupted

    try:
        yield
    except (DataError, CheckpointError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"interrupted: {exc}; the same command with --resume continues", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def names(text: str) -> list[str]:
    """'sarn, din,' -> ['sarn', 'din']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def key_values(items: list[str] | None) -> dict[str, str]:
    """KEY=VALUE options -> dict (items without '=' are a usage error)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--serve-env")
        out[key] = value
    return out
