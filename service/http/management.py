"""The model management API: `GET /v1/models` and the admin reloads (admin API key).

`POST /v1/admin/models/{name}/reload` `{"version": n}` (body optional: the highest version)
answers once the version serves, or with the error that kept the old one serving:
404 unknown name or version, 503 `model_load_failed` (load or warm-up; `details` name the
stage). `POST /v1/admin/routing/reload` re-reads `CTR_ROUTING_FILE`: 422 invalid (with
locations), 409 no routing file configured, 503 a model it names failed to load. Requests name
models by repository name and integer version only; see `service.reload`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path

from service.contracts import ModelsResponse
from service.http.auth import require_key
from service.http.deps import EngineDep
from service.http.schemas import (
    MODEL_PATTERN,
    ModelReloadResponse,
    ReloadModelRequest,
    RoutingReloadResponse,
    error_responses,
)

router = APIRouter()
admin = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_key("admin"))])


@router.get("/v1/models", response_model=ModelsResponse)
async def models(engine: EngineDep) -> ModelsResponse:
    """Loaded models and versions, providers, queue depths, routing and shadow state."""
    return engine.status()


@admin.post(
    "/models/{name}/reload",
    response_model=ModelReloadResponse,
    responses=error_responses(400, 401, 403, 404, 413, 422, 503),
)
async def reload_model(
    name: Annotated[str, Path(pattern=MODEL_PATTERN)],
    engine: EngineDep,
    body: Annotated[ReloadModelRequest | None, Body()] = None,
) -> ModelReloadResponse:
    """Loads, warms up and swaps in a version of `name` from the repository; in-flight requests
    finish on the version they started with. On failure the old version keeps serving."""
    version = body.version if body is not None else None
    done = await engine.reload_model(name, version)
    previous = str(done.previous_version) if done.previous_version is not None else None
    return ModelReloadResponse(
        model=done.model,
        version=str(done.version),
        previous_version=previous,
        changed=done.changed,
        provider=done.provider,
    )


@admin.post(
    "/routing/reload",
    response_model=RoutingReloadResponse,
    responses=error_responses(401, 403, 409, 413, 422, 503),
)
async def reload_routing(engine: EngineDep) -> RoutingReloadResponse:
    """Re-reads the routing file, loads the versions it names, then swaps the routing."""
    done = await engine.reload_routing()
    return RoutingReloadResponse(
        sha256=done.sha256, changed=done.changed, experiments=done.experiments
    )


router.include_router(admin)
