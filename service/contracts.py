"""The types the engine, the router and the shadow scorer share (no logic here).

`ScoreInput` is one scoring request as the engine sees it; `Route` is what a `Router` decides
for it: the model (and optionally a pinned version), the variant that goes into the response,
the logs and a metric label, the experiment it belongs to, and the shadow to mirror it to.
`service.engine` re-exports these names, which is where the HTTP layer and tests import them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

HistorySource = Literal["redis", "inline", "fallback"]
DEFAULT_VARIANT = "default"  # no experiment matched: the default model
PINNED_VARIANT = "pinned"  # the request named its model: routing was bypassed


class UnknownModel(LookupError):
    """The request names a model the service does not have (a client error)."""


class ModelUnavailable(Exception):
    """The model exists in the configuration but is not loaded (a server-side condition)."""


@dataclass(frozen=True)
class ScoreInput:
    request_id: str
    user_id: str
    candidates: Sequence[tuple[str, str]]
    context: Mapping[str, str]
    history: Sequence[tuple[str, str]] | None  # inline history, oldest first; None: use store
    model: str | None
    deadline: float  # time.monotonic() seconds


@dataclass(frozen=True)
class ShadowSpec:
    """Mirror `fraction` of a variant's requests to `model` (at `version`, else its current)."""

    model: str
    version: int | None = None
    fraction: float = 1.0


@dataclass(frozen=True)
class Route:
    model: str
    variant: str
    version: int | None = None  # None: the model's current version
    experiment: str | None = None
    shadow: ShadowSpec | None = None


@dataclass(frozen=True)
class ScoreResult:
    model: str
    version: int
    variant: str
    scores: list[float]  # pCTR, aligned with the candidates
    history_source: HistorySource
    experiment: str | None = None
    # To call once the response has been sent (queues the shadow copy), if any.
    after_response: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    # pCVR and pCTCVR of a multi-task model, aligned like `scores`; None for a single-task one.
    conversion_scores: list[float] | None = None
    ctcvr_scores: list[float] | None = None


class Router(Protocol):
    def route(self, request: ScoreInput) -> Route: ...
