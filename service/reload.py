"""Hot reload of model versions and of the routing file, while serving.

Triggers: the admin endpoints (`POST /v1/admin/models/{name}/reload`, `POST
/v1/admin/routing/reload`, admin API key) and, with `CTR_RELOAD_POLL_S > 0`, a poll of the
routing file (by content hash) and of the repository (a newer complete version of a followed
model). Polling the repository is safe here because the exporter publishes a version with one
atomic rename and the loader checks every file's sha256 before ORT parses it: a half-written
version is either invisible or refused.

A reload loads the version in a worker thread (the event loop keeps serving), warms it with the
golden inputs of `service.registry.warm_up` (K finite probabilities per request), and only then
swaps it in with one assignment (`ModelPool.make_current`). Requests already queued on the old
version finish there; the old version is drained and released in the background. A version
that fails to load or warm up never serves: the old one keeps serving, the admin call answers
503 `model_load_failed`, `ctr_model_reload_failures_total{model,stage}` counts it and the
poller does not retry that version. Only names and versions present in the configured
repository are accepted (no paths, no URLs: `runtime.repository.model_dir` enforces it).

Following: a model named without a version (in `CTR_MODELS`, or all when it is empty) follows
the repository's highest version when polling; an admin reload to an explicit version holds the
model there (a rollback stays rolled back) until an admin reload without a version.
Reloads are serialized (one lock), which also keeps ORT session creation single-threaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.loader import LoadedModel
from runtime.repository import latest_version, list_models
from service.contracts import ModelReloaded, ReloadFailed, RoutingReloaded
from service.metrics import ServiceMetrics
from service.pool import ModelPool
from service.registry import ModelSpec, load_version, make_ready
from service.routing import LoadedRouting, RoutingError, check_references, read_routing
from service.settings import Settings

log = logging.getLogger(__name__)
Key = tuple[str, int]


@dataclass(frozen=True)
class _Plan:
    model: LoadedModel
    current: bool  # becomes its name's current version (else an extra, pinned version)


class Reloader:
    """Loads, checks and swaps model versions and routing files in `pool`.

    `use_routing(routing)` installs a new routing (the engine's router); `after_swap()` runs
    after every change of the versions served (the engine re-derives what depends on them).
    """

    def __init__(
        self,
        pool: ModelPool,
        settings: Settings,
        metrics: ServiceMetrics,
        use_routing: Callable[[LoadedRouting], None],
        after_swap: Callable[[], None],
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._use_routing = use_routing
        self._after_swap_hook = after_swap
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._held: set[str] = set()
        self._failed: set[Key] = set()
        self._routing_seen: str | None = None
        self.routing = read_routing(None)

    @property
    def poll_s(self) -> float:
        return self._settings.reload_poll_s

    def followed(self) -> list[str]:
        """Models that move to the repository's highest version when polling."""
        registry = self._pool.registry
        names = [*registry.models, *(n for n in registry.failures if ":" not in n)]
        return [n for n in dict.fromkeys(names) if n not in self._held]

    async def start(self, routing: LoadedRouting, specs: Sequence[ModelSpec]) -> None:
        """Start-up: loads what the routing file names (a failure leaves the service not ready,
        as for `CTR_MODELS`), installs the router, and starts the poller if configured."""
        self._held = {s.name for s in specs if s.version is not None}
        check_references(routing, await asyncio.to_thread(list_models, self._repo))
        plans = await self._load_missing(routing, strict=False)
        self._install(plans, routing)
        self._routing_seen = routing.sha256
        registry = self._pool.registry
        for name in list(registry.failures):
            with contextlib.suppress(LookupError, ValueError):  # not retried by the poller
                self._failed.add((name, latest_version(self._repo, name)))
        for name, refused in registry.refused.items():  # nor are versions refused at start-up
            self._failed.update((name, r.version) for r in refused)
        if self.poll_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="reload-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def reload_model(self, name: str, version: int | None) -> ModelReloaded:
        """Makes `version` (default: the repository's highest) `name`'s current version."""
        async with self._lock:
            versions = (await asyncio.to_thread(list_models, self._repo)).get(name)
            if not versions:
                raise ReloadFailed(404, "unknown_model", f"no model {name} in the repository")
            target = version if version is not None else versions[-1]
            if target not in versions:
                raise ReloadFailed(404, "unknown_version", f"{name} has no version {target}")
            pool = self._pool
            current = pool.current_version(name)
            if target == current:
                self._hold(name, version is not None)
                return ModelReloaded(name, target, current, False, pool.registry.provider(name))
            handle = pool.handles.get((name, target))
            model = handle.model if handle is not None else await self._load(name, target)
            previous = pool.make_current(model)
            self._hold(name, version is not None)
            self._metrics.model_reloads.labels(name).inc()
            self._after_swap()
        extra = {"model": name, "version": target, "previous_version": previous}
        log.info("model %s: v%s -> v%d", name, previous, target, extra=extra)
        return ModelReloaded(name, target, previous, True, model.providers[0])

    async def reload_routing(self) -> RoutingReloaded:
        """Re-reads the routing file; on any problem the previous routing keeps serving."""
        path = self._settings.routing_file
        if path is None:
            raise ReloadFailed(409, "no_routing_file", "CTR_ROUTING_FILE is not set")
        counter = self._metrics.routing_reloads
        async with self._lock:
            try:
                routing = await asyncio.to_thread(read_routing, path)
                check_references(routing, await asyncio.to_thread(list_models, self._repo))
            except RoutingError as exc:
                counter.labels("invalid").inc()
                log.error("routing file refused: %s", exc)  # str(exc) names every location
                raise ReloadFailed(422, "invalid_routing", exc.message, exc.details) from None
            self._routing_seen = routing.sha256
            if routing.sha256 == self.routing.sha256:
                counter.labels("unchanged").inc()
                return RoutingReloaded(routing.sha256, False, len(routing.config.experiments))
            try:
                plans = await self._load_missing(routing, strict=True)
            except ReloadFailed:
                counter.labels("failed").inc()
                raise
            self._install(plans, routing)
            counter.labels("ok").inc()
        log.info("routing file %s applied (sha256 %s…)", routing.file, routing.sha256[:12])
        return RoutingReloaded(routing.sha256, True, len(routing.config.experiments))

    async def poll_once(self) -> None:
        """One pass of the file watch: a changed routing file, then newer model versions."""
        path = self._settings.routing_file
        if path is not None:
            digest = await asyncio.to_thread(_sha256_or_none, path)
            if digest is not None and digest != self._routing_seen:
                self._routing_seen = digest  # a refused file is retried once it changes again
                with contextlib.suppress(ReloadFailed):
                    await self.reload_routing()
        for name in self.followed():
            try:
                latest = await asyncio.to_thread(latest_version, self._repo, name)
            except LookupError:
                continue
            current = self._pool.current_version(name)
            if (current is None or latest > current) and (name, latest) not in self._failed:
                with contextlib.suppress(ReloadFailed):
                    await self.reload_model(name, None)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except Exception:  # the watch must outlive any one bad pass
                log.exception("reload poll failed")

    @property
    def _repo(self) -> Path:
        return self._settings.repo

    def _hold(self, name: str, held: bool) -> None:
        if held:
            self._held.add(name)
        else:
            self._held.discard(name)

    async def _load(self, name: str, version: int) -> LoadedModel:
        """Opens and warms `name` v`version` off the event loop; `ReloadFailed` (503) if not."""
        s = self._settings
        stage = "load"
        try:
            spec = ModelSpec(name, version)
            model = await asyncio.to_thread(
                load_version, s.repo, spec, s.providers, s.session_threads()
            )
            stage = "warmup"
            calibration = await asyncio.to_thread(make_ready, model)
        except Exception as exc:
            self._failed.add((name, version))
            self._metrics.model_reload_failures.labels(name, stage).inc()
            log.error("model %s v%d failed at %s: %s", name, version, stage, exc)
            current = self._pool.current_version(name)
            keeps = f"; v{current} keeps serving" if current is not None else ""
            raise ReloadFailed(
                503,
                "model_load_failed",
                f"{name} v{version} failed at {stage}{keeps}",
                [{"stage": stage, "error": type(exc).__name__}],
            ) from None
        self._pool.registry.calibrations[(name, version)] = calibration
        return model

    async def _load_missing(self, routing: LoadedRouting, strict: bool) -> list[_Plan]:
        """Loads every model version the routing file needs that is not loaded yet. Strict: the
        first failure aborts (nothing is installed); else failures are recorded as such."""
        pool, registry = self._pool, self._pool.registry
        plans: list[_Plan] = []
        for name, version in sorted(routing.config.model_keys(), key=str):
            if version is None and pool.current_version(name) is not None:
                continue  # the current version serves unpinned routes
            wanted = (
                version
                if version is not None
                else await asyncio.to_thread(latest_version, self._repo, name)
            )
            planned = {(p.model.name, p.model.version) for p in plans}
            if (name, wanted) in pool.handles or (name, wanted) in planned:
                continue
            try:
                model = await self._load(name, wanted)
            except ReloadFailed:
                if strict:
                    raise
                registry.failures[name if version is None else f"{name}:{version}"] = "load"
                continue
            plans.append(_Plan(model, current=version is None))
        return plans

    def _install(self, plans: list[_Plan], routing: LoadedRouting) -> None:
        for plan in plans:
            if plan.current:
                self._pool.make_current(plan.model)
            else:
                self._pool.add(plan.model)
        self.routing = routing
        self._use_routing(routing)
        self._after_swap()

    def _after_swap(self) -> None:
        self._after_swap_hook()
        self._pool.retire(self.routing.config.model_keys(), self._settings.graceful_timeout_s)


def _sha256_or_none(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None
