"""Prometheus metrics of the service (names, base units and labels from DESIGN.md).

Labels stay low-cardinality: route templates, model names and versions, status codes, reasons;
never a user, item or request id. Buckets are in seconds and put the 10-50 ms SLO range on
bucket boundaries (the client's defaults start at 5 ms).

Every app instance owns its own registry, so several apps can live in one process (tests).
Deployment is one process per container; if you do run several worker processes, set
`PROMETHEUS_MULTIPROC_DIR` (wiped) before start: values then go to files in that directory and
`/metrics` aggregates them with `MultiProcessCollector` (gauges declare how they combine).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from runtime.feeds import SCORES  # torch- and onnxruntime-free
from service.scoring.batcher import BatchObserver, Draining, Overloaded, QueueFull

# Every reason `ctr_requests_rejected_total` counts: the refusals, and "deadline" for requests
# whose deadline passed before they were scored.
REJECT_REASONS = (Overloaded.reason, QueueFull.reason, Draining.reason, "deadline")

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# |primary - shadow| of a click probability: 0.1 pp .. 50 pp.
ABS_DIFF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# Mean predicted probability of a slate: CVR/CTCVR live in the low percent, CTR higher.
PROBABILITY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
# Spearman's rho of the two slate orderings; finest where healthy shadows live (near 1).
RANK_BUCKETS = (-0.5, 0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
# The stages of ctr_stage_duration_seconds, in the order a request goes through them.
STAGES = ("parse", "queue", "history", "encode", "infer", "respond")


class ServiceMetrics:
    """All metrics of one app, registered on their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "ctr_request_duration_seconds",
            "HTTP request latency.",
            ["endpoint", "model", "variant", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "ctr_queue_wait_seconds",
            "Time from admission until a worker takes the request's batch (the history read "
            "and inference follow).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "ctr_inference_duration_seconds",
            "ONNX Runtime run() time per batch.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.encode_duration = Histogram(
            "ctr_encode_duration_seconds",
            "Vocabulary mapping and array building per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_candidates = Histogram(
            "ctr_batch_candidates",
            "Candidates per inference batch.",
            ["model"],
            buckets=CANDIDATE_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "ctr_batch_requests",
            "Requests per inference batch.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "ctr_stage_duration_seconds",
            "Where a scoring request's time goes, one observation per request and stage: parse "
            "(arrival to handler: body read, JSON decode, validation), queue (admission to its "
            "batch's start), history (its batch's Redis read), encode and infer (its batch's "
            "vocabulary mapping and ONNX Runtime run), respond (scores to the last byte sent).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stages = {stage: self.stage_duration.labels(stage) for stage in STAGES}
        self.loop_lag = Histogram(
            "ctr_event_loop_lag_seconds",
            "How late the event loop ran a timer that was due (every 0.1 s): the wait a request "
            "has before its first stage starts, when the loop is busy.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_duration = Histogram(
            "ctr_store_duration_seconds",
            "Redis behaviour-store call latency.",
            ["operation", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "ctr_requests_rejected_total",
            "Scoring requests refused or dropped, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:  # known label values up front, as for the reloads below
            self.rejected.labels(reason)
        self.history_source = Counter(
            "ctr_history_source_total",
            "Where each scored request's history came from.",
            ["source"],
            registry=r,
        )
        self.events = Counter(
            "ctr_events_total", "Ingested events by outcome.", ["outcome"], registry=r
        )
        self.model_info = Gauge(
            "ctr_model_info",
            "Loaded model versions and the execution provider in use (1).",
            ["model", "version", "provider"],
            multiprocess_mode="max",
            registry=r,
        )
        self.dependency_up = Gauge(
            "ctr_dependency_up",
            "1 when the dependency answered its last call.",
            ["dependency"],
            multiprocess_mode="max",
            registry=r,
        )
        self.queue_depth = Gauge(
            "ctr_queue_depth",
            "Requests waiting in a model's batch queue.",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        # State an alert needs while the replica still answers its scrape: `up` cannot say that
        # a replica is not ready (it takes no traffic) or that its breaker skips Redis.
        self.ready = Gauge(
            "ctr_ready",
            "1 when GET /readyz answers 200 (refreshed by every probe and scrape).",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.redis_breaker_open = Gauge(
            "ctr_redis_breaker_open",
            "1 while the circuit breaker skips Redis (open or half-open), 0 once a call succeeds.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.inflight = Gauge(
            "ctr_inflight_requests",
            "HTTP requests being handled.",
            multiprocess_mode="livesum",
            registry=r,
        )
        # One observation per scored request and output, the mean over its candidates: a
        # shift in what a model predicts (pCTR, pCVR, pCTCVR) shows without a label or a
        # per-candidate cost on the scoring path.
        self.prediction_mean = Histogram(
            "ctr_prediction_mean",
            "Mean predicted probability of a scored slate, per output.",
            ["model", "output"],
            buckets=PROBABILITY_BUCKETS,
            registry=r,
        )
        self._shadow_metrics(r)
        self._reload_metrics(r)

    def _shadow_metrics(self, r: CollectorRegistry) -> None:
        # Labels come from the routing file (bounded there): variant, primary model, shadow model;
        # the comparisons add the model output compared (`scores`, `conversion_scores`,
        # `ctcvr_scores`: at most three values).
        pair = ["variant", "model", "shadow"]
        compared = [*pair, "output"]
        self.shadow_abs_diff = Histogram(
            "ctr_shadow_abs_diff",
            "|primary - shadow| probability, one per candidate and output compared.",
            compared,
            buckets=ABS_DIFF_BUCKETS,
            registry=r,
        )
        self.shadow_rank_correlation = Histogram(
            "ctr_shadow_rank_correlation",
            "Spearman rank correlation of primary and shadow slate orderings, one per request "
            "and output compared (not observed for slates of one candidate or with all scores "
            "tied on a side).",
            compared,
            buckets=RANK_BUCKETS,
            registry=r,
        )
        self.shadow_duration = Histogram(
            "ctr_shadow_duration_seconds",
            "Shadow scoring time, from enqueue to scores.",
            pair,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_dropped = Counter(
            "ctr_shadow_dropped_total",
            "Shadow requests not scored, by reason.",
            ["shadow", "reason"],
            registry=r,
        )
        self.shadow_errors = Counter(
            "ctr_shadow_errors_total",
            "Shadow failures (never seen by clients), by stage.",
            ["shadow", "stage"],
            registry=r,
        )

    def _reload_metrics(self, r: CollectorRegistry) -> None:
        self.model_reloads = Counter(
            "ctr_model_reloads_total",
            "Model versions swapped in while serving.",
            ["model"],
            registry=r,
        )
        self.model_reload_failures = Counter(
            "ctr_model_reload_failures_total",
            "Model versions that failed to load or warm up; the old version kept serving.",
            ["model", "stage"],
            registry=r,
        )
        self.model_load_failed = Gauge(
            "ctr_model_load_failed",
            "1 for a configured model that has no version serving (it failed to load).",
            ["model"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_version_refused = Gauge(
            "ctr_model_version_refused",
            "1 for a version refused at start-up (an older one serves), until it serves.",
            ["model", "version"],
            registry=r,
        )
        self.routing_reloads = Counter(
            "ctr_routing_reloads_total",
            "Routing file reloads, by outcome.",
            ["outcome"],
            registry=r,
        )
        for outcome in ("ok", "unchanged", "invalid", "failed"):
            self.routing_reloads.labels(outcome)

    def init_model(self, name: str) -> None:
        """Zero series of a loaded model's reload counters (known label values up front)."""
        self.model_reloads.labels(name)
        for stage in ("load", "warmup"):
            self.model_reload_failures.labels(name, stage)

    def init_shadow_pairs(self, pairs: list[tuple[str, str, str]]) -> None:
        """Creates the series of every configured shadow at zero, so dashboards and alerts see
        them before the first shadowed request (Prometheus' advice for known label values).
        Only `output="scores"` up front: every pair compares pCTR, while whether both sides
        have pCVR depends on the versions loaded when a request is shadowed."""
        for variant, model, shadow in pairs:
            for histogram in (self.shadow_abs_diff, self.shadow_rank_correlation):
                histogram.labels(variant, model, shadow, SCORES)
            self.shadow_duration.labels(variant, model, shadow)
            self.shadow_dropped.labels(shadow, "queue_full")
            self.shadow_errors.labels(shadow, "inference")

    def observer(self, model: str) -> BatchObserver:
        return _MetricsObserver(self, model)

    def render(self) -> bytes:
        """The text exposition format, aggregated across processes in multiprocess mode."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class _MetricsObserver(BatchObserver):
    """The batcher's hooks for one model; label children resolved once (a `.labels()` look-up
    costs about as much as the observation itself, and these run per request)."""

    def __init__(self, metrics: ServiceMetrics, model: str) -> None:
        self._m = metrics
        self._batch_requests = metrics.batch_requests.labels(model)
        self._batch_candidates = metrics.batch_candidates.labels(model)
        self._queue_wait = metrics.queue_wait.labels(model)
        self._queue_stage = metrics.stages["queue"]
        self._queue_depth = metrics.queue_depth.labels(model)

    def on_batch(self, requests: int, candidates: int) -> None:
        self._batch_requests.observe(requests)
        self._batch_candidates.observe(candidates)

    def on_queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)
        self._queue_stage.observe(seconds)

    def on_reject(self, reason: str) -> None:
        self._m.rejected.labels(reason).inc()

    def on_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)
