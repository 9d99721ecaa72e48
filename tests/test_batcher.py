"""The batcher on its own (no HTTP, no model): batching, shedding, deadlines, errors, draining.
(Admission on its cost estimate: tests/test_batcher_estimate.py.)

The inference function is a deterministic blocker (a threading.Event it waits on), the pattern
Ray Serve's backpressure tests use: it holds the worker so the test controls exactly what is
running and what is queued.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
from batcher_support import Counts, Prepares, later

from service.scoring.batcher import (
    Batcher,
    BatcherConfig,
    BatchObserver,
    DeadlineExceeded,
    Draining,
    QueueFull,
)


class Recorder:
    """infer(): records every batch it is given; waits on `gate` while it is cleared."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def infer(self, batch: list[int]) -> list[int]:
        self.batches.append(list(batch))
        self.entered.set()
        self.gate.wait(5)
        return [x * 10 for x in batch]


def _batcher(
    recorder: Recorder,
    prepare: Callable[[list[int]], Awaitable[list[int]]] | None = None,
    observer: BatchObserver | None = None,
    **config: int,
) -> Batcher[int, int, int]:
    return Batcher("m", recorder.infer, prepare or Prepares(), BatcherConfig(**config), observer)


async def _hold_worker(batcher: Batcher[int, int, int], recorder: Recorder) -> asyncio.Task[int]:
    """Starts request 0 and waits until the worker is blocked inside infer()."""
    recorder.gate.clear()
    first = asyncio.ensure_future(batcher.submit(0, 1, later()))
    await asyncio.to_thread(recorder.entered.wait, 5)
    return first


def test_requests_queued_while_busy_run_as_one_batch() -> None:
    async def scenario() -> None:
        recorder, prepare = Recorder(), Prepares()
        batcher = _batcher(recorder, prepare)
        batcher.start()
        first = await _hold_worker(batcher, recorder)
        rest = [asyncio.ensure_future(batcher.submit(k, 1, later())) for k in range(1, 6)]
        await asyncio.sleep(0.05)
        recorder.gate.set()
        assert await first == 0
        assert await asyncio.gather(*rest) == [10, 20, 30, 40, 50]  # each gets its own result
        assert recorder.batches == [[0], [1, 2, 3, 4, 5]]
        assert prepare.calls == recorder.batches  # one prepare (Redis read) per batch
        await batcher.stop()

    asyncio.run(scenario())


def test_candidate_budget_splits_batches() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder, max_batch_candidates=5)
        batcher.start()
        first = await _hold_worker(batcher, recorder)
        sizes = {1: 3, 2: 2, 3: 4, 4: 9}  # 9 exceeds the budget: it runs alone
        rest = [asyncio.ensure_future(batcher.submit(k, n, later())) for k, n in sizes.items()]
        await asyncio.sleep(0.05)
        recorder.gate.set()
        await asyncio.gather(first, *rest)
        assert recorder.batches == [[0], [1, 2], [3], [4]]
        await batcher.stop()

    asyncio.run(scenario())


def test_full_queue_sheds_at_once_and_admitted_requests_succeed() -> None:
    async def scenario() -> None:
        recorder, observer = Recorder(), Counts()
        batcher = _batcher(recorder, observer=observer, max_queue_requests=3, shed_status=503)
        batcher.start()
        first = await _hold_worker(batcher, recorder)
        admitted = [asyncio.ensure_future(batcher.submit(k, 1, later())) for k in range(1, 4)]
        await asyncio.sleep(0.01)
        for k in range(10):
            start = time.perf_counter()
            with pytest.raises(QueueFull) as refused:
                await batcher.submit(100 + k, 1, later())
            assert time.perf_counter() - start < 0.05
            assert (refused.value.status, refused.value.retry_after_s) == (503, 1)
        recorder.gate.set()
        assert await asyncio.gather(first, *admitted) == [0, 10, 20, 30]
        assert observer.rejects == ["queue_full"] * 10
        assert all(x < 100 for batch in recorder.batches for x in batch)
        await batcher.stop()

    asyncio.run(scenario())


def test_deadline_passing_in_the_queue_gives_504_without_inference() -> None:
    async def scenario() -> None:
        recorder, observer = Recorder(), Counts()
        batcher = _batcher(recorder, observer=observer)
        batcher.start()
        first = await _hold_worker(batcher, recorder)
        start = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(7, 1, time.monotonic() + 0.05)
        assert 0.04 < time.perf_counter() - start < 0.5
        recorder.gate.set()
        await first
        after = await batcher.submit(8, 1, later())  # the worker moves on to live requests
        assert after == 80
        assert recorder.batches == [[0], [8]]  # 7 was never run
        assert observer.rejects == ["deadline"]
        await batcher.stop()

    asyncio.run(scenario())


def test_deadline_passing_during_prepare_skips_inference() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder, Prepares(delay_s=0.1))
        batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(1, 1, time.monotonic() + 0.03)
        await asyncio.sleep(0.1)  # let the dispatcher finish its prepare
        assert recorder.batches == []
        await batcher.stop()

    asyncio.run(scenario())


def test_a_run_past_the_deadline_gives_504_at_the_deadline() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder)
        batcher.start()
        recorder.gate.clear()
        start = time.perf_counter()
        request = asyncio.ensure_future(batcher.submit(1, 1, time.monotonic() + 0.05))
        with pytest.raises(DeadlineExceeded):
            await request
        assert time.perf_counter() - start < 0.5  # not held until the run ends
        recorder.gate.set()
        await batcher.stop()

    asyncio.run(scenario())


def test_a_run_that_returned_before_the_deadline_keeps_its_answer_on_a_late_loop() -> None:
    """The worker finishes well before the deadline while the event loop is blocked until after
    it (time.sleep on the loop): the deadline timer and the answer come due in the same pass."""

    async def scenario() -> int:
        recorder = Recorder()
        batcher = _batcher(recorder)
        batcher.start()
        recorder.gate.clear()
        request = asyncio.ensure_future(batcher.submit(3, 1, time.monotonic() + 0.2))
        await asyncio.to_thread(recorder.entered.wait, 5)
        recorder.gate.set()
        time.sleep(0.4)  # the loop runs late, past the deadline
        answer = await request
        await batcher.stop()
        return answer

    assert asyncio.run(scenario()) == 30


def test_a_cancelled_dispatch_does_not_leave_its_requests_waiting() -> None:
    """The guard behind the spared timer above: a dispatch cancelled mid-run (the loop being
    torn down) settles its requests itself. The dispatch task is reached through a private
    attribute: no public call cancels one."""

    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder)
        batcher.start()
        recorder.gate.clear()
        request = asyncio.ensure_future(batcher.submit(2, 1, later()))
        await asyncio.to_thread(recorder.entered.wait, 5)
        for dispatch in list(batcher._dispatches):
            dispatch.cancel()
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(request, 1)  # not the 5 s deadline
        recorder.gate.set()
        await batcher.stop()

    asyncio.run(scenario())


def _passes() -> tuple[list[int], asyncio.Task[None]]:
    """A counter of the event loop's passes: a task that steps once per pass."""
    count = [0]

    async def tick() -> None:
        while True:
            count[0] += 1
            await asyncio.sleep(0)

    return count, asyncio.ensure_future(tick())


def test_a_batch_is_answered_a_few_requests_per_pass_of_the_loop() -> None:
    """A batch's answers go back `ANSWERS_PER_PASS` at a time with a pass of the loop between
    (what a request arriving meanwhile needs to be read), not all in one pass."""

    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder)
        batcher.start()
        first = await _hold_worker(batcher, recorder)
        count, ticker = _passes()
        seen: dict[int, int] = {}

        async def request(k: int) -> None:
            assert await batcher.submit(k, 1, later()) == 10 * k
            seen[k] = count[0]

        rest = [asyncio.ensure_future(request(k)) for k in range(1, 11)]
        await asyncio.sleep(0.05)
        recorder.gate.set()
        await first
        await asyncio.gather(*rest)
        ticker.cancel()
        assert recorder.batches == [[0], list(range(1, 11))]
        per_pass = [
            sorted(k for k, n in seen.items() if n == p) for p in sorted(set(seen.values()))
        ]
        assert per_pass == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]  # in order, 4 per pass
        await batcher.stop()

    asyncio.run(scenario())


def test_a_dispatch_cancelled_while_answering_answers_the_rest_at_once() -> None:
    """Cancelled between two passes of its answers (the loop's teardown), a dispatch settles
    the rest with their results, not with errors, and leaves none waiting."""

    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder)
        batcher.start()
        first = await _hold_worker(batcher, recorder)
        rest = [asyncio.ensure_future(batcher.submit(k, 1, later())) for k in range(1, 11)]
        await asyncio.sleep(0.05)
        recorder.gate.set()
        await first
        while not any(r.done() for r in rest):  # the first pass of the batch's answers is out
            await asyncio.sleep(0)
        assert not all(r.done() for r in rest)
        for dispatch in list(batcher._dispatches):
            dispatch.cancel()
        assert await asyncio.wait_for(asyncio.gather(*rest), 1) == [10 * k for k in range(1, 11)]
        await batcher.stop()

    asyncio.run(scenario())


def test_already_expired_request_is_refused_at_admission() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder)
        batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(1, 1, time.monotonic() - 0.001)
        await asyncio.sleep(0.01)
        assert recorder.batches == []
        await batcher.stop()

    asyncio.run(scenario())


def test_inference_error_reaches_every_request_of_the_batch() -> None:
    class Boom(RuntimeError):
        pass

    def infer(batch: list[int]) -> list[int]:
        if 3 in batch:
            raise Boom("bad batch")
        return batch

    async def scenario() -> None:
        gate = asyncio.Event()

        async def prepare(batch: list[int]) -> list[int]:
            await gate.wait()
            return batch

        batcher: Batcher[int, int, int] = Batcher("m", infer, prepare)
        batcher.start()
        futures = [asyncio.ensure_future(batcher.submit(k, 1, later())) for k in (1, 2, 3)]
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert [type(r) for r in results] == [Boom, Boom, Boom]
        assert await batcher.submit(4, 1, later()) == 4  # the batcher itself survives
        await batcher.stop()

    asyncio.run(scenario())


def test_wrong_result_count_is_an_error_not_a_misassignment() -> None:
    async def scenario() -> None:
        batcher: Batcher[int, int, int] = Batcher("m", lambda b: b[:-1], Prepares())
        batcher.start()
        with pytest.raises(RuntimeError, match="results"):
            await batcher.submit(1, 1, later())
        await batcher.stop()

    asyncio.run(scenario())


def test_draining_refuses_new_work_and_finishes_queued_work() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder)
        batcher.start()
        first = await _hold_worker(batcher, recorder)
        queued = asyncio.ensure_future(batcher.submit(1, 1, later()))
        await asyncio.sleep(0.01)
        batcher.begin_drain()
        with pytest.raises(Draining) as refused:
            await batcher.submit(2, 1, later())
        assert refused.value.status == 503
        stopping = asyncio.ensure_future(batcher.stop(timeout_s=5))
        await asyncio.sleep(0.05)
        recorder.gate.set()
        assert await asyncio.gather(first, queued) == [0, 10]
        await stopping
        assert recorder.batches == [[0], [1]]

    asyncio.run(scenario())


def test_cancelled_caller_is_not_run() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder)
        batcher.start()
        first = await _hold_worker(batcher, recorder)
        abandoned = asyncio.ensure_future(batcher.submit(5, 1, later()))
        await asyncio.sleep(0.01)
        abandoned.cancel()  # e.g. the HTTP client disconnected
        await asyncio.sleep(0.01)
        recorder.gate.set()
        await first
        assert await batcher.submit(6, 1, later()) == 60
        assert recorder.batches == [[0], [6]]
        await batcher.stop()

    asyncio.run(scenario())


def test_inference_runs_off_the_event_loop() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = _batcher(recorder)
        batcher.start()
        first = await _hold_worker(batcher, recorder)
        # The worker is blocked in infer(); the loop still runs other coroutines promptly.
        start = time.perf_counter()
        await asyncio.sleep(0.01)
        assert time.perf_counter() - start < 0.2
        recorder.gate.set()
        await first
        await batcher.stop()

    asyncio.run(scenario())


def test_an_exception_result_fails_only_its_own_request() -> None:
    def infer(batch: list[int]) -> list[int | Exception]:
        return [ValueError(f"bad {x}") if x == 2 else x for x in batch]

    async def scenario() -> None:
        gate = asyncio.Event()

        async def prepare(batch: list[int]) -> list[int]:
            await gate.wait()
            return batch

        batcher: Batcher[int, int, int] = Batcher("m", infer, prepare)
        batcher.start()
        futures = [asyncio.ensure_future(batcher.submit(k, 1, later())) for k in (1, 2, 3)]
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[0] == 1 and results[2] == 3
        assert isinstance(results[1], ValueError) and str(results[1]) == "bad 2"
        await batcher.stop()

    asyncio.run(scenario())
