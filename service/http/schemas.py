"""Request and response bodies of the HTTP API (DESIGN.md "HTTP API (v1)").

Every request model forbids unknown fields and bounds its lists; ids match `ID_PATTERN`. The
list bounds here are hard ceilings (they show in the OpenAPI schema); the configured limits in
`Settings` can only be lower and are checked by the routes.

Strictness: lax pydantic mode (an integral float is a valid number, as JSON Schema says) except
that booleans and strings are refused where numbers are expected (lax mode would read `true`
as 1 and `"3"` as 3). The list limits in the OpenAPI document are the configured ones
(`service.http.api` writes them in from the settings the routes enforce).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import TypedDict

from service.contracts import HistorySource, ScoringRequest
from service.settings import HARD_MAX_CANDIDATES, HARD_MAX_EVENTS, HARD_MAX_HISTORY

ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
MODEL_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MAX_CONTEXT_FIELDS = 32
MAX_TS = 1e11  # unix seconds; far beyond any real clock, catches milliseconds sent by mistake


def _json_number(value: Any) -> Any:
    """Numbers as JSON Schema reads them: 1.0 is an integer, but neither `true` nor `"3"` is a
    number (pydantic's lax mode would take both)."""
    if isinstance(value, bool | str):
        raise ValueError(f"a number is required, not a {type(value).__name__}")
    return value


Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ContextValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{0,64}$")]
LongId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
ModelName = Annotated[str, StringConstraints(pattern=MODEL_PATTERN)]
# Field before the validator: its bounds then render as JSON Schema `minimum`/`maximum`.
Timestamp = Annotated[float, Field(ge=0, le=MAX_TS), BeforeValidator(_json_number)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A TypedDict, not a model: dicts cost about half as much to build as model instances, which a
# 100-candidate body builds 100 of (docs/performance.md "Second pass"); the schema is the same.
class ItemRef(TypedDict):
    """An item and its category."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    item_id: Id
    category_id: Id


class ScoreRequest(_Strict):
    request_id: LongId | None = None
    user_id: Id
    candidates: list[ItemRef] = Field(min_length=1, max_length=HARD_MAX_CANDIDATES)
    # additionalProperties false: pydantic writes the key pattern as `patternProperties`, which
    # alone lets any other key through in JSON Schema; the model refuses such keys.
    context: dict[Id, ContextValue] = Field(
        default_factory=dict,
        max_length=MAX_CONTEXT_FIELDS,
        json_schema_extra={"additionalProperties": False},
    )
    history: list[ItemRef] | None = Field(
        None, max_length=HARD_MAX_HISTORY, description="Oldest first; replaces stored history."
    )
    model: ModelName | None = None

    def to_scoring_request(self, request_id: str, deadline: float) -> ScoringRequest:
        """The one conversion from the wire format to the request the engine scores."""
        history = self.history
        return ScoringRequest(
            user_id=self.user_id,
            history=None if history is None else _pairs(history),
            candidates=_pairs(self.candidates),
            context=self.context,
            request_id=request_id,
            model=self.model,
            deadline=deadline,
        )


def _pairs(refs: list[ItemRef]) -> list[tuple[str, str]]:
    return [(r["item_id"], r["category_id"]) for r in refs]


def _absent(value: Any) -> bool:
    return value is None


class ScoreResponse(BaseModel):
    """`conversion_scores` and `ctcvr_scores` are in the body only when the model has them (a
    multi-task model): absent, not null, otherwise, so a single-task body is byte-for-byte what
    it was before multi-task models and clients test for the key, not for null."""

    request_id: str
    model: str
    version: str
    variant: str
    scores: list[float] = Field(description="pCTR: P(click | impression) per candidate.")
    history_source: HistorySource
    conversion_scores: list[float] | SkipJsonSchema[None] = Field(
        None,
        exclude_if=_absent,
        description="pCVR: P(conversion | click, impression) per "
        "candidate; multi-task models only.",
    )
    ctcvr_scores: list[float] | SkipJsonSchema[None] = Field(
        None,
        exclude_if=_absent,
        description="pCTCVR: P(click and conversion | impression) = "
        "scores x conversion_scores per candidate; multi-task models only.",
    )


class EventIn(_Strict):
    user_id: Id
    item_id: Id
    category_id: Id
    # The clock-skew bound is no JSON Schema keyword (it moves with the clock): the description
    # is where a client learns it.
    ts: Timestamp = Field(
        description="Unix seconds; at most CTR_EVENT_MAX_FUTURE_S (default 300) ahead of the "
        "service's clock, else 422."
    )
    event_id: LongId | None = None
    type: Id | None = None


class EventsRequest(_Strict):
    events: list[EventIn] = Field(min_length=1, max_length=HARD_MAX_EVENTS)


# The event types that are a click and so join the user's history (no type: a click).
CLICK_TYPES = frozenset({None, "click"})


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int
    ignored: int = 0  # events whose type is not a click: not part of the history


class HistoryEntry(BaseModel):
    item_id: str
    category_id: str
    ts: float


class HistoryResponse(BaseModel):
    user_id: str
    items: list[HistoryEntry]


class ReloadModelRequest(_Strict):
    # Lax like every number here: 1.0 is the integer 1 (JSON Schema says so), 1.5 and true are
    # refused.
    version: Annotated[int, Field(ge=1), BeforeValidator(_json_number)] | None = Field(
        None, description="A version in the repository; default: the highest."
    )


class ModelReloadResponse(BaseModel):
    model: str
    version: str
    previous_version: str | None
    changed: bool
    provider: str


class RoutingReloadResponse(BaseModel):
    sha256: str
    changed: bool
    experiments: int


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str | None = None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of an operation's errors, all in the one error envelope. List
    exactly the statuses the operation can answer: clients generate code from them (and the
    API fuzz test asks each to be reachable). Every POST can answer 400 (a body that cannot be
    decoded) and 413 (a body over the size limit)."""
    return {status: {"model": ErrorResponse} for status in statuses}
