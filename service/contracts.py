"""What the HTTP layer and the engine agree on: the `Engine` protocol and the types it takes
and returns (no logic here).

The HTTP layer (`service.http`) holds an `Engine` and calls its methods; it never reaches into
the engine's parts (models, pool, store, router). `service.engine.ScoringEngine` is the real
one; tests drive the routes with a fake. One scoring request is one type from the route to
the runtime: `runtime.feeds.ScoringRequest`, built once by the route. A `Route` is what a
`Router` decides for it: the model (and optionally a pinned version), the variant that goes
into the response, the logs and a metric label, the experiment it belongs to, and the shadow
to mirror it to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from runtime.feeds import HistorySource, ScoringRequest

__all__ = ["HistorySource", "ScoringRequest"]  # re-exported: the HTTP layer's vocabulary
DEFAULT_VARIANT = "default"  # no experiment matched: the default model
PINNED_VARIANT = "pinned"  # the request named its model: routing was bypassed


class UnknownModel(LookupError):
    """The request names a model the service does not have (a client error)."""


class ModelUnavailable(Exception):
    """The model exists in the configuration but is not loaded (a server-side condition)."""


class StoreUnavailable(Exception):
    """Redis could not answer within the budget (timeout, connection error, open breaker)."""


class ReloadFailed(Exception):
    """An admin reload that was refused or failed; the previous state keeps serving."""

    def __init__(
        self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


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


class Router(Protocol):
    def route(self, request: ScoringRequest) -> Route: ...


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


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    category_id: str
    ts: float
    event_id: str | None = None


@dataclass(frozen=True)
class HistoryItem:
    item_id: str
    category_id: str
    ts: float


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int


@dataclass(frozen=True)
class ModelReloaded:
    model: str
    version: int
    previous_version: int | None
    changed: bool
    provider: str


@dataclass(frozen=True)
class RoutingReloaded:
    sha256: str
    changed: bool
    experiments: int


# --- what GET /v1/models shows (pydantic: the route returns them as they are) -----------------


class VersionStatus(BaseModel):
    version: str
    current: bool  # serves requests that pin no version
    provider: str
    layout: str = "slate-shared"  # which of the version's graphs runs (docs/export.md, layouts)
    queue_depth: int
    shadow_queue_depth: int  # shadow requests waiting or running on this version
    # What this version's /v1/score bodies carry: ["scores"], or with a multi-task model
    # ["scores", "conversion_scores", "ctcvr_scores"] (versions of one name may differ).
    outputs: list[str] = Field(default_factory=list)


class RefusedVersionStatus(BaseModel):
    version: str
    stage: str  # "load" or "warmup"
    error: str  # the error's type; the log has the details


class ModelStatus(BaseModel):
    name: str
    version: str | None  # the current version
    kind: str | None
    max_history: int | None = Field(description="History items the model reads (history_len).")
    provider: str | None
    providers: list[str]
    default: bool
    status: Literal["ready", "failed"]
    versions: list[VersionStatus] = Field(default_factory=list, description="Loaded versions.")
    follows_latest: bool = False  # moves to the repository's highest version when polling
    # Newer versions that did not load at start-up (newest first); an older one serves.
    refused_versions: list[RefusedVersionStatus] = Field(default_factory=list)


class ShadowState(BaseModel):
    queue_max_requests: int
    timeout_ms: float
    stream: str | None  # Redis stream key of the score pairs, when enabled


class ModelsResponse(BaseModel):
    default_model: str | None
    models: list[ModelStatus]
    routing: dict[str, Any] = Field(
        default_factory=dict,
        description="The routing file's name and sha256, and its experiments (salts omitted).",
    )
    shadow: ShadowState | None = None
    reload_poll_s: float = 0.0


class Engine(Protocol):
    """What the HTTP layer asks of the service. Errors are the exceptions above plus the
    batcher's `Rejected`/`DeadlineExceeded` and the store's `StoreUnavailable`."""

    async def score(self, request: ScoringRequest) -> ScoreResult: ...

    async def ingest(self, events: Sequence[Event], ignored: int = 0) -> IngestResult: ...

    async def history(self, user_id: str) -> list[HistoryItem]: ...

    async def erase(self, user_id: str) -> None: ...

    def readiness(self) -> tuple[bool, list[str]]: ...

    def admits_any(self, deadline: float) -> bool:
        """Whether some loaded model version could answer a request of its usual size by
        `deadline` (checked before a scoring request's body is read)."""
        ...

    def status(self) -> ModelsResponse: ...

    async def reload_model(self, name: str, version: int | None) -> ModelReloaded: ...

    async def reload_routing(self) -> RoutingReloaded: ...

    def begin_drain(self) -> None: ...

    async def stop(self, timeout_s: float) -> None: ...
