"""What GET /v1/models shows, read from the model pool: each model's current version and every
loaded version with its provider, queue depths and outputs; models pinned only by the routing
file; models that failed to load; the routing and shadow state."""

from __future__ import annotations

from typing import Any

from service.contracts import (
    ModelsResponse,
    ModelStatus,
    RefusedVersionStatus,
    ShadowState,
    VersionStatus,
)
from service.pool import Handle, ModelPool
from service.settings import Settings
from service.shadow import ShadowSettings


def models_status(
    pool: ModelPool,
    followed: set[str],
    routing: dict[str, Any],
    shadow: ShadowSettings,
    settings: Settings,
) -> ModelsResponse:
    registry = pool.registry
    statuses = [
        _loaded(name, _handles(pool, name), model.version, name == registry.default, followed)
        for name, model in registry.models.items()
    ]
    pinned_only = {h.model.name for h in pool.handles.values()} - set(registry.models)
    for name in sorted(pinned_only):  # loaded only at versions the routing file pins
        statuses.append(_loaded(name, _handles(pool, name), None, False, set()))
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
    for status in statuses:
        status.refused_versions = [
            RefusedVersionStatus(version=str(r.version), stage=r.stage, error=r.error)
            for r in registry.refused.get(status.name, [])
        ]
    return ModelsResponse(
        default_model=registry.default,
        models=statuses,
        routing=routing,
        shadow=ShadowState(
            queue_max_requests=shadow.queue_max,
            timeout_ms=shadow.timeout_s * 1000,
            stream=shadow.stream_key,
        ),
        reload_poll_s=settings.reload_poll_s,
    )


def _handles(pool: ModelPool, name: str) -> list[Handle]:
    return sorted(
        (h for h in pool.handles.values() if h.model.name == name), key=lambda h: h.model.version
    )


def _loaded(
    name: str, handles: list[Handle], current: int | None, default: bool, followed: set[str]
) -> ModelStatus:
    """A model with loaded versions; `current` None: only routing-pinned versions serve."""
    shown = next((h.model for h in handles if h.model.version == current), handles[0].model)
    return ModelStatus(
        name=name,
        version=str(current) if current is not None else None,
        kind=shown.kind,
        max_history=shown.history_len,
        provider=shown.providers[0],
        providers=shown.providers,
        default=default,
        status="ready",
        versions=[_version(h, current) for h in handles],
        follows_latest=name in followed,
    )


def _version(handle: Handle, current: int | None) -> VersionStatus:
    m = handle.model
    return VersionStatus(
        version=str(m.version),
        current=m.version == current,
        provider=m.providers[0],
        layout=m.layout,
        queue_depth=handle.runner.depth,
        shadow_queue_depth=handle.shadow.depth if handle.shadow is not None else 0,
        outputs=list(m.output_names),
    )
