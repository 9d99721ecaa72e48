"""The scoring engine: what the HTTP layer talks to (it never touches a model or Redis itself).

`score(request)`: router (A/B variant, pinned version, shadow) -> that model version's batcher
-> (per batch) one pipelined history read from the behaviour store, or the request's inline
history -> vocabulary mapping and ONNX Runtime in the version's worker thread -> this
request's scores. If the variant has a shadow and the request is sampled, the result carries an
`after_response` callable that the route runs once the response has been sent: it queues a copy
for the shadow's own worker (`service.shadow`), so the shadow starts after the answer left.
A failed or skipped history read degrades to an empty history (`history_source="fallback"`),
never to an error.

Models live in a `ModelPool` (one handle per loaded version); `service.reload` swaps versions
and routing files in while serving. The version a response names is the version of the handle
the request was queued on, so in-flight requests finish on the version they started with.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np

from runtime.loader import CONVERSION_SCORES, CTCVR_SCORES, SCORES, LoadedModel, ScoringRequest
from service.contracts import (
    PINNED_VARIANT,
    Event,
    HistoryItem,
    HistorySource,
    IngestResult,
    ModelReloaded,
    ModelsResponse,
    ModelUnavailable,
    Route,
    RoutingReloaded,
    ScoreResult,
    ShadowSpec,
    StoreUnavailable,
    UnknownModel,
)
from service.metrics import ServiceMetrics
from service.pool import ModelPool, Runner
from service.registry import ModelRegistry, ModelSpec
from service.reload import Reloader
from service.routing import ExperimentRouter, LoadedRouting, read_routing
from service.scoring.batch import BatchTiming, BatchWork, Scored
from service.scoring.batcher import Batcher, BatcherConfig, CostModel
from service.scoring.cpus import usable_cores
from service.scoring.naive import UnbatchedRunner
from service.settings import Settings
from service.shadow import ShadowJob, ShadowScorer, ShadowSettings
from service.status import models_status
from service.store.behavior import BehaviorStore, StoreConfig
from service.store.embedded_redis import RedisServer
from service.tracing import StageTracer

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_FALLBACK_WARNING_INTERVAL_S = 10.0


class ScoringEngine:
    """Owns the models, their batchers, the router, the shadow scorer, the behaviour store (and
    an embedded Redis if any). Built complete by `open`; `stop` releases everything."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        store: BehaviorStore,
        registry: ModelRegistry,
        redis: RedisServer | None = None,
        tracer: StageTracer | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracer = tracer
        self.store = store
        self.registry = registry
        self.pool = ModelPool(registry, self._runner, metrics)
        for model in registry.models.values():
            self.pool.add(model)
        for name, refused in registry.refused.items():
            for version in refused:
                metrics.model_version_refused.labels(name, str(version.version)).set(1)
        self.router = ExperimentRouter(read_routing(None), registry.default)
        # Set while no scoring request is inside `score`: shadow threads only run then.
        self.primary_idle = threading.Event()
        self.primary_idle.set()
        self._scoring = 0
        self.shadow = ShadowScorer(_shadow_settings(settings), metrics, store, self.primary_idle)
        self.reloader = Reloader(
            self.pool, settings, metrics, self._use_routing, self._refresh_history_floor
        )
        self.history_floor = 0  # the longest history a shadow model reads (`_use_routing`)
        self._redis = redis
        self._draining = False
        self._last_fallback_warning = -_FALLBACK_WARNING_INTERVAL_S

    @classmethod
    async def open(
        cls, settings: Settings, metrics: ServiceMetrics, tracer: StageTracer | None = None
    ) -> ScoringEngine:
        """Starts everything: the store (an embedded redis-server when no URL is set), the
        models, the routing file's versions and the reload poller. A routing file that does
        not parse or names missing models stops it here, with nothing left running."""
        s = settings
        routing = read_routing(s.routing_file)
        # Started on the loop's thread (about 0.1 s, once): the embedded server is tied to the
        # life of the thread that starts it, and executor threads may come and go.
        redis = None if s.redis_url is not None else _start_embedded_redis()
        url = redis.url if redis is not None else str(s.redis_url)
        store = BehaviorStore.from_url(url, _store_config(s), cluster=s.redis_cluster)
        specs = [ModelSpec.parse(text) for text in s.models]
        registry = await asyncio.to_thread(
            ModelRegistry.load,
            s.repo,
            specs,
            s.default_model,
            s.providers,
            s.session_threads(),
            s.strict_versions,
        )
        engine = cls(settings, metrics, store, registry, redis, tracer)
        try:
            await engine.reloader.start(routing, specs)
        except BaseException:
            await engine.stop()
            raise
        metrics.dependency_up.labels("redis").set(1 if await store.ping() else 0)
        return engine

    def _use_routing(self, routing: LoadedRouting) -> None:
        """Swaps the router in (one assignment: the next request sees the new routing)."""
        router = ExperimentRouter(routing, self.registry.default)
        self.metrics.init_shadow_pairs(router.shadow_pairs())
        self.router = router
        self._refresh_history_floor()

    def _refresh_history_floor(self) -> None:
        """Primary reads fetch as much history as the longest-reaching shadow model needs; the
        primary's own encoder keeps only its newest `history_len`, so its scores are the same."""
        floor = 0
        for spec in self.router.shadow_specs():
            handle = self.pool.resolve(spec.model, spec.version)
            floor = max(floor, handle.model.history_len if handle is not None else 0)
        self.history_floor = floor

    def begin_drain(self) -> None:
        """Readiness turns 503 and new scoring requests are refused; in-flight ones finish."""
        self._draining = True
        for handle in self.pool.handles.values():
            handle.runner.begin_drain()

    async def stop(self, timeout_s: float = 5.0) -> None:
        self.begin_drain()
        await self.reloader.stop()
        await self.pool.stop(timeout_s)
        await self.store.close()
        if self._redis is not None:
            await asyncio.to_thread(self._redis.close)

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not). Redis is deliberately not part of readiness. Updates
        the gauges that say the same to an alert (`ctr_ready`, `ctr_model_load_failed`)."""
        failed = self.registry.failures
        for name in {*failed, *self.registry.models}:
            self.metrics.model_load_failed.labels(name).set(1 if name in failed else 0)
        reasons = [f"model {name} failed to load" for name in failed]
        if self.registry.default not in self.registry.models:
            reasons.append("default model not loaded")
        if self.settings.require_gpu:
            reasons += [f"model {n} is not on the GPU" for n in self.registry.gpu_missing()]
        if self._draining:
            reasons.append("draining")
        self.metrics.ready.set(0 if reasons else 1)
        return not reasons, reasons

    def status(self) -> ModelsResponse:
        """GET /v1/models: loaded versions, failures, routing and shadow state."""
        followed = self.reloader.followed() if self.settings.reload_poll_s > 0 else []
        return models_status(
            self.pool, set(followed), self.router.describe(), self.shadow.settings, self.settings
        )

    async def reload_model(self, name: str, version: int | None) -> ModelReloaded:
        return await self.reloader.reload_model(name, version)

    async def reload_routing(self) -> RoutingReloaded:
        return await self.reloader.reload_routing()

    def admits_any(self, deadline: float) -> bool:
        """True also with no model loaded: then the route's own answer (404, 503) says why."""
        runners = [h.runner for h in self.pool.handles.values()]
        return not runners or any(r.can_meet_typical(deadline) for r in runners)

    def queue_depth(self, model: str) -> int:
        """Requests waiting for `model`'s next batch at its current version (0 if unknown)."""
        handle = self.pool.resolve(model)
        return handle.runner.depth if handle is not None else 0

    async def score(self, request: ScoringRequest) -> ScoreResult:
        route = self.router.route(request)
        handle = self.pool.resolve(route.model, route.version)
        if handle is None:
            raise self._missing(route)
        self._scoring += 1
        self.primary_idle.clear()
        try:
            # No await between resolving the handle and entering its queue (submit admits
            # before its first suspension): a swap cannot retire the handle in between.
            submitted = time.monotonic()
            scored: Scored = await handle.runner.submit(
                request, len(request.candidates), request.deadline
            )
        finally:
            self._scoring -= 1
            if not self._scoring:
                self.primary_idle.set()
        source = scored.request.history_source
        self.metrics.history_source.labels(source).inc()
        self._observe_stages(scored.timing, submitted, handle.model)
        model = handle.model
        after: Callable[[], None] | None = None
        if route.shadow is not None and self.shadow.sampled(route.shadow):
            job = ShadowJob(
                request.request_id,
                route.variant,
                model.name,
                model.version,
                scored.request,
                scored.scores,
                model.output_names,
                time.monotonic(),
            )
            after = functools.partial(self._offer_shadow, route.shadow, job)
        self._observe_predictions(model, scored.scores)
        columns = _columns(model, scored.scores)
        return ScoreResult(
            model.name,
            model.version,
            route.variant,
            columns[SCORES],
            source,
            route.experiment,
            after,
            conversion_scores=columns.get(CONVERSION_SCORES),
            ctcvr_scores=columns.get(CTCVR_SCORES),
        )

    def _observe_stages(self, timing: BatchTiming, submitted: float, model: LoadedModel) -> None:
        """The request's share of its batch's stages: the histogram, and spans when tracing."""
        stages = self.metrics.stages
        if timing.read is not None:
            stages["history"].observe(timing.read.seconds)
        stages["encode"].observe(timing.encode.seconds)
        stages["infer"].observe(timing.infer.seconds)
        if self.tracer is not None:
            self.tracer.record_batch(timing, submitted, model.name, model.version)

    def _observe_predictions(self, model: LoadedModel, scores: np.ndarray) -> None:
        if scores.shape[0] == 0:  # an empty slate predicts nothing
            return
        for name, mean in zip(model.output_names, scores.mean(axis=0), strict=True):
            self.metrics.prediction_mean.labels(model.name, name).observe(float(mean))

    def _offer_shadow(self, spec: ShadowSpec, job: ShadowJob) -> None:
        """Queues the shadow copy (called once the primary's response has been sent)."""
        start = time.monotonic()
        self.shadow.offer(spec, job, self.pool.shadow_target(spec, self.shadow.worker_for))
        if self.tracer is not None:
            self.tracer.shadow_copy(spec.model, start)

    def _missing(self, route: Route) -> Exception:
        """A client naming an unknown model gets 404; anything routing chose is ours (503)."""
        failed = route.model in self.registry.failures
        if route.variant == PINNED_VARIANT and not failed:
            return UnknownModel(route.model)
        return ModelUnavailable(route.model)

    async def ingest(self, events: Sequence[Event], ignored: int = 0) -> IngestResult:
        """Stores click events; `ignored` counts those of other types the caller left out."""
        self.metrics.events.labels("ignored").inc(ignored)
        if not events:
            return IngestResult(0, 0)
        result = await self._store_call("ingest", self.store.ingest(events))
        self.metrics.events.labels("accepted").inc(result.accepted)
        self.metrics.events.labels("duplicate").inc(result.duplicates)
        return result

    async def history(self, user_id: str) -> list[HistoryItem]:
        return await self._store_call("history", self.store.history(user_id))

    async def erase(self, user_id: str) -> None:
        await self._store_call("erase", self.store.erase(user_id))

    def _runner(self, model: LoadedModel) -> Runner:
        s = self.settings
        if s.history_cap < model.history_len:
            log.warning(
                "model %s v%d reads %d history items but CTR_HISTORY_CAP keeps %d per user: "
                "stored histories are cut to %d",
                model.name,
                model.version,
                model.history_len,
                s.history_cap,
                s.history_cap,
            )
        work = BatchWork(
            model,
            self._read_histories,
            lambda: max(model.history_len, self.history_floor),
            self.metrics,
        )
        if s.naive:
            return UnbatchedRunner(model.name, work.infer_naive, work.prepare, s.retry_after_s)
        config = batcher_config(s, model.on_device)
        log.info(
            "model %s v%d on %s: inference workers %d, intra-op threads per session %d, "
            "usable CPUs %d (affinity and cgroup CPU quota)",
            model.name,
            model.version,
            model.providers[0],
            config.workers,
            s.session_threads(),
            usable_cores(),
        )
        calibration = self.registry.calibrations.get((model.name, model.version))
        cost = CostModel(calibration.a, calibration.b) if calibration is not None else None
        observer = self.metrics.observer(model.name)
        return Batcher(model.name, work.infer, work.prepare, config, observer, cost)

    async def _read_histories(
        self, users: list[str], limit: int
    ) -> tuple[dict[str, list[tuple[str, str]]], HistorySource]:
        """Stored histories of a batch's users; empty ones (`fallback`) when Redis fails."""
        try:
            return await self._store_call("read", self.store.recent(users, limit)), "redis"
        except StoreUnavailable as exc:
            self._warn_fallback(exc)
            return {}, "fallback"

    def _warn_fallback(self, exc: StoreUnavailable) -> None:
        """At most one warning per interval: an outage must not flood the log."""
        now = time.monotonic()
        if now - self._last_fallback_warning >= _FALLBACK_WARNING_INTERVAL_S:
            self._last_fallback_warning = now
            log.warning("history read failed (%s): scoring with empty histories", exc)

    async def _store_call(self, operation: str, call: Awaitable[_T]) -> _T:
        start = time.perf_counter()
        try:
            result = await call
        except StoreUnavailable:
            self._observe_store(operation, "error", start)
            raise
        self._observe_store(operation, "ok", start)
        return result

    def _observe_store(self, operation: str, outcome: str, start: float) -> None:
        elapsed = time.perf_counter() - start
        self.metrics.store_duration.labels(operation, outcome).observe(elapsed)
        self.metrics.dependency_up.labels("redis").set(1 if outcome == "ok" else 0)
        self.metrics.redis_breaker_open.set(self.store.breaker.state != "closed")


def batcher_config(s: Settings, on_device: bool) -> BatcherConfig:
    """A model version's batching, on the CPU or on a device whose runs serialise."""
    return BatcherConfig(
        s.batch_max_candidates,
        s.queue_max_requests,
        s.shed_status,
        s.retry_after_s,
        workers=s.inference_workers(on_device),
        parallel_runs=1 if on_device else None,
    )


def _start_embedded_redis() -> RedisServer:
    redis = RedisServer().start()
    log.info("no CTR_REDIS_URL: started an embedded redis-server at %s", redis.url)
    return redis


def _columns(model: LoadedModel, scores: np.ndarray) -> dict[str, list[float]]:
    """[K, O] -> {output name: its K floats}; the caller picks the outputs the API names."""
    return {name: scores[:, j].tolist() for j, name in enumerate(model.output_names)}


def _shadow_settings(s: Settings) -> ShadowSettings:
    stream = f"{s.redis_key_prefix}:shadow:pairs" if s.shadow_stream else None
    return ShadowSettings(
        queue_max=s.shadow_queue_max_requests,
        timeout_s=s.shadow_timeout_ms / 1000,
        # One request's worth per shadow batch: short runs, so the shadow looks at the primary
        # queues again every few milliseconds instead of holding a core for a long batch.
        batch_max_candidates=s.max_candidates,
        stream_key=stream,
        stream_maxlen=s.shadow_stream_maxlen,
    )


def _store_config(s: Settings) -> StoreConfig:
    return StoreConfig(
        key_prefix=s.redis_key_prefix,
        cap=s.history_cap,
        ttl_s=s.history_ttl_s,
        dedup_cap=s.dedup_cap,
        read_timeout_s=s.redis_read_timeout_ms / 1000,
        write_timeout_s=s.redis_write_timeout_ms / 1000,
        max_connections=s.redis_max_connections,
        breaker_failures=s.breaker_failures,
        breaker_reset_s=s.breaker_reset_s,
    )
