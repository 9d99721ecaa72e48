"""The scoring engine: what the HTTP layer talks to (it never touches a model or Redis itself).

`score(request)`: router -> the model's batcher -> (per batch) one pipelined history read from
the behaviour store, or the request's inline history -> vocabulary mapping and ONNX Runtime in
the model's worker thread -> this request's scores. A failed or skipped history read degrades
to an empty history (`history_source="fallback"`), never to an error.

`Router` is the seam for traffic experiments: the default router honours a pinned model and
otherwise picks the configured default (variant "default"); an A/B or shadow router replaces
`engine.router` without touching the batching path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import numpy as np

from exporters.loader import LoadedModel, ScoringRequest
from service.batcher import Batcher, BatcherConfig
from service.embedded_redis import RedisServer
from service.metrics import ServiceMetrics
from service.naive import UnbatchedRunner, score_per_candidate
from service.registry import ModelRegistry, ModelSpec
from service.settings import Settings
from service.store import (
    BehaviorStore,
    Event,
    HistoryItem,
    IngestResult,
    StoreConfig,
    StoreUnavailable,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")
HistorySource = Literal["redis", "inline", "fallback"]
_FALLBACK_WARNING_INTERVAL_S = 10.0


class UnknownModel(LookupError):
    """The request names a model the service does not have (a client error)."""


class ModelUnavailable(Exception):
    """The model exists in the configuration but is not loaded (a server-side condition)."""


@dataclass(frozen=True)
class ScoreInput:
    request_id: str
    user_id: str
    candidates: Sequence[tuple[str, str]]
    context: Mapping[str, str]
    history: Sequence[tuple[str, str]] | None  # inline history, oldest first; None: use store
    model: str | None
    deadline: float  # time.monotonic() seconds


@dataclass(frozen=True)
class ScoreResult:
    model: str
    version: int
    variant: str
    scores: list[float]
    history_source: HistorySource


@dataclass(frozen=True)
class Route:
    model: str
    variant: str


class Router(Protocol):
    def route(self, request: ScoreInput) -> Route: ...


class DefaultRouter:
    """A pinned model wins; otherwise the default model. No experiments."""

    def __init__(self, default_model: str | None) -> None:
        self.default_model = default_model

    def route(self, request: ScoreInput) -> Route:
        model = request.model or self.default_model
        if model is None:
            raise ModelUnavailable("no default model")
        return Route(model, "default")


class Runner(Protocol):
    """What the engine needs from a model's request runner: the `Batcher`, or the naive one."""

    @property
    def depth(self) -> int: ...

    def start(self) -> None: ...

    def begin_drain(self) -> None: ...

    async def stop(self, timeout_s: float = 5.0) -> None: ...

    async def submit(self, request: ScoreInput, size: int, deadline: float) -> _Scored: ...


@dataclass(frozen=True)
class _Prepared:
    request: ScoringRequest
    source: HistorySource


@dataclass(frozen=True)
class _Scored:
    scores: np.ndarray
    source: HistorySource


class ScoringEngine:
    """Owns the models, their batchers, the behaviour store (and an embedded Redis if any)."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = ModelRegistry()
        self.router: Router = DefaultRouter(None)
        self.store: BehaviorStore | None = None
        self._batchers: dict[str, Runner] = {}
        self._redis: RedisServer | None = None
        self._draining = False
        self._last_fallback_warning = -_FALLBACK_WARNING_INTERVAL_S

    async def start(self) -> None:
        s = self.settings
        # Started on the loop's thread (about 0.1 s, once): the embedded server is tied to the
        # life of the thread that starts it, and executor threads may come and go.
        url = s.redis_url if s.redis_url is not None else self._start_embedded_redis()
        self.store = BehaviorStore.from_url(url, _store_config(s), cluster=s.redis_cluster)
        specs = [ModelSpec.parse(text) for text in s.models]
        self.registry = await asyncio.to_thread(
            ModelRegistry.load, s.repo, specs, s.default_model, s.providers, s.intra_op_threads
        )
        self.router = DefaultRouter(self.registry.default)
        for name, model in self.registry.models.items():
            self.metrics.model_info.labels(name, str(model.version), model.providers[0]).set(1)
            self._batchers[name] = self._batcher(model)
            self._batchers[name].start()
        self.metrics.dependency_up.labels("redis").set(1 if await self.store.ping() else 0)

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Readiness turns 503 and new scoring requests are refused; in-flight ones finish."""
        self._draining = True
        for batcher in self._batchers.values():
            batcher.begin_drain()

    async def stop(self, timeout_s: float = 5.0) -> None:
        self.begin_drain()
        await asyncio.gather(*(b.stop(timeout_s) for b in self._batchers.values()))
        if self.store is not None:
            await self.store.close()
        if self._redis is not None:
            await asyncio.to_thread(self._redis.close)

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not). Redis is deliberately not part of readiness."""
        reasons = [f"model {name} failed to load" for name in self.registry.failures]
        if self.registry.default not in self.registry.models:
            reasons.append("default model not loaded")
        if self.settings.require_gpu:
            reasons += [f"model {n} is not on the GPU" for n in self.registry.gpu_missing()]
        if self._draining:
            reasons.append("draining")
        return not reasons, reasons

    def queue_depth(self, model: str) -> int:
        """Requests waiting for `model`'s next batch (0 for an unknown model)."""
        runner = self._batchers.get(model)
        return runner.depth if runner is not None else 0

    async def score(self, request: ScoreInput) -> ScoreResult:
        route = self.router.route(request)
        batcher = self._batchers.get(route.model)
        if batcher is None:
            if route.model in self.registry.failures:
                raise ModelUnavailable(route.model)
            raise UnknownModel(route.model)
        scored = await batcher.submit(request, len(request.candidates), request.deadline)
        self.metrics.history_source.labels(scored.source).inc()
        model = self.registry.models[route.model]
        return ScoreResult(
            route.model, model.version, route.variant, scored.scores.tolist(), scored.source
        )

    async def ingest(self, events: Sequence[Event]) -> IngestResult:
        result = await self._store_call("ingest", self._require_store().ingest(events))
        self.metrics.events.labels("accepted").inc(result.accepted)
        self.metrics.events.labels("duplicate").inc(result.duplicates)
        return result

    async def history(self, user_id: str) -> list[HistoryItem]:
        return await self._store_call("history", self._require_store().history(user_id))

    async def erase(self, user_id: str) -> None:
        await self._store_call("erase", self._require_store().erase(user_id))

    def _batcher(self, model: LoadedModel) -> Runner:
        s = self.settings
        config = BatcherConfig(
            s.batch_max_candidates, s.queue_max_requests, s.shed_status, s.retry_after_s
        )

        async def prepare(requests: list[ScoreInput]) -> list[_Prepared]:
            return await self._prepare(model, requests)

        def infer(prepared: list[_Prepared]) -> list[_Scored | Exception]:
            return self._infer(model, prepared)

        def infer_naive(prepared: list[_Prepared]) -> list[_Scored]:
            start = time.perf_counter()
            scored = [_Scored(score_per_candidate(model, p.request), p.source) for p in prepared]
            elapsed = time.perf_counter() - start
            self.metrics.inference_duration.labels(model.name, str(model.version)).observe(elapsed)
            return scored

        if s.naive:
            return UnbatchedRunner(model.name, infer_naive, prepare, s.retry_after_s)
        return Batcher(model.name, infer, prepare, config, self.metrics.observer(model.name))

    async def _prepare(self, model: LoadedModel, requests: list[ScoreInput]) -> list[_Prepared]:
        """Histories for a batch: inline ones as sent, the rest from one store round trip."""
        wanted = [r.user_id for r in requests if r.history is None]
        stored: dict[str, list[HistoryItem]] = {}
        source: HistorySource = "redis"
        if wanted:
            try:
                store = self._require_store()
                read = store.recent(wanted, model.max_history)
                stored = await self._store_call("read", read)
            except StoreUnavailable as exc:
                self._warn_fallback(exc)
                source = "fallback"
        prepared = []
        for r in requests:
            src: HistorySource = "inline" if r.history is not None else source
            history = (
                list(r.history)
                if r.history is not None
                else [(h.item_id, h.category_id) for h in stored.get(r.user_id, [])]
            )
            request = ScoringRequest(r.user_id, history, r.candidates, r.context)
            prepared.append(_Prepared(request, src))
        return prepared

    def _infer(self, model: LoadedModel, prepared: list[_Prepared]) -> list[_Scored | Exception]:
        """Runs in the model's worker thread. If the batch fails, each request is retried on
        its own, so one request that breaks the model cannot fail the others of its batch."""
        try:
            return list(self._infer_batch(model, prepared))
        except Exception:
            if len(prepared) == 1:
                raise
            log.exception("batch of %d failed; scoring its requests one by one", len(prepared))
        results: list[_Scored | Exception] = []
        for p in prepared:
            try:
                results += self._infer_batch(model, [p])
            except Exception as exc:
                results.append(exc)
        return results

    def _infer_batch(self, model: LoadedModel, prepared: list[_Prepared]) -> list[_Scored]:
        """encode, ORT run, split."""
        requests = [p.request for p in prepared]
        t0 = time.perf_counter()
        feeds = model.encode(requests)
        t1 = time.perf_counter()
        flat = model.run(feeds)
        t2 = time.perf_counter()
        self.metrics.encode_duration.labels(model.name).observe(t1 - t0)
        self.metrics.inference_duration.labels(model.name, str(model.version)).observe(t2 - t1)
        parts = model.split(requests, flat)
        return [_Scored(part, p.source) for part, p in zip(parts, prepared, strict=True)]

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

    def _require_store(self) -> BehaviorStore:
        if self.store is None:
            raise StoreUnavailable("store not started")
        return self.store

    def _start_embedded_redis(self) -> str:
        self._redis = RedisServer().start()
        log.info("no CTR_REDIS_URL: started an embedded redis-server at %s", self._redis.url)
        return self._redis.url


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
