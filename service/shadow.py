"""Shadow scoring: a copy of a primary request scored by another model, off the critical path.

The client is answered first: the engine hands the route an `after_response` callable that a
FastAPI background task runs once the response has been sent. The shadow only gets a copy (the
same history the primary used, the same candidates and context), and nothing it does can reach
the response. The engine samples (`fraction`) beforehand; `offer` is synchronous and O(1) on
the event loop: it appends to the shadow version's own bounded queue or, when that is full,
drops and counts (`ctr_shadow_dropped_total{reason="queue_full"}`). Everything else happens in
that version's own worker thread (`ShadowWorker`), never on the event loop: taking the jobs
greedily (up to the candidate budget), dropping those older than the shadow timeout, encoding,
ONNX Runtime, comparing, recording. The thread runs at a lower CPU priority (nice +10), so on a
busy host the kernel runs the primary's inference thread and the event loop first, and it does
not start a batch while any primary request is being scored (`yield_to_primary`): above
saturation the shadow's jobs expire (dropped, `deadline`) rather than compete with them. A
plain thread rather than an asyncio task per job on the primary's `Batcher` class: the event
loop, which every primary request needs, does one append per shadowed request and nothing
else. Every failure is counted (`ctr_shadow_errors_total{stage}`) and logged at most every
10 s; none is raised.

Per shadowed request, in the shadow's worker thread, for every output that both the primary and
the shadow have (`scores` always; `conversion_scores` and `ctcvr_scores` when both are
multi-task models), labelled `output`:
* `ctr_shadow_abs_diff`: |primary − shadow| of every candidate (K observations per output);
* `ctr_shadow_rank_correlation`: Spearman's rho of the two orderings (see `spearman`);
and once per request `ctr_shadow_duration_seconds`: enqueue to shadow scores (queue wait +
inference). An output only one side has is not compared (a single-task shadow of a multi-task
primary is compared on `scores` alone): there is nothing to measure it against.
Optionally the pairs go to a Redis stream capped with `XADD MAXLEN ~` (`CTR_SHADOW_STREAM`),
handed to the event loop's Redis client with `run_coroutine_threadsafe`; records carry the
request id and item ids but no user id, so an erasure of a user's history leaves nothing of
theirs behind in the stream. `primary_scores`, `shadow_scores` and `rank_correlation` are the
pCTR pair; `outputs` lists every compared output, and each one besides `scores` adds
`primary_<output>`, `shadow_<output>` and `rank_correlation_<output>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from runtime.loader import SCORES, LoadedModel, ScoringRequest
from service.contracts import ShadowSpec
from service.metrics import ServiceMetrics
from service.store.behavior import BehaviorStore

log = logging.getLogger(__name__)
_WARNING_INTERVAL_S = 10.0
_NICE = 10
_STOP_CHECK_S = 0.1  # a waiting shadow thread notices a stop within this


@dataclass(frozen=True)
class ShadowSettings:
    queue_max: int = 64  # jobs waiting or running per shadow model version
    timeout_s: float = 1.0  # a job not scored within this is dropped
    batch_max_candidates: int = 500  # per shadow batch (at least one job)
    stream_key: str | None = None  # Redis stream of the score pairs; None: off
    stream_maxlen: int = 100_000


@dataclass(frozen=True)
class ShadowJob:
    request_id: str
    variant: str
    model: str  # the primary's name and version
    version: int
    request: ScoringRequest  # what the primary scored, history included
    scores: np.ndarray  # the primary's probabilities [K, O], one column per output name
    outputs: tuple[str, ...]  # the primary's output names (`scores` first)
    enqueued: float  # time.monotonic()


@dataclass(frozen=True)
class ShadowOutcome:
    outputs: tuple[str, ...]  # the outputs compared: both sides have them, primary's order
    primary: np.ndarray  # [K, len(outputs)]
    shadow: np.ndarray  # [K, len(outputs)]
    rank_correlations: tuple[float | None, ...]  # one per compared output


def shared_outputs(primary: tuple[str, ...], shadow: tuple[str, ...]) -> tuple[str, ...]:
    """The outputs both models have, in the primary's order (`scores` first on both)."""
    return tuple(name for name in primary if name in shadow)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the positions they occupy."""
    n = values.size
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(ordered)) + 1))
    ends = np.append(starts[1:], n)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho of two score vectors: the Pearson correlation of their average ranks
    (the tie-corrected form, equal to 1 − 6Σd²/(K(K²−1)) when nothing ties).

    Undefined, so None and not observed, when K < 2 (a one-candidate slate has no ordering to
    compare; counting it as 1 would inflate agreement) or when either side ranks every
    candidate equal (zero rank variance).
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.sqrt(np.dot(dx, dx) * np.dot(dy, dy)))
    if denominator == 0.0:
        return None
    return float(np.clip(np.dot(dx, dy) / denominator, -1.0, 1.0))


def _lower_priority() -> None:
    """Runs in the shadow worker thread: Linux nice values are per thread."""
    # Not Linux, or not permitted: the thread keeps the default priority.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)


class ShadowWorker:
    """One shadow model version: its bounded queue and its worker thread."""

    def __init__(self, model: LoadedModel, scorer: ShadowScorer) -> None:
        self.model = model
        self._scorer = scorer
        self._jobs: deque[ShadowJob] = deque()
        self._busy = 0  # jobs taken by the thread and not finished
        self._stopping = False
        self._cv = threading.Condition()
        name = f"infer-shadow-{model.name}-{model.version}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def depth(self) -> int:
        """Jobs waiting or being scored."""
        return len(self._jobs) + self._busy

    def start(self) -> None:
        self._thread.start()

    def offer(self, job: ShadowJob) -> bool:
        """Queues `job` unless the queue is full or the worker stops (then False)."""
        with self._cv:
            if self._stopping or self.depth >= self._scorer.settings.queue_max:
                return False
            self._jobs.append(job)
            self._cv.notify()
        return True

    def begin_drain(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Finishes the batch in progress; what is still queued is dropped (`draining`)."""
        self.begin_drain()
        await asyncio.to_thread(self._thread.join, timeout_s)

    def _run(self) -> None:
        _lower_priority()
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
            idle = self._scorer.yield_to_primary(lambda: self._stopping)
            with self._cv:
                if not idle and not self._stopping:
                    self._drop_stale()  # still no idle time: expire what waited too long
                    continue
                if self._stopping:
                    self._scorer.dropped(self.model.name, "draining", len(self._jobs))
                    self._jobs.clear()
                    return
                batch = self._take()
            try:
                self._scorer.score(self.model, batch)
            except Exception as exc:  # the worker must outlive any one bad batch
                self._scorer.failed(self.model.name, "inference", exc, len(batch))
            finally:
                with self._cv:
                    self._busy = 0

    def _drop_stale(self) -> None:
        """Drops (and counts) queued jobs older than the shadow timeout; under the lock."""
        oldest = time.monotonic() - self._scorer.settings.timeout_s
        while self._jobs and self._jobs[0].enqueued < oldest:
            self._jobs.popleft()
            self._scorer.dropped(self.model.name, "deadline")

    def _take(self) -> list[ShadowJob]:
        """Queued jobs, oldest first, up to the candidate budget; stale ones are dropped."""
        self._drop_stale()
        budget = self._scorer.settings.batch_max_candidates
        batch: list[ShadowJob] = []
        while self._jobs:
            job = self._jobs[0]
            size = len(job.request.candidates)
            if batch and size > budget:
                break
            batch.append(self._jobs.popleft())
            budget -= size
        self._busy = len(batch)
        return batch


ShadowTarget = tuple[LoadedModel, ShadowWorker]


class ShadowScorer:
    """Samples, queues, scores and compares shadow requests; see the module docstring."""

    def __init__(
        self,
        settings: ShadowSettings,
        metrics: ServiceMetrics,
        store: BehaviorStore,
        primary_idle: threading.Event | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._m = metrics
        self._store = store
        self._primary_idle = primary_idle
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_warning = -_WARNING_INTERVAL_S

    def sampled(self, spec: ShadowSpec) -> bool:
        return spec.fraction >= 1.0 or self._rng.random() < spec.fraction

    def worker_for(self, model: LoadedModel) -> ShadowWorker:
        """The shadow queue and thread of `model` (started by the caller, on the loop)."""
        self._loop = asyncio.get_running_loop()
        return ShadowWorker(model, self)

    def offer(self, spec: ShadowSpec, job: ShadowJob, target: ShadowTarget | None) -> None:
        """Never raises, never waits: queues the job for its shadow or counts why not."""
        if target is None:
            self.dropped(spec.model, "unavailable")
        elif not target[1].offer(job):
            self.dropped(target[0].name, "queue_full")

    def yield_to_primary(self, stopping: Callable[[], bool]) -> bool:
        """Worker thread: waits until no primary request is being scored (the shadow only uses
        the time the primary leaves); True then, False after the shadow timeout. Above
        saturation the shadow's jobs therefore expire and are counted as dropped (`deadline`)
        instead of taking CPU from primary work. An event, not polling: a waiting shadow thread
        never asks for the GIL (at nice +10 it could be slow to hand it back)."""
        if self._primary_idle is None:
            return True
        deadline = time.monotonic() + self.settings.timeout_s
        while not stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._primary_idle.wait(min(remaining, _STOP_CHECK_S)):
                return True
        return True

    def dropped(self, shadow: str, reason: str, count: int = 1) -> None:
        if count:
            self._m.shadow_dropped.labels(shadow, reason).inc(count)

    def failed(self, shadow: str, stage: str, exc: BaseException, count: int = 1) -> None:
        self._m.shadow_errors.labels(shadow, stage).inc(count)
        now = time.monotonic()
        if now - self._last_warning >= _WARNING_INTERVAL_S:
            self._last_warning = now
            log.warning("shadow %s failed at %s: %s: %s", shadow, stage, type(exc).__name__, exc)

    def score(self, model: LoadedModel, jobs: list[ShadowJob]) -> None:
        """Worker thread: score the batch, check each output, record the divergence of every
        output both sides have."""
        for job, scores in zip(jobs, model.score([j.request for j in jobs]), strict=True):
            k = len(job.request.candidates)
            if scores.shape != (k, len(model.output_names)) or not _probabilities(scores):
                self.failed(
                    model.name,
                    "output",
                    ValueError(f"{model.name} v{model.version} returned no probabilities"),
                )
                continue
            outputs = shared_outputs(job.outputs, model.output_names)
            primary = job.scores[:, [job.outputs.index(name) for name in outputs]]
            shadow = scores[:, [model.output_names.index(name) for name in outputs]]
            pair = (job.variant, job.model, model.name)
            rhos = []
            for j, name in enumerate(outputs):
                a, b = primary[:, j], shadow[:, j]
                diff = np.abs(b.astype(np.float64) - a.astype(np.float64))
                histogram = self._m.shadow_abs_diff.labels(*pair, name)
                for value in diff.tolist():
                    histogram.observe(value)
                rho = spearman(a, b)
                if rho is not None:
                    self._m.shadow_rank_correlation.labels(*pair, name).observe(rho)
                rhos.append(rho)
            elapsed = time.monotonic() - job.enqueued
            self._m.shadow_duration.labels(*pair).observe(elapsed)
            if self.settings.stream_key is not None:
                self._append(model, job, ShadowOutcome(outputs, primary, shadow, tuple(rhos)))

    def _append(self, model: LoadedModel, job: ShadowJob, outcome: ShadowOutcome) -> None:
        """Hands the XADD to the event loop's Redis client; a failure is counted there."""
        store, key, loop = self._store, self.settings.stream_key, self._loop
        if key is None or loop is None:
            return
        fields = {
            "request_id": job.request_id,
            "variant": job.variant,
            "model": job.model,
            "version": str(job.version),
            "shadow": model.name,
            "shadow_version": str(model.version),
            "items": json.dumps([item for item, _ in job.request.candidates]),
            "outputs": json.dumps(list(outcome.outputs)),
        }
        for j, name in enumerate(outcome.outputs):
            rho = outcome.rank_correlations[j]
            fields[f"primary_{name}"] = json.dumps(outcome.primary[:, j].tolist())
            fields[f"shadow_{name}"] = json.dumps(outcome.shadow[:, j].tolist())
            # pCTR keeps the field name the stream had before multi-task models.
            rank_key = "rank_correlation" if name == SCORES else f"rank_correlation_{name}"
            fields[rank_key] = "" if rho is None else repr(rho)

        def done(future: Future[None]) -> None:
            if not future.cancelled() and future.exception() is not None:
                self.failed(model.name, "stream", future.exception() or Exception())

        call = store.append_stream(key, fields, self.settings.stream_maxlen)
        asyncio.run_coroutine_threadsafe(call, loop).add_done_callback(done)


def _probabilities(scores: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(scores)) and np.all((scores >= 0.0) & (scores <= 1.0)))
