"""Per-request context: request id, arrival time, body-size limit, early refusal, latency
histogram, in-flight gauge and one JSON access line; `POST /v1/score` then goes straight to its
endpoint (`service.http.shortcut`), everything else down the app's stack.

The arrival time (`scope["state"]["arrival"]`, monotonic) starts a scoring request's deadline:
time spent before the handler (body read, validation) counts against it. Before the body is
even read, a `POST /v1/score` is refused with 429 `overloaded` when no loaded model could
answer a request of its usual size by the deadline (`Engine.admits_any`): under overload a
refusal then costs a header look-up, not a body parse on the event loop that every other
request needs. (Checking for a one-candidate request, as first built, let nearly every
request through to be parsed and refused after all: refusals waited behind parses.)

A pure ASGI middleware (no BaseHTTPMiddleware: it would copy the body stream and add a task per
request). The request id is the client's `X-Request-ID` when it is a sane token, otherwise a
fresh one; it is returned on every response, errors included. The metric's labels are the
route template (never the raw path), the model and variant the handler recorded in
`request.state`, and the status code.

The body limit is enforced here rather than with `FastAPI(max_body_size=...)`: Starlette's
limiter answers in plain text, and this keeps the 413 in the service's JSON error envelope. A
declared Content-Length over the limit is refused before reading; a chunked body is counted
as it arrives and refused as soon as it passes the limit.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.errors import error_response
from service.http.score_input import TIMEOUT_HEADER, timeout_ms
from service.http.shortcut import is_score, score_route, serve_score
from service.logs import request_id_var
from service.metrics import ServiceMetrics
from service.scoring.batcher import Overloaded
from service.settings import Settings

access_log = logging.getLogger("service.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_QUIET = {"/healthz", "/readyz", "/metrics"}


class BodyTooLarge(HTTPException):
    """Raised from `receive`; FastAPI re-raises HTTPExceptions met while reading the body."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


def _incoming_request_id(scope: Scope) -> str | None:
    text = _header(scope, b"x-request-id")
    return text if text is not None and _REQUEST_ID.match(text) else None


def _declared_length(scope: Scope) -> int:
    text = _header(scope, b"content-length")
    return int(text) if text is not None and text.isdigit() else 0


def _requested_timeout_ms(scope: Scope) -> float | None:
    """The client's X-Request-Timeout-Ms if it is valid (else the route answers 422)."""
    try:
        return timeout_ms(_header(scope, TIMEOUT_HEADER.encode()))
    except RequestValidationError:
        return None


def refused_early(app: Any, scope: Scope, arrival: float) -> bool:
    """Whether `app` refuses the scoring request `scope` from its headers: no loaded model could
    answer a request of its usual size by its deadline."""
    engine = getattr(app.state, "engine", None)
    settings: Settings = app.state.settings
    deadline = arrival + settings.timeout_s(_requested_timeout_ms(scope))
    return engine is not None and not engine.admits_any(deadline)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, settings: Settings) -> None:
        self.app = app
        self.metrics = metrics
        self.settings = settings
        self.max_body_bytes = settings.max_body_bytes
        # (endpoint, model, variant, status) -> its histogram child: a `.labels()` look-up per
        # request costs as much as the observation (label values are few: DESIGN.md metrics).
        self._durations: dict[tuple[str, str, str, str], Any] = {}
        self._score_route = score_route()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = time.monotonic()
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["arrival"] = request_id, arrival
        token = request_id_var.set(request_id)
        status = 500  # what the client sees if the app fails before answering
        started = False
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                scored_at = state.get("scored_at")
                if scored_at is not None:
                    self.metrics.stages["respond"].observe(time.monotonic() - scored_at)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        scoring = is_score(scope)
        if scoring:  # refusals before the endpoint are counted under its route too
            scope["route"] = self._score_route
        self.metrics.inflight.inc()
        try:
            early = self._early_refusal(scope, arrival) if scoring else None
            if _declared_length(scope) > self.max_body_bytes:
                response = error_response(413, "payload_too_large", "request body too large")
                await response(scope, receive, send_with_id)
            elif early is not None:
                await early(scope, receive, send_with_id)
            elif scoring:
                await serve_score(self._score_route, scope, limited_receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except Exception as exc:
            # Answered here rather than by Starlette's outermost handler so that the generic
            # 500 still carries the request id (header and body); the traceback goes to the log.
            access_log.error("unhandled error", exc_info=exc)
            if not started:
                await error_response(500, "internal_error", "internal error")(
                    scope, receive, send_with_id
                )
        finally:
            self.metrics.inflight.dec()
            self._record(scope, status, time.perf_counter() - start)
            request_id_var.reset(token)

    def _early_refusal(self, scope: Scope, arrival: float) -> JSONResponse | None:
        """429 for a scoring request no model could answer in time (see the module docstring)."""
        if not refused_early(scope["app"], scope, arrival):
            return None
        self.metrics.rejected.labels(Overloaded.reason).inc()
        retry = str(self.settings.retry_after_s)
        return error_response(
            self.settings.shed_status,
            Overloaded.reason,
            Overloaded.message,
            headers={"Retry-After": retry},
        )

    def _record(self, scope: Scope, status: int, elapsed: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        state = scope.get("state", {})
        model, variant = state.get("model", ""), state.get("variant", "")
        labels = (endpoint, model, variant, str(status))
        child = self._durations.get(labels)
        if child is None:
            child = self._durations[labels] = self.metrics.request_duration.labels(*labels)
        child.observe(elapsed)
        level = logging.DEBUG if endpoint in _QUIET else logging.INFO
        access_log.log(
            level,
            "%s %s %d",
            scope.get("method", ""),
            endpoint,
            status,
            extra={
                "method": scope.get("method", ""),
                "endpoint": endpoint,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                "model": model or None,
                "variant": variant or None,
                "experiment": state.get("experiment"),
                "model_version": state.get("model_version"),
                "history_source": state.get("history_source"),
                "client_request_id": state.get("client_request_id"),
            },
        )
