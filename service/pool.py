"""The loaded model versions, each with its own request runner, and each name's current version.

A `Handle` is one loaded version (`LoadedModel`) with its primary runner (a `Batcher`) and,
once a shadow route needs it, a separate shadow worker over the same session (ORT sessions are
thread-safe; the two queues are not shared, so shadow load never sheds primary requests).

Swaps are atomic because everything here runs on the event loop: `make_current` changes one
dict entry, and a request resolves its handle and enters that handle's queue with no `await`
in between (`engine.score`), so it is never admitted by a handle that is being retired. A
retired handle is removed first and drained after: requests already in its queue or in its
worker finish on the version they started with, then its threads stop and its session goes.
`registry.models` always names the current version of each model (what tests and readiness
look at).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from runtime.loader import LoadedModel
from service.contracts import ScoringRequest, ShadowSpec
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.shadow import ShadowTarget, ShadowWorker

log = logging.getLogger(__name__)
Key = tuple[str, int]


class Runner(Protocol):
    """A model version's request runner: the `Batcher`, or the naive baseline's."""

    @property
    def depth(self) -> int: ...

    def start(self) -> None: ...

    def begin_drain(self) -> None: ...

    def can_meet(self, size: int, deadline: float) -> bool: ...

    def can_meet_typical(self, deadline: float) -> bool: ...

    async def stop(self, timeout_s: float = 5.0) -> None: ...

    async def submit(self, request: ScoringRequest, size: int, deadline: float) -> Any: ...


@dataclass
class Handle:
    model: LoadedModel
    runner: Runner
    shadow: ShadowWorker | None = None

    @property
    def key(self) -> Key:
        return (self.model.name, self.model.version)


class ModelPool:
    """Handles by (name, version) plus the current version of each name."""

    def __init__(
        self,
        registry: ModelRegistry,
        make_runner: Callable[[LoadedModel], Runner],
        metrics: ServiceMetrics,
    ) -> None:
        self.registry = registry
        self.handles: dict[Key, Handle] = {}
        self._make_runner = make_runner
        self._metrics = metrics
        self._draining: set[asyncio.Task[None]] = set()

    def current_version(self, name: str) -> int | None:
        model = self.registry.models.get(name)
        return model.version if model is not None else None

    def resolve(self, name: str, version: int | None = None) -> Handle | None:
        """The handle of `name` at `version`, or at its current version when None."""
        wanted = version if version is not None else self.current_version(name)
        return None if wanted is None else self.handles.get((name, wanted))

    def add(self, model: LoadedModel) -> Handle:
        """Starts serving `model` under its (name, version); a no-op when already there."""
        key = (model.name, model.version)
        if key not in self.handles:
            runner = self._make_runner(model)
            runner.start()
            self.handles[key] = Handle(model, runner)
            self._metrics.model_info.labels(model.name, str(model.version), model.providers[0]).set(
                1
            )
            self._metrics.init_model(model.name)
        return self.handles[key]

    def make_current(self, model: LoadedModel) -> int | None:
        """Adds `model` and makes it its name's current version; returns the previous one."""
        handle = self.add(model)
        previous = self.current_version(model.name)
        self.registry.models[model.name] = handle.model
        self.registry.failures.pop(model.name, None)
        self._forget_refusal(model)
        return previous

    def _forget_refusal(self, model: LoadedModel) -> None:
        """A version refused at start-up that now serves (repaired, reloaded) is no longer."""
        refused = self.registry.refused.get(model.name, [])
        if any(r.version == model.version for r in refused):
            kept = [r for r in refused if r.version != model.version]
            self.registry.refused[model.name] = kept
            self._metrics.model_version_refused.remove(model.name, str(model.version))

    def shadow_target(
        self, spec: ShadowSpec, make: Callable[[LoadedModel], ShadowWorker]
    ) -> ShadowTarget | None:
        handle = self.resolve(spec.model, spec.version)
        if handle is None:
            return None
        if handle.shadow is None:
            handle.shadow = make(handle.model)
            handle.shadow.start()
        return handle.model, handle.shadow

    def retire(self, keep: Iterable[tuple[str, int | None]], timeout_s: float) -> list[Key]:
        """Stops serving every version that is neither current nor in `keep` (a None version
        means the current one); each is drained in the background. Returns what was retired."""
        needed = {(name, model.version) for name, model in self.registry.models.items()}
        for name, version in keep:
            resolved = version if version is not None else self.current_version(name)
            if resolved is not None:
                needed.add((name, resolved))
        retired = [key for key in self.handles if key not in needed]
        for key in retired:
            handle = self.handles.pop(key)
            task = asyncio.get_running_loop().create_task(self._drain(handle, timeout_s))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        return retired

    async def _drain(self, handle: Handle, timeout_s: float) -> None:
        model = handle.model
        await self._stop_runners(handle, timeout_s)
        labels = (model.name, str(model.version), model.providers[0])
        self._metrics.model_info.labels(*labels).set(0)
        self._metrics.model_info.remove(*labels)
        log.info("model %s v%d retired", model.name, model.version)

    async def stop(self, timeout_s: float) -> None:
        """Drains every handle (shutdown) and waits for retirements still in progress."""
        handles = list(self.handles.values())
        for handle in handles:
            handle.runner.begin_drain()
            if handle.shadow is not None:
                handle.shadow.begin_drain()
        await asyncio.gather(*(self._stop_runners(h, timeout_s) for h in handles))
        await asyncio.gather(*self._draining, return_exceptions=True)

    @staticmethod
    async def _stop_runners(handle: Handle, timeout_s: float) -> None:
        await handle.runner.stop(timeout_s)
        if handle.shadow is not None:
            await handle.shadow.stop(timeout_s)
