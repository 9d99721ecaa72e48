"""API keys for the write and admin endpoints (separate scopes: ingest, admin).

Keys come from the settings (`CTR_INGEST_API_KEYS`, `CTR_ADMIN_API_KEYS`, several allowed for
rotation) and are sent in `X-API-Key`. With no keys configured for a scope its endpoints are
open (local development; the service logs a warning at start). Missing key: 401; wrong key
(including a key of the other scope): 403. Every configured key is compared in constant time,
without stopping at the first match, so timing reveals neither a key nor which one matched.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

Scope = Literal["ingest", "admin"]
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def key_matches(given: str, keys: Sequence[SecretStr]) -> bool:
    found = False
    for key in keys:
        found |= secrets.compare_digest(given.encode(), key.get_secret_value().encode())
    return found


def require_key(scope: Scope) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency enforcing the keys of `scope`."""

    async def check(request: Request, key: str | None = Security(api_key_header)) -> None:
        settings = request.app.state.settings
        keys = settings.ingest_api_keys if scope == "ingest" else settings.admin_api_keys
        if not keys:
            return
        if not key:
            raise HTTPException(401, "missing API key", headers={"WWW-Authenticate": "ApiKey"})
        if not key_matches(key, keys):
            raise HTTPException(403, "API key not valid for this endpoint")

    return check
