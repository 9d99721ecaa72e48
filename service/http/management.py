"""The model management API: `GET /v1/models` and the admin reloads (admin API key).

`POST /v1/admin/models/{name}/reload` `{"version": n}` (body optional: the highest version)
answers once the version serves, or with the error that kept the old one serving:
404 unknown name or version, 503 `model_load_failed` (load or warm-up; `details` name the
stage). `POST /v1/admin/routing/reload` re-reads `CTR_ROUTING_FILE`: 422 invalid (with
locations), 409 no routing file configured, 503 a model it names failed to load. Requests name
models by repository name and integer version only; see `service.reload`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Request

from service.engine import ScoringEngine
from service.http.auth import require_key
from service.http.schemas import (
    MODEL_PATTERN,
    ErrorResponse,
    ModelReloadResponse,
    ModelsResponse,
    ModelStatus,
    ReloadModelRequest,
    RoutingReloadResponse,
    ShadowState,
    VersionStatus,
)
from service.pool import Handle

router = APIRouter()
admin = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_key("admin"))])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 422, 503)
}


def _engine(request: Request) -> ScoringEngine:
    engine: ScoringEngine = request.app.state.engine
    return engine


EngineDep = Annotated[ScoringEngine, Depends(_engine)]


@router.get("/v1/models", response_model=ModelsResponse)
async def models(engine: EngineDep) -> ModelsResponse:
    """Loaded models and versions, providers, queue depths, routing and shadow state."""
    registry, pool = engine.registry, engine.pool
    followed = set(engine.reloader.followed()) if engine.settings.reload_poll_s > 0 else set()
    statuses = []
    for name, m in registry.models.items():
        handles = sorted(
            (h for h in pool.handles.values() if h.model.name == name),
            key=lambda h: h.model.version,
        )
        statuses.append(
            ModelStatus(
                name=name,
                version=str(m.version),
                kind=m.kind,
                max_history=m.max_history,
                provider=m.providers[0],
                providers=m.providers,
                default=name == registry.default,
                status="ready",
                versions=[_version(h, m.version) for h in handles],
                follows_latest=name in followed,
            )
        )
    pinned_only = {h.model.name for h in pool.handles.values()} - set(registry.models)
    for name in sorted(pinned_only):  # loaded only at versions the routing file pins
        handles = sorted(
            (h for h in pool.handles.values() if h.model.name == name),
            key=lambda h: h.model.version,
        )
        first = handles[0].model
        statuses.append(
            ModelStatus(
                name=name,
                version=None,
                kind=first.kind,
                max_history=first.max_history,
                provider=first.providers[0],
                providers=first.providers,
                default=False,
                status="ready",
                versions=[_version(h, None) for h in handles],
            )
        )
    for label in registry.failures:
        name, _, version = label.partition(":")
        statuses.append(
            ModelStatus(
                name=name,
                version=version or None,
                kind=None,
                max_history=None,
                provider=None,
                providers=[],
                default=name == registry.default,
                status="failed",
            )
        )
    s = engine.shadow.settings
    shadow = ShadowState(
        queue_max_requests=s.queue_max, timeout_ms=s.timeout_s * 1000, stream=s.stream_key
    )
    return ModelsResponse(
        default_model=registry.default,
        models=statuses,
        routing=_routing(engine),
        shadow=shadow,
        reload_poll_s=engine.settings.reload_poll_s,
    )


def _version(handle: Handle, current: int | None) -> VersionStatus:
    m = handle.model
    shadow = handle.shadow.depth if handle.shadow is not None else 0
    return VersionStatus(
        version=str(m.version),
        current=m.version == current,
        provider=m.providers[0],
        queue_depth=handle.runner.depth,
        shadow_queue_depth=shadow,
        outputs=list(m.output_names),
    )


def _routing(engine: ScoringEngine) -> dict[str, Any]:
    describe = getattr(engine.router, "describe", None)
    return describe() if callable(describe) else {}


@admin.post("/models/{name}/reload", response_model=ModelReloadResponse, responses=_ERRORS)
async def reload_model(
    name: Annotated[str, Path(pattern=MODEL_PATTERN)],
    engine: EngineDep,
    body: Annotated[ReloadModelRequest | None, Body()] = None,
) -> ModelReloadResponse:
    """Loads, warms up and swaps in a version of `name` from the repository; in-flight requests
    finish on the version they started with. On failure the old version keeps serving."""
    version = body.version if body is not None else None
    done = await engine.reloader.reload_model(name, version)
    previous = str(done.previous_version) if done.previous_version is not None else None
    return ModelReloadResponse(
        model=done.model,
        version=str(done.version),
        previous_version=previous,
        changed=done.changed,
        provider=done.provider,
    )


@admin.post("/routing/reload", response_model=RoutingReloadResponse, responses=_ERRORS)
async def reload_routing(engine: EngineDep) -> RoutingReloadResponse:
    """Re-reads the routing file, loads the versions it names, then swaps the routing."""
    done = await engine.reloader.reload_routing()
    return RoutingReloadResponse(
        sha256=done.sha256, changed=done.changed, experiments=done.experiments
    )


router.include_router(admin)
