"""The HTTP routes: thin translations between the API schemas and the engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from service.contracts import Engine, Event
from service.http.auth import require_key
from service.http.deps import EngineDep, SettingsDep
from service.http.errors import LimitExceeded
from service.http.schemas import (
    CLICK_TYPES,
    ID_PATTERN,
    EventsRequest,
    EventsResponse,
    HistoryEntry,
    HistoryResponse,
    ScoreRequest,
    ScoreResponse,
    error_responses,
)
from service.http.score_input import SCORE_OPENAPI, TIMEOUT_HEADER, score_inputs
from service.settings import Settings

router = APIRouter()
UserId = Annotated[str, Path(pattern=ID_PATTERN)]


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses=error_responses(400, 404, 413, 422, 429, 503, 504),
    openapi_extra=SCORE_OPENAPI,
)
async def score(request: Request) -> Response:
    """Scores `candidates` for `user_id`; `scores[i]` belongs to `candidates[i]` (as do
    `conversion_scores[i]` and `ctcvr_scores[i]` of a multi-task model)."""
    # The hot path decodes its own body and header (`service.http.score_input`: FastAPI's
    # parameter machinery cost the loop ~0.4 ms per request), takes the engine and settings
    # from the app state rather than as dependencies, and answers with the encoded body
    # (FastAPI would validate the ScoreResponse again).
    headers = request.headers
    body, requested_ms = score_inputs(
        await request.body(), headers.get("content-type"), headers.get(TIMEOUT_HEADER)
    )
    state = request.app.state
    engine: Engine = state.engine
    settings: Settings = state.settings
    arrival = request.state.arrival
    state.metrics.stages["parse"].observe(time.monotonic() - arrival)
    _check_score_limits(body, settings)
    request_id = body.request_id or request.state.request_id
    deadline = arrival + settings.timeout_s(requested_ms)
    result = await engine.score(body.to_scoring_request(request_id, deadline))
    request.state.scored_at = time.monotonic()
    request.state.model, request.state.variant = result.model, result.variant
    request.state.model_version, request.state.experiment = result.version, result.experiment
    request.state.history_source = result.history_source
    request.state.client_request_id = body.request_id
    answer = ScoreResponse(
        request_id=request_id,
        model=result.model,
        version=str(result.version),
        variant=result.variant,
        scores=result.scores,
        history_source=result.history_source,
        conversion_scores=result.conversion_scores,
        ctcvr_scores=result.ctcvr_scores,
    )
    # The shadow copy, if any, is queued after the answer is sent.
    after = None if result.after_response is None else BackgroundTask(_call, result.after_response)
    return Response(answer.model_dump_json(), media_type="application/json", background=after)


@router.post(
    "/v1/events",
    status_code=202,
    response_model=EventsResponse,
    responses=error_responses(400, 401, 403, 413, 422, 503),
    dependencies=[Depends(require_key("ingest"))],
)
async def ingest(body: EventsRequest, engine: EngineDep, settings: SettingsDep) -> EventsResponse:
    """Appends click events to the users' histories; idempotent per `event_id`. Events of
    another `type` (a conversion, a view) are counted as `ignored`: the models' histories are
    clicks only, as in training. 503 when Redis is down."""
    if len(body.events) > settings.max_events:
        raise LimitExceeded(["body", "events"], f"at most {settings.max_events} events per request")
    horizon = time.time() + settings.event_max_future_s
    for i, e in enumerate(body.events):
        if e.ts > horizon:
            raise LimitExceeded(["body", "events", i, "ts"], "event timestamp is in the future")
    clicks = [e for e in body.events if e.type in CLICK_TYPES]
    ignored = len(body.events) - len(clicks)
    events = [Event(e.user_id, e.item_id, e.category_id, e.ts, e.event_id) for e in clicks]
    result = await engine.ingest(events, ignored)
    return EventsResponse(accepted=result.accepted, duplicates=result.duplicates, ignored=ignored)


@router.get(
    "/v1/users/{user_id}/history",
    response_model=HistoryResponse,
    responses=error_responses(401, 403, 422, 503),
    dependencies=[Depends(require_key("admin"))],
)
async def get_history(user_id: UserId, engine: EngineDep) -> HistoryResponse:
    """The stored sequence, oldest first (the order a model sees), at most the cap."""
    items = await engine.history(user_id)
    entries = [HistoryEntry(item_id=h.item_id, category_id=h.category_id, ts=h.ts) for h in items]
    return HistoryResponse(user_id=user_id, items=entries)


@router.delete(
    "/v1/users/{user_id}/history",
    status_code=204,
    responses=error_responses(401, 403, 422, 503),
    dependencies=[Depends(require_key("admin"))],
)
async def erase_history(user_id: UserId, engine: EngineDep) -> Response:
    """Erases everything stored about the user."""
    await engine.erase(user_id)
    return Response(status_code=204)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. Touches neither the models nor Redis."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready (reasons listed)"}})
async def readyz(engine: EngineDep) -> JSONResponse:
    """Readiness: models loaded (on the GPU if required) and not draining. Not Redis."""
    ready, reasons = engine.readiness()
    body = {"status": "ready" if ready else "not_ready", "reasons": reasons}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, engine: EngineDep) -> Response:
    """Prometheus text format (aggregated across processes in multiprocess mode)."""
    engine.readiness()  # on the loop: ctr_ready is current at every scrape, not only per probe
    service_metrics = request.app.state.metrics
    exposition = await run_in_threadpool(service_metrics.render)  # reads files when multiprocess
    return Response(exposition, media_type=service_metrics.content_type)


async def _call(function: Callable[[], None]) -> None:
    """A coroutine, so Starlette runs it on the loop rather than in its thread pool."""
    function()


def _check_score_limits(body: ScoreRequest, settings: Settings) -> None:
    if len(body.candidates) > settings.max_candidates:
        raise LimitExceeded(["body", "candidates"], f"at most {settings.max_candidates} candidates")
    limit = settings.max_inline_history
    if body.history is not None and len(body.history) > limit:
        raise LimitExceeded(["body", "history"], f"at most {limit} history items")
