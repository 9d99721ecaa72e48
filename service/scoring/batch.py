"""The work of one batch of one model version, each stage timed.

`prepare` (on the event loop) gives every request without an inline history the user's stored
one, from one Redis round trip for the whole batch (or an empty one, `fallback`, when the store
does not answer in time). `infer` (on a batcher worker thread) encodes, runs ONNX Runtime and
splits the scores per request; if the batch fails, each request is retried on its own, so one
request that breaks the model cannot fail the others of its batch.

Every result carries its batch's timing (the read, encode, inference windows and the batch's
size): the engine turns it into the per-request stage histogram and, when tracing, into the
request's child spans. Timing travels with the result rather than being observed here because
a batch stage delays each of the batch's requests, and both the histogram and a trace are per
request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from runtime.feeds import HistorySource, ScoringRequest
from runtime.loader import LoadedModel
from service.metrics import ServiceMetrics
from service.scoring.naive import score_per_candidate

log = logging.getLogger(__name__)
Pair = tuple[str, str]
# (users, items wanted per user) -> ({user: history, oldest first}, where it came from)
ReadHistories = Callable[[list[str], int], Awaitable[tuple[dict[str, list[Pair]], HistorySource]]]


@dataclass(frozen=True)
class Window:
    """A stage's start and end, `time.monotonic()` seconds."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Prepared:
    request: ScoringRequest  # with its history
    read: Window | None  # its batch's history read, if the batch had one


@dataclass(frozen=True)
class BatchTiming:
    read: Window | None
    encode: Window
    infer: Window  # ONNX Runtime and the split
    requests: int
    candidates: int


@dataclass(frozen=True)
class Scored:
    request: ScoringRequest  # what was scored, history included (the shadow gets the same)
    scores: np.ndarray  # [K, O], columns in the model's `output_names` order
    timing: BatchTiming


class BatchWork:
    """`prepare` and `infer` of one model version (see the module docstring)."""

    def __init__(
        self,
        model: LoadedModel,
        read_histories: ReadHistories,
        history_len: Callable[[], int],
        metrics: ServiceMetrics,
    ) -> None:
        self.model = model
        self._read = read_histories
        self._history_len = history_len  # what to read: at least the model's own length
        self._encode_duration = metrics.encode_duration.labels(model.name)
        self._inference_duration = metrics.inference_duration.labels(model.name, str(model.version))

    async def prepare(self, requests: list[ScoringRequest]) -> list[Prepared]:
        wanted = [r.user_id for r in requests if r.history is None]
        if not wanted:
            return [Prepared(r, None) for r in requests]
        start = time.monotonic()
        stored, source = await self._read(wanted, self._history_len())
        read = Window(start, time.monotonic())
        return [
            Prepared(
                r
                if r.history is not None
                else dataclasses.replace(
                    r, history=stored.get(r.user_id, []), history_source=source
                ),
                read,
            )
            for r in requests
        ]

    def infer(self, batch: list[Prepared]) -> list[Scored | Exception]:
        """Runs on a worker thread: the batch at once, or its requests one by one if it fails."""
        try:
            return list(self._infer_batch(batch))
        except Exception:
            if len(batch) == 1:
                raise
            log.exception("batch of %d failed; scoring its requests one by one", len(batch))
        results: list[Scored | Exception] = []
        for prepared in batch:
            try:
                results += self._infer_batch([prepared])
            except Exception as exc:
                results.append(exc)
        return results

    def infer_naive(self, batch: list[Prepared]) -> list[Scored]:
        """The benchmark baseline: one ORT call per candidate (service.scoring.naive)."""
        results = []
        for prepared in batch:
            start = time.monotonic()
            scores = score_per_candidate(self.model, prepared.request)
            window = Window(start, time.monotonic())
            self._inference_duration.observe(window.seconds)
            size = len(prepared.request.candidates)
            timing = BatchTiming(prepared.read, Window(start, start), window, 1, size)
            results.append(Scored(prepared.request, scores, timing))
        return results

    def _infer_batch(self, batch: list[Prepared]) -> list[Scored]:
        requests = [p.request for p in batch]
        t0 = time.monotonic()
        feeds = self.model.encode(requests)
        t1 = time.monotonic()
        flat = self.model.run(feeds)
        ran = time.monotonic()
        parts = self.model.split(requests, flat)
        t2 = time.monotonic()
        self._encode_duration.observe(t1 - t0)
        self._inference_duration.observe(ran - t1)
        candidates = sum(len(r.candidates) for r in requests)
        timing = BatchTiming(batch[0].read, Window(t0, t1), Window(t1, t2), len(batch), candidates)
        return [Scored(r, part, timing) for r, part in zip(requests, parts, strict=True)]
