"""Greedy dynamic batching with a candidate budget, N inference workers, a bounded queue and
deadline-aware admission.

One `Batcher` feeds one model version. Its dispatcher task waits until something is queued and
a worker is free, then takes everything queued up to `max_batch_candidates` (no fixed wait: a
lone request at low load goes at once, concurrent ones at high load share a run). For that
batch it awaits `prepare` on the event loop (the engine reads histories there: one Redis round
trip per batch), drops requests whose deadline has passed, and runs `infer` on one of
`workers` threads (ONNX Runtime releases the GIL and its `run` is thread-safe, so N batches of
one session run at once; the event loop never blocks). Each future gets its result or the
batch's exception, a few futures per pass of the event loop (`_hand_back`).

Overload is refused at admission, never queued without bound: a full queue raises `QueueFull`
(429/503 + Retry-After), a draining batcher `Draining` (503), and a request that cannot finish
by its deadline `Overloaded` (429) at once, before any work is spent on it. A request whose
deadline passes anyway before its inference starts gets `DeadlineExceeded` (504) and is never
run; so does one that, once its batch is read, could no longer finish by the batch's estimated
end: it is left out at once rather than expire in flight, slowing the batch it rides in. One
whose run has returned by its deadline keeps its answer, even if the loop gets to it late.

The estimate (`estimated_finish`) is the work ahead shared over the workers (over one on a
device whose runs serialise: `BatcherConfig.parallel_runs`) plus the request's
own run: with `a` the fixed cost of a batch and `b` the cost per candidate (`CostModel`,
calibrated by the engine at start-up on the real model and refined from every batch), the work
ahead is what the batches already taken have left (those still reading their histories included:
a request admitted meanwhile waits for them too), `b` for every queued candidate and `a` for
every batch those candidates will form (`m`, the mean batch size, says how many; before the
first batch, one per queued request); and the request's own batch waits for its read (`prepare`,
an average of the recent ones: 0.7 ms at concurrency 1, 8.6 ms per batch on a loop contended at
2x saturation, where leaving it out let admitted requests expire: docs/performance.md).

The estimate is trusted only with headroom in proportion to it (`slack`, 1.5: a request is
admitted when 2.5 times its estimated wait, plus a fixed margin for the answer's own path, fits
before its deadline). Under overload the queue fills until the estimated finish meets the
deadline, so every admitted request sits at that edge, and the share of them that end in 504s is
the share of waits the estimate undershoots by more than the headroom. With every estimate
logged through a saturation run and 1-2x its load, the actual wait was within 1.32x of the
estimate for 90 % of requests and 1.75x for 99 %; with the former slack (2 % of the wait ahead
only), a third of the requests admitted within 15 % of their deadline became 504s (17-19 % of
all requests at 2x saturation). With 1.0, 2.5-3.1 %, and goodput at 2x rose from 0.63-0.93 to
0.93-0.95 of the peak: a shorter queue still keeps the workers busy, and no work goes to
requests that then expire (docs/performance.md, "Fourth pass"). With 1.5, 504s stayed within
0-0.9 % at every step up to 2x in six runs; with 1.0, in the runs alternated with them, five of
six had a step at 1.2-2.9 %; goodput at 2x the same (docs/performance.md, "Seventh pass").
`Lateness` covers what the estimate misses on a busy host: how much later than estimated the
answers have recently come back to their waiting tasks (contention for the cores, a lagging
event loop), added to every estimate until it fades. Before this model, one "seconds per
candidate" absorbed the fixed costs and the thread hops: it admitted 1,200-candidate batches
that ran past their deadlines and, once inflated, refused everything (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

# Answers settled per pass of the event loop (`Batcher._hand_back`): a response costs its
# handler ~0.15-0.3 ms of the loop on a 2-core VM, so a request arriving while a batch's answers
# go back waits about a millisecond for the loop, not a whole batch's worth of them.
ANSWERS_PER_PASS = 4

Req = TypeVar("Req")
Prep = TypeVar("Prep")
Res = TypeVar("Res")


class Rejected(Exception):
    """Refused before any work was done; `status` and `retry_after_s` go into the response."""

    reason = "rejected"
    message = "refused"

    def __init__(self, status: int, retry_after_s: int) -> None:
        super().__init__(self.reason)
        self.status = status
        self.retry_after_s = retry_after_s


class QueueFull(Rejected):
    reason = "queue_full"
    message = "the model's queue is full; retry later"


class Draining(Rejected):
    reason = "draining"
    message = "shutting down; retry on another replica"


class Overloaded(Rejected):
    """The estimated finish lies past the request's deadline."""

    reason = "overloaded"
    message = (
        "the request cannot be scored within its deadline at the current load; retry later "
        "or with a longer X-Request-Timeout-Ms"
    )


class DeadlineExceeded(Exception):
    """The request's deadline passed before its result was ready."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_candidates: int = 4096
    max_queue_requests: int = 256
    shed_status: int = 429
    retry_after_s: int = 1
    workers: int = 1  # batches of this model in flight at once (threads over one ORT session)
    # Of those, how many runs overlap in time (None: all of them, as on CPU cores). On a GPU the
    # session's runs share one CUDA stream and serialise (SERVING.md 3.2): 1, and the queued
    # work is not shared over the workers in the estimate.
    parallel_runs: int | None = None
    slack: float = 1.5  # headroom proportional to the estimated wait (see the module docstring)
    margin_s: float = 0.003  # the answer's own path after inference, one scheduling delay


class CostModel:
    """Seconds a batch of `c` candidates takes on a worker: `a + b·c`.

    `a` is fixed at calibration; `b` follows the measured batches (an exponential average, by
    candidates) but stays within [b0, 4·b0] of the calibrated `b0`: contention on a busy host
    may slow batches down, but a burst of slow batches (or of refusals keeping the GIL busy)
    must not inflate the estimate until every request is refused. Uncalibrated (b0 = 0), `b`
    is learnt freely and an idle batcher admits everything, so that a run can correct a
    too-high estimate.
    """

    def __init__(self, a: float = 0.0, b: float = 0.0, decay: float = 0.2) -> None:
        self.a, self.b, self._floor, self._decay = a, b, b, decay
        self.mean_batch = 0.0  # candidates per batch (exponential average)

    @property
    def calibrated(self) -> bool:
        return self._floor > 0

    def batch(self, candidates: int) -> float:
        return self.a + self.b * candidates

    def learn(self, seconds: float, candidates: int) -> None:
        if candidates <= 0:
            return
        observed = max(0.0, seconds - self.a) / candidates
        weight = self._decay if self.mean_batch else 1.0
        self.b += weight * (observed - self.b)
        self.mean_batch += weight * (candidates - self.mean_batch)
        if self.calibrated:
            self.b = min(max(self.b, self._floor), 4 * self._floor)


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
    computed_at: float = math.inf  # when its run returned (set on the worker thread)


class Lateness:
    """Recent lateness of answers against their estimates: an exponential average, by request,
    of (resumed − estimated finish), floored at 0, that halves every `half_life_s` without new
    evidence. The fade matters: only admitted requests report, so a value that did not fade
    could keep an idle batcher refusing everything on stale evidence.

    A mean, not a high quantile: a version that rose fast and fell slowly (an 0.83 expectile)
    was measured to spiral under closed-loop load: refusals come back at once, clients retry,
    the loop fills with refusals, the few admitted answers come back late and the value only
    grows (`ctr bench overhead`: 21 answered/s at saturation against ~210 with the mean)."""

    def __init__(
        self,
        weight: float = 0.1,
        half_life_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._weight, self._half_life_s, self._clock = weight, half_life_s, clock
        self._value, self._at = 0.0, clock()

    def value(self) -> float:
        return self._value * 0.5 ** ((self._clock() - self._at) / self._half_life_s)

    def observe(self, late_s: float) -> None:
        current = self.value()
        self._value = max(0.0, current + self._weight * (late_s - current))
        self._at = self._clock()


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
        cost: CostModel | None = None,
    ) -> None:
        self.name = name
        self.config = config or BatcherConfig()
        self.cost = cost or CostModel()
        self.lateness = Lateness()
        self._typical_size = 0.0  # candidates per submitted request (exponential average)
        self._infer = infer
        self._prepare = prepare
        self._observer = observer or BatchObserver()
        self._queue: collections.deque[_Pending[Req, Res]] = collections.deque()
        self._queued_candidates = 0
        self._has_work = asyncio.Event()
        self._free = asyncio.Semaphore(self.config.workers)
        # batch id -> its estimated end (monotonic), from leaving the queue to its answers
        self._running: dict[int, float] = {}
        self._prepare_s = 0.0  # a batch's prepare (history read), exponential average
        self._batches = 0
        self._draining = False
        self._dispatches: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.workers, thread_name_prefix=f"infer-{name}"
        )

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._dispatches

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batch-{self.name}")

    async def submit(self, request: Req, size: int, deadline: float) -> Res:
        """Queues one request of `size` candidates and waits for its result until `deadline`."""
        typical = self._typical_size
        self._typical_size = typical + 0.05 * (size - typical) if typical else float(size)
        self._admit(deadline, size)
        estimated = self._estimated_finish(size)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pending = _Pending(request, size, deadline, now, loop.create_future())
        self._queue.append(pending)
        self._queued_candidates += size
        self._observer.on_depth(len(self._queue))
        self._has_work.set()
        timer = loop.call_later(deadline - now, self._expire, pending)
        try:
            result = await pending.future
        except DeadlineExceeded:
            self.lateness.observe(deadline - estimated)  # at least that late
            self._observer.on_reject("deadline")
            raise
        else:
            self.lateness.observe(time.monotonic() - estimated)
            return result
        finally:
            timer.cancel()
            # Whatever happened to the caller (timeout, disconnect), a request nobody waits for
            # any more is skipped by the dispatcher instead of being run.
            pending.future.cancel()

    def begin_drain(self) -> None:
        """New submissions are refused from now on; queued ones still run."""
        self._draining = True

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Drains the queue (up to `timeout_s`), then stops the dispatcher and the workers."""
        self.begin_drain()
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            self._fail(self._pop(), Draining(503, self.config.retry_after_s))
        self._executor.shutdown(wait=True)

    def estimated_finish(self, size: int) -> float:
        """Monotonic time a request of `size` candidates queued now would be answered."""
        return self._estimated_finish(size) + self.lateness.value()

    def _estimated_finish(self, size: int) -> float:
        """The estimate from the queue and the cost model alone (what lateness is measured
        against)."""
        now = time.monotonic()
        cost, config = self.cost, self.config
        left = sum(max(0.0, end - now) for end in self._running.values())
        queued = self._queued_candidates
        # A batch holds at least one request: before the first batch there is no mean, and
        # one batch per queued candidate had a fresh service refuse most of its first burst.
        per_batch = max(cost.mean_batch, self._typical_size, 1.0)
        batches = math.ceil(queued / per_batch) if queued else 0
        # The request's own batch waits for its read (`prepare`) before it runs. The batches
        # ahead read too, but counting a read per mean-sized batch refused a quarter of a
        # burst (where one large batch reads once): docs/performance.md "The trade-off".
        at_once = config.parallel_runs or config.workers
        ahead = (left + cost.b * queued + cost.a * batches) / at_once
        own = self._prepare_s + cost.batch(size)
        return now + (ahead + own) * (1 + config.slack) + config.margin_s

    def can_meet(self, size: int, deadline: float) -> bool:
        """Whether a request of `size` candidates could be answered by `deadline` now."""
        if self.idle and not self.cost.calibrated:
            return True  # only a run can correct an uncalibrated estimate that is too high
        return self.estimated_finish(size) <= deadline

    def can_meet_typical(self, deadline: float) -> bool:
        """`can_meet` for a request of the size this model usually gets: the check before a
        body is parsed, when its size is not known yet."""
        return self.can_meet(max(1, round(self._typical_size)), deadline)

    def _admit(self, deadline: float, size: int) -> None:
        error: Exception | None = None
        if self._draining:
            error = Draining(503, self.config.retry_after_s)
        elif len(self._queue) >= self.config.max_queue_requests:
            error = QueueFull(self.config.shed_status, self.config.retry_after_s)
        elif deadline <= time.monotonic():
            error = DeadlineExceeded()
        elif not self.can_meet(size, deadline):
            error = Overloaded(self.config.shed_status, self.config.retry_after_s)
        if error is not None:
            self._observer.on_reject(getattr(error, "reason", "deadline"))
            raise error

    async def _run(self) -> None:
        while True:
            await self._has_work.wait()
            await self._free.acquire()  # a worker is free: form the batch now, at its largest
            batch = self._take()
            if not self._queue:
                self._has_work.clear()
            if not batch:
                self._free.release()
                continue
            task = asyncio.get_running_loop().create_task(self._dispatch(batch))
            self._dispatches.add(task)
            task.add_done_callback(self._dispatches.discard)

    def _take(self) -> list[_Pending[Req, Res]]:
        """Everything queued, oldest first, up to the candidate budget and the time budget of
        the earliest deadline in the batch (always at least one live request)."""
        batch: list[_Pending[Req, Res]] = []
        budget = self.config.max_batch_candidates
        candidates, earliest = 0, math.inf
        start = time.monotonic() + self._prepare_s  # the batch runs once its read is done
        while self._queue:
            head = self._queue[0]
            if not self._alive(head):
                self._pop()
                continue
            end = start + self.cost.batch(candidates + head.size)
            if batch and (head.size > budget or end > min(earliest, head.deadline)):
                break
            batch.append(self._pop())
            budget -= head.size
            candidates += head.size
            earliest = min(earliest, head.deadline)
        self._observer.on_depth(len(self._queue))
        return batch

    def _pop(self) -> _Pending[Req, Res]:
        pending = self._queue.popleft()
        self._queued_candidates -= pending.size
        return pending

    async def _dispatch(self, batch: list[_Pending[Req, Res]]) -> None:
        try:
            answers = await self._prepare_and_infer(batch)
        finally:
            self._free.release()  # the next batch may run while these answers go back
        await self._hand_back(answers)

    async def _hand_back(self, answers: list[tuple[_Pending[Req, Res], Res | Exception]]) -> None:
        """Settles the futures `ANSWERS_PER_PASS` at a time, one pass of the event loop each.
        Each settled request's handler encodes and writes its response in the loop's next
        pass; a whole batch settled at once made that pass as long as all its responses
        (20-30 at saturation), and every request arriving meanwhile, a refusal too, waited
        for it (docs/performance.md, "Ninth pass"). Between passes the loop reads its sockets."""
        try:
            for start in range(0, len(answers), ANSWERS_PER_PASS):
                if start:
                    await asyncio.sleep(0)
                for pending, result in answers[start : start + ANSWERS_PER_PASS]:
                    self._settle(pending, result)
        except BaseException:  # cancelled (the loop's teardown): the rest are ready, answer them
            for pending, result in answers:
                self._settle(pending, result)
            raise

    async def _prepare_and_infer(
        self, batch: list[_Pending[Req, Res]]
    ) -> list[tuple[_Pending[Req, Res], Res | Exception]]:
        """The batch's answers, each with its request, for `_hand_back`; the requests without
        one are settled here."""
        taken = time.monotonic()
        for p in batch:
            self._observer.on_queue_wait(taken - p.enqueued)
        self._batches += 1
        batch_id = self._batches
        # Counted from the moment it leaves the queue: while its histories are read it is in
        # neither the queue nor a worker, yet a request admitted meanwhile waits for it.
        size = sum(p.size for p in batch)
        self._running[batch_id] = taken + self._prepare_s + self.cost.batch(size)
        try:
            return await self._run_batch(batch, batch_id, taken)
        except BaseException:
            # Only a cancelled dispatch gets here, with requests unsettled; no timer may be
            # left to settle them (`_expire` spares a request whose run returned in time).
            for p in batch:
                self._fail(p, DeadlineExceeded())
            raise
        finally:
            del self._running[batch_id]

    async def _run_batch(
        self, batch: list[_Pending[Req, Res]], batch_id: int, taken: float
    ) -> list[tuple[_Pending[Req, Res], Res | Exception]]:
        try:
            prepared = await self._prepare([p.request for p in batch])
        except Exception as exc:
            for p in batch:
                self._fail(p, exc)
            return []
        start = time.monotonic()
        read_s = start - taken
        self._prepare_s += 0.2 * (read_s - self._prepare_s) if self._prepare_s else read_s
        live = self._runnable(list(zip(batch, prepared, strict=True)))
        if not live:
            return []
        candidates = sum(p.size for p, _ in live)
        self._observer.on_batch(len(live), candidates)
        self._running[batch_id] = start + self.cost.batch(candidates)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._timed_infer, live)
        except Exception as exc:
            for p, _ in live:
                self._fail(p, exc)
            return []
        return [(p, result) for (p, _), result in zip(live, results, strict=True)]

    def _runnable(
        self, batch: list[tuple[_Pending[Req, Res], Prep]]
    ) -> list[tuple[_Pending[Req, Res], Prep]]:
        """The batch's requests that its run can still answer in time. A request whose deadline
        falls before the batch's estimated end gets its 504 now, not after the run it would
        only slow down (under overload, most 504s were requests that expired in flight)."""
        live = [(p, x) for p, x in batch if self._alive(p)]
        if not self.cost.calibrated:
            return live
        end = time.monotonic() + self.cost.batch(sum(p.size for p, _ in live))
        for p, _ in live:
            if p.deadline < end:
                self._fail(p, DeadlineExceeded())
        return [(p, x) for p, x in live if not p.future.done()]

    def _timed_infer(
        self, live: list[tuple[_Pending[Req, Res], Prep]]
    ) -> Sequence[Res | Exception]:
        """Runs on a worker thread; the time it takes is what the cost model learns from."""
        start = time.perf_counter()
        results = self._infer([x for _, x in live])
        computed_at = time.monotonic()
        for p, _ in live:
            p.computed_at = computed_at
        if len(results) != len(live):
            raise RuntimeError(f"infer returned {len(results)} results for {len(live)}")
        self.cost.learn(time.perf_counter() - start, sum(p.size for p, _ in live))
        return results

    def _alive(self, pending: _Pending[Req, Res]) -> bool:
        """False (and the future settled) for requests given up on, past their deadline, or
        (with a calibrated cost) that could no longer finish by it even if they ran alone now."""
        if pending.future.done():
            return False
        needs = self.cost.batch(pending.size) if self.cost.calibrated else 0.0
        if time.monotonic() + needs > pending.deadline:
            self._fail(pending, DeadlineExceeded())
            return False
        return True

    def _expire(self, pending: _Pending[Req, Res]) -> None:
        """The deadline timer. A request whose run returned before its deadline keeps its
        answer, which is on its way back to the loop: on a loop running late, the timer and
        the answer come due in the same pass, and the 504 would leave no sooner than the 200
        (0.15-0.17 % of requests at 1.5-2x saturation, a tenth of the 504s, were these)."""
        if pending.computed_at > pending.deadline:
            self._fail(pending, DeadlineExceeded())

    @staticmethod
    def _fail(pending: _Pending[Req, Res], exc: BaseException) -> None:
        if not pending.future.done():
            pending.future.set_exception(exc)

    @classmethod
    def _settle(cls, pending: _Pending[Req, Res], result: Res | Exception) -> None:
        if isinstance(result, Exception):
            cls._fail(pending, result)
        elif not pending.future.done():
            pending.future.set_result(result)
