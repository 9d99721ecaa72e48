"""One JSON error envelope for every failure: `{"error": {"code", "message", "details"?},
"request_id"}`.

Client mistakes are 4xx and say what is wrong (validation details carry the location and the
reason, never the submitted value, which may be user data). Overload and unavailable
dependencies are 429/503 with Retry-After; deadlines 504. Anything unexpected is a generic 500:
the traceback goes to the log, never into the response (see `service.http.middleware`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.engine import ModelUnavailable, UnknownModel
from service.logs import request_id_var
from service.reload import ReloadFailed
from service.scoring.batcher import DeadlineExceeded, Rejected
from service.store.behavior import StoreUnavailable

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


class LimitExceeded(Exception):
    """A request over a configured limit (the schemas only enforce the hard ceilings)."""

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = list(loc)
        self.message = message


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    body = {"error": error, "request_id": request_id_var.get()}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    # Only where and why: pydantic's `input` would echo user data back (RELIABILITY §3.4).
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = _validation_details(exc.errors())
    return error_response(422, "invalid_request", "request validation failed", details)


async def _on_limit(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LimitExceeded)
    details = [{"loc": exc.loc, "msg": exc.message, "type": "limit_exceeded"}]
    return error_response(422, "invalid_request", exc.message, details)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    return error_response(exc.status_code, code, message, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette names only the first route that
    matched the path, so a GET and a DELETE on one path would answer `Allow: GET`."""
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.routes
        )
    ]
    return ", ".join(allowed)


async def _on_rejected(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Rejected)
    headers = {"Retry-After": str(exc.retry_after_s)}
    return error_response(exc.status, exc.reason, exc.message, headers=headers)


async def _on_deadline(request: Request, exc: Exception) -> JSONResponse:
    return error_response(504, "deadline_exceeded", "the request deadline passed before scoring")


async def _on_store(request: Request, exc: Exception) -> JSONResponse:
    log.warning("behaviour store unavailable: %s", exc)
    headers = {"Retry-After": "1"}
    return error_response(503, "store_unavailable", "behaviour store unavailable", headers=headers)


async def _on_unknown_model(request: Request, exc: Exception) -> JSONResponse:
    return error_response(404, "unknown_model", f"no model named {exc}")


async def _on_model_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return error_response(
        503, "model_unavailable", "model not loaded", headers={"Retry-After": "5"}
    )


async def _on_reload_failed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ReloadFailed)
    return error_response(exc.status, exc.code, exc.message, exc.details)


def install_error_handlers(app: FastAPI) -> None:
    handlers = {
        RequestValidationError: _on_validation,
        LimitExceeded: _on_limit,
        StarletteHTTPException: _on_http,
        Rejected: _on_rejected,
        DeadlineExceeded: _on_deadline,
        StoreUnavailable: _on_store,
        UnknownModel: _on_unknown_model,
        ModelUnavailable: _on_model_unavailable,
        ReloadFailed: _on_reload_failed,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
