"""`NAME=VALUE` assignments onto a config dataclass, typed by the field's current value.

Shared by `ctr simulate --set` and `ctr train --set`, so that every knob of a config is
reachable from the command line without one option per field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_assignments(config: Any, assignments: list[str]) -> dict[str, Any]:
    """The typed values of "name=value" assignments for fields of the dataclass `config`.

    Unknown names and unparsable values raise ValueError naming the known fields. Booleans
    accept true/false/yes/no/on/off/1/0 (Python's `bool("false")` would be True).
    """
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    parsed: dict[str, Any] = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in values:
            known = ", ".join(sorted(values))
            raise ValueError(f"expected NAME=VALUE with NAME one of: {known}; got {assignment!r}")
        parsed[name] = _convert(name, values[name], text.strip())
    return parsed


def with_overrides(config: C, assignments: list[str]) -> C:
    """A copy of the dataclass `config` with the assignments applied."""
    return dataclasses.replace(config, **parse_assignments(config, assignments))  # type: ignore[type-var]


def _convert(name: str, current: Any, text: str) -> Any:
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError(f"{name}: {text!r} is not true or false")
    if isinstance(current, tuple):
        kind = type(current[0]) if current else int
        return tuple(_convert(name, kind(), part) for part in text.split(",") if part.strip())
    kind = type(current) if current is not None else str
    try:
        return kind(text)
    except ValueError as err:
        raise ValueError(f"{name}: {text!r} is not a valid {kind.__name__}") from err
