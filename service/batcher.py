"""Greedy dynamic batching with a candidate budget, a bounded queue and per-request deadlines.

One `Batcher` feeds one model. Its dispatcher task waits until something is queued, then takes
everything queued up to `max_batch_candidates` (no fixed wait: a lone request at low load goes
at once, concurrent ones at high load share a run). For that batch it awaits `prepare` on the
event loop (the engine reads histories there: one Redis round trip per batch), drops requests
whose deadline has passed, and runs `infer` in a dedicated worker thread (ONNX Runtime releases
the GIL; the event loop never blocks). Each future gets its result or the batch's exception.

Overload is refused at admission, never queued without bound: a full queue raises `QueueFull`
(429/503 + Retry-After), a draining batcher `Draining` (503). A request whose deadline passes
before its inference starts gets `DeadlineExceeded` (504) and is never run.

Deadline-aware admission: the batcher learns the model's cost (seconds per candidate, from
decayed sums over finished batches). A request whose estimated finish (the running batch,
everything queued ahead of it, then itself) lies past its deadline is refused at once with
`Overloaded` (429/503), and a batch stops growing when its estimated run would pass the earliest
deadline it holds. Without this, a load test past saturation turned most requests into 504s
after the work was queued (and often done) for nothing: a fast refusal lets the client retry
elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Req = TypeVar("Req")
Prep = TypeVar("Prep")
Res = TypeVar("Res")


class Rejected(Exception):
    """Refused before any work was done; `status` and `retry_after_s` go into the response."""

    reason = "rejected"

    def __init__(self, status: int, retry_after_s: int) -> None:
        super().__init__(self.reason)
        self.status = status
        self.retry_after_s = retry_after_s


class QueueFull(Rejected):
    reason = "queue_full"


class Draining(Rejected):
    reason = "draining"


class Overloaded(Rejected):
    """The estimated wait already exceeds the request's deadline."""

    reason = "overloaded"


class DeadlineExceeded(Exception):
    """The request's deadline passed before its result was ready."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_candidates: int = 4096
    max_queue_requests: int = 256
    shed_status: int = 429
    retry_after_s: int = 1
    cost_decay: float = 0.2  # per batch, of the decayed sums behind seconds/candidate


class BatchObserver:
    """Metric hooks; the default does nothing (subclassed by the engine's metrics)."""

    def on_batch(self, requests: int, candidates: int) -> None: ...

    def on_queue_wait(self, seconds: float) -> None: ...

    def on_reject(self, reason: str) -> None: ...

    def on_depth(self, depth: int) -> None: ...


@dataclass
class _Pending(Generic[Req, Res]):
    request: Req
    size: int
    deadline: float  # time.monotonic() seconds
    enqueued: float
    future: asyncio.Future[Res] = field(repr=False)


class Batcher(Generic[Req, Prep, Res]):
    """See the module docstring. `infer(prepared)` must return one result per input, in order;
    an `Exception` in place of a result fails that request only."""

    def __init__(
        self,
        name: str,
        infer: Callable[[list[Prep]], Sequence[Res | Exception]],
        prepare: Callable[[list[Req]], Awaitable[list[Prep]]],
        config: BatcherConfig | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.config = config or BatcherConfig()
        self._infer = infer
        self._prepare = prepare
        self._observer = observer or BatchObserver()
        self._queue: collections.deque[_Pending[Req, Res]] = collections.deque()
        self._has_work = asyncio.Event()
        self._draining = False
        self._busy = False
        # Decayed sums of inference seconds and candidates over finished batches: their ratio
        # is dominated by large batches, where the fixed per-call overhead is amortised, so it
        # tracks the marginal cost that matters when a queue builds up.
        self._cost_seconds = 0.0
        self._cost_candidates = 0.0
        self._running_until = 0.0  # estimated monotonic end of the batch being inferred
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._busy

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batch-{self.name}")

    async def submit(self, request: Req, size: int, deadline: float) -> Res:
        """Queues one request of `size` candidates and waits for its result until `deadline`."""
        self._admit(deadline, size)
        loop = asyncio.get_running_loop()
        pending = _Pending(request, size, deadline, time.monotonic(), loop.create_future())
        self._queue.append(pending)
        self._observer.on_depth(len(self._queue))
        self._has_work.set()
        try:
            # shield: the timeout must not cancel a result the dispatcher is about to set.
            return await asyncio.wait_for(
                asyncio.shield(pending.future), max(0.0, deadline - time.monotonic())
            )
        except (asyncio.TimeoutError, DeadlineExceeded):
            self._observer.on_reject("deadline")
            raise DeadlineExceeded from None
        finally:
            # Whatever happened to the caller (timeout, disconnect), a request nobody waits for
            # any more is skipped by the dispatcher instead of being run.
            pending.future.cancel()

    def begin_drain(self) -> None:
        """New submissions are refused from now on; queued ones still run."""
        self._draining = True

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Drains the queue (up to `timeout_s`), then stops the dispatcher and the worker."""
        self.begin_drain()
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            self._fail(self._queue.popleft(), Draining(503, self.config.retry_after_s))
        self._executor.shutdown(wait=True)

    def estimated_finish(self, size: int) -> float:
        """Monotonic time a request of `size` queued now would finish: the running batch's
        end, then everything queued, then the request (no cost is known before a batch ran)."""
        queued = sum(p.size for p in self._queue)
        return max(time.monotonic(), self._running_until) + (queued + size) * self._cost()

    def _admit(self, deadline: float, size: int) -> None:
        error: Exception | None = None
        if self._draining:
            error = Draining(503, self.config.retry_after_s)
        elif len(self._queue) >= self.config.max_queue_requests:
            error = QueueFull(self.config.shed_status, self.config.retry_after_s)
        elif deadline <= time.monotonic():
            error = DeadlineExceeded()
        elif not self.idle and self.estimated_finish(size) > deadline:
            # An idle batcher always admits: the request starts at once, and the cost estimate
            # keeps learning (refusing on a stale, too-high estimate would never correct it).
            error = Overloaded(self.config.shed_status, self.config.retry_after_s)
        if error is not None:
            self._observer.on_reject(getattr(error, "reason", "deadline"))
            raise error

    async def _run(self) -> None:
        while True:
            await self._has_work.wait()
            self._busy = True
            try:
                batch = self._take()
                if not self._queue:
                    self._has_work.clear()
                if batch:
                    await self._dispatch(batch)
            finally:
                self._busy = False

    def _take(self) -> list[_Pending[Req, Res]]:
        """Everything queued, oldest first, up to the candidate budget and the time budget of
        the earliest deadline in the batch (always at least one request)."""
        batch: list[_Pending[Req, Res]] = []
        budget = self.config.max_batch_candidates
        candidates, earliest = 0, float("inf")
        while self._queue:
            head = self._queue[0]
            if not self._alive(head):
                self._queue.popleft()
                continue
            if batch and (
                head.size > budget
                or self._estimated_end(candidates + head.size) > min(earliest, head.deadline)
            ):
                break
            batch.append(self._queue.popleft())
            budget -= head.size
            candidates += head.size
            earliest = min(earliest, head.deadline)
        self._observer.on_depth(len(self._queue))
        return batch

    async def _dispatch(self, batch: list[_Pending[Req, Res]]) -> None:
        try:
            prepared = await self._prepare([p.request for p in batch])
        except Exception as exc:
            for p in batch:
                self._fail(p, exc)
            return
        live = [(p, x) for p, x in zip(batch, prepared, strict=True) if self._alive(p)]
        if not live:
            return
        start = time.monotonic()
        for p, _ in live:
            self._observer.on_queue_wait(start - p.enqueued)
        candidates = sum(p.size for p, _ in live)
        self._observer.on_batch(len(live), candidates)
        self._running_until = self._estimated_end(candidates)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._infer, [x for _, x in live])
            if len(results) != len(live):
                raise RuntimeError(f"infer returned {len(results)} results for {len(live)}")
            self._learn_cost(time.monotonic() - start, candidates)
        except Exception as exc:
            for p, _ in live:
                self._fail(p, exc)
            return
        for (p, _), result in zip(live, results, strict=True):
            if isinstance(result, Exception):
                self._fail(p, result)
            elif not p.future.done():
                p.future.set_result(result)

    def _estimated_end(self, candidates: int) -> float:
        """Monotonic time a batch of `candidates` started now would end (now when unknown)."""
        return time.monotonic() + candidates * self._cost()

    def _cost(self) -> float:
        """Estimated seconds per candidate; 0 until a batch has finished."""
        return self._cost_seconds / self._cost_candidates if self._cost_candidates else 0.0

    def _learn_cost(self, seconds: float, candidates: int) -> None:
        keep = 1.0 - self.config.cost_decay
        self._cost_seconds = keep * self._cost_seconds + seconds
        self._cost_candidates = keep * self._cost_candidates + candidates

    def _alive(self, pending: _Pending[Req, Res]) -> bool:
        """False (and the future settled) for requests given up on or past their deadline."""
        if pending.future.done():
            return False
        if pending.deadline <= time.monotonic():
            self._fail(pending, DeadlineExceeded())
            return False
        return True

    @staticmethod
    def _fail(pending: _Pending[Req, Res], exc: BaseException) -> None:
        if not pending.future.done():
            pending.future.set_exception(exc)
