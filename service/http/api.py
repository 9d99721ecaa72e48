"""The FastAPI application factory: `build_app(settings)`.

The app's lifespan owns the engine (models, batchers, behaviour store, embedded Redis): it is
opened before the first request is accepted (then `app.state.engine`) and stopped after the
last in-flight one finished. Routes live in `service.http.routes` and `service.http.management`
and only call the `service.contracts.Engine` methods.
`create_app()` builds from the environment, for `uvicorn --factory service.http.api:create_app`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from service.contracts import Engine
from service.engine import ScoringEngine
from service.http.errors import install_error_handlers
from service.http.management import router as management_router
from service.http.middleware import RequestContextMiddleware
from service.http.routes import router
from service.http.score_input import score_components
from service.loop_lag import watch_loop_lag
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.tracing import StageTracer, setup_tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)
# Builds a started engine (`ScoringEngine.open`); tests pass a fake one to test the HTTP layer.
OpenEngine = Callable[[Settings, ServiceMetrics, StageTracer | None], Awaitable[Engine]]
NO_FASTAPI_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def build_app(
    settings: Settings | None = None,
    open_engine: OpenEngine | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The app; `tracer_provider` traces without an endpoint (tests: an in-memory exporter)."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    opener = open_engine or ScoringEngine.open
    tracer: StageTracer | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _warn_open_scopes(settings)
        engine = await opener(settings, metrics, tracer)
        app.state.engine = engine
        # What start-up built lives as long as the process: out of the cyclic collector's
        # way, a full collection no longer stops the event loop for 60-120 ms once every
        # few thousand requests (each pause a burst of 504s).
        gc.collect()
        gc.freeze()
        ready, reasons = engine.readiness()
        log.info("service started", extra={"ready": ready, "reasons": reasons})
        lag = asyncio.get_running_loop().create_task(watch_loop_lag(metrics.loop_lag.observe))
        try:
            yield
        finally:
            lag.cancel()
            await engine.stop(settings.graceful_timeout_s)
            log.info("service stopped")

    app = FastAPI(
        title="SlateCTR scoring service",
        version="1",
        lifespan=lifespan,
        # Spans are service.tracing's (OTLP to the configured endpoint, with the scoring
        # stages). FastAPI's own telemetry would add a second server span per request under
        # any global provider, and asks the providers whether one is set on every request.
        telemetry=NO_FASTAPI_TELEMETRY,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, settings=settings)
    app.include_router(router)
    app.include_router(management_router)
    tracer = setup_tracing(app, settings, tracer_provider)
    app.openapi = _with_configured_limits(app.openapi, settings)  # type: ignore[method-assign]
    return app


def _with_configured_limits(
    openapi: Callable[[], dict[str, Any]], settings: Settings
) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document with the scoring body's models (its route decodes the body itself)
    and the list limits these settings enforce (the request models carry only the hard
    ceilings that settings may lower), so a client generated from it refuses what the service
    refuses."""
    limits = {
        ("ScoreRequest", "candidates"): settings.max_candidates,
        ("ScoreRequest", "history"): settings.max_inline_history,
        ("EventsRequest", "events"): settings.max_events,
    }

    def document() -> dict[str, Any]:
        schema = openapi()
        components = schema["components"]["schemas"]
        for name, component in score_components().items():
            components.setdefault(name, component)
        for (model, field), limit in limits.items():
            prop = components[model]["properties"][field]
            for branch in prop.get("anyOf", [prop]):  # an optional list: its array branch
                if branch.get("type") == "array":
                    branch["maxItems"] = limit
        return schema

    return document


def create_app() -> FastAPI:
    return build_app(Settings())


def _warn_open_scopes(settings: Settings) -> None:
    if not settings.ingest_api_keys:
        log.warning("CTR_INGEST_API_KEYS is empty: POST /v1/events accepts any caller")
    if not settings.admin_api_keys:
        log.warning(
            "CTR_ADMIN_API_KEYS is empty: history read/erase and model/routing reloads accept "
            "any caller"
        )
