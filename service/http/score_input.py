"""The inputs of `POST /v1/score`, decoded by hand: the JSON body straight into `ScoreRequest`
by pydantic-core's JSON parser, and the `X-Request-Timeout-Ms` header.

Why not FastAPI's body and header parameters: for each request FastAPI reads the body, parses
it with `json.loads`, checks its content type through `email.message`, solves the parameters
and validates the decoded dicts in a second pass. In a running service that machinery cost the
event loop ~0.4 ms of CPU per 100-candidate request, an eighth of all the loop spent on it
(docs/performance.md "Third pass"); `model_validate_json` is one pass in compiled code.

What a client sees is what FastAPI answered, kept: a content type other than JSON, or an
empty body, is a 422 at `["body"]`; malformed JSON a 422 `json_invalid` at `["body", offset]`;
a body that cannot be decoded at all (invalid UTF-8, nesting deeper than the parser allows) a
400; a field error a 422 at `["body", field, ...]`; a bad header a 422 at
`["header", "x-request-timeout-ms"]`, listed before the body's field errors in one answer.
The OpenAPI document describes the operation as FastAPI would have (`SCORE_OPENAPI`,
`score_components`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from service.http.schemas import ScoreRequest
from service.settings import MAX_REQUEST_TIMEOUT_MS, MIN_REQUEST_TIMEOUT_MS

TIMEOUT_HEADER = "x-request-timeout-ms"
_TIMEOUT_MS: TypeAdapter[float] = TypeAdapter(
    Annotated[
        float, Field(ge=MIN_REQUEST_TIMEOUT_MS, le=MAX_REQUEST_TIMEOUT_MS, allow_inf_nan=False)
    ]
)
_SCHEMAS = "#/components/schemas/{model}"

# The operation's request body and header as FastAPI writes them for parameters it decodes.
SCORE_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "in": "header",
            "name": TIMEOUT_HEADER,
            "required": False,
            # Optional, but never null: a header has no null.
            "schema": {
                "type": "number",
                "minimum": MIN_REQUEST_TIMEOUT_MS,
                "maximum": MAX_REQUEST_TIMEOUT_MS,
                "title": "X-Request-Timeout-Ms",
            },
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": _SCHEMAS.format(model="ScoreRequest")}}
        },
    },
}


def score_components() -> dict[str, Any]:
    """`ScoreRequest` and the models it refers to, as OpenAPI components (FastAPI lists only
    the models of parameters it decodes itself)."""
    schema = ScoreRequest.model_json_schema(ref_template=_SCHEMAS)
    return {**schema.pop("$defs", {}), "ScoreRequest": schema}


def score_inputs(
    body: bytes, content_type: str | None, timeout_header: str | None
) -> tuple[ScoreRequest, float | None]:
    """The body (`score_request`) and the timeout in ms (`timeout_ms`). Their validation errors
    come in one RequestValidationError, the header's first, as FastAPI listed its parameters';
    a body that is not JSON at all fails alone, as FastAPI decoded it before validating
    anything."""
    try:
        requested_ms, header_errors = timeout_ms(timeout_header), []
    except RequestValidationError as exc:
        requested_ms, header_errors = None, list(exc.errors())
    try:
        request = score_request(body, content_type)
    except RequestValidationError as exc:
        undecodable = any(e["type"] == "json_invalid" for e in exc.errors())
        if not header_errors or undecodable:
            raise
        raise RequestValidationError(header_errors + list(exc.errors())) from None
    if header_errors:
        raise RequestValidationError(header_errors)
    return request, requested_ms


def score_request(body: bytes, content_type: str | None) -> ScoreRequest:
    """The request body as a `ScoreRequest`; RequestValidationError (422) or HTTPException
    (400) as the module docstring says."""
    if not _is_json(content_type):
        raise RequestValidationError(
            [_error("content_type", "Content-Type must be application/json")]
        )
    if not body:
        raise RequestValidationError([_error("missing", "Field required")])
    try:
        return ScoreRequest.model_validate_json(body)
    except ValidationError as exc:
        if not any(e["type"] == "json_invalid" for e in exc.errors()):
            raise RequestValidationError(_located("body", exc.errors())) from None
    # Not JSON as pydantic-core reads it: decoded again as FastAPI did, which tells malformed
    # JSON (422, with where) from a body that cannot be decoded (400), and accepts the nesting
    # depth `json` accepts. Only failing requests come here.
    try:
        decoded = json.loads(body)
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise RequestValidationError([error]) from None
    except (RecursionError, UnicodeDecodeError):
        raise HTTPException(400, "There was an error parsing the body") from None
    try:
        return ScoreRequest.model_validate(decoded)
    except ValidationError as exc:
        raise RequestValidationError(_located("body", exc.errors())) from None


def timeout_ms(header: str | None) -> float | None:
    """The `X-Request-Timeout-Ms` header in milliseconds, None when absent;
    RequestValidationError (422) when it is not a finite number within the bounds."""
    if header is None:
        return None
    try:
        return _TIMEOUT_MS.validate_python(header)
    except ValidationError as exc:
        raise RequestValidationError(_located("header", exc.errors(), TIMEOUT_HEADER)) from None


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": kind, "loc": ("body",), "msg": message}


def _located(where: str, errors: Sequence[ErrorDetails], *prefix: str) -> list[dict[str, Any]]:
    return [{**e, "loc": (where, *prefix, *e["loc"])} for e in errors]
