"""Batching, overload, deadlines and failure isolation with real models and real ORT sessions.

A gate around a model's real `run()` (the deterministic-blocker pattern of Ray Serve's
backpressure tests) holds the worker, so each test knows exactly what runs and what queues.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
from service_support import (
    CANDIDATES,
    HISTORY,
    AppFactory,
    Gate,
    events_body,
    expected_scores,
    hold,
    make_app,
    reference,
    run,
    running,
    score_body,
    until,
)

from runtime.loader import LoadedModel

__all__ = ["make_app", "reference"]  # fixtures used by the tests below


def test_queued_requests_are_batched_and_split_back_correctly(
    make_app: AppFactory, reference: Callable[[str], LoadedModel]
) -> None:
    slates = {
        f"user{k}": [(f"i{(k * 7 + j) % 80}", f"c{j % 8}") for j in range(1 + k % 5)]
        for k in range(12)
    }

    async def scenario() -> None:
        app = make_app()
        async with running(app) as client:
            gate = hold(app)
            first = asyncio.ensure_future(client.post("/v1/score", json=score_body()))
            await asyncio.to_thread(gate.entered.wait, 10)
            queued = [
                asyncio.ensure_future(
                    client.post(
                        "/v1/score",
                        json=score_body(
                            user, cands, history=[{"item_id": "i1", "category_id": "c1"}]
                        ),
                    )
                )
                for user, cands in slates.items()
            ]
            await until(lambda: app.state.engine.queue_depth("sarn") == len(slates))
            gate.opened.set()
            answers = [r.json() for r in await asyncio.gather(first, *queued)]
        assert gate.calls == 2  # the first alone, then every queued request in one run
        sarn = reference("sarn")
        for (user, cands), answer in zip(slates.items(), answers[1:], strict=True):
            expected = expected_scores(sarn, [("i1", "c1")], cands, user)
            np.testing.assert_allclose(answer["scores"], expected, rtol=0, atol=1e-6)

    run(scenario())


def test_overload_is_shed_fast_and_admitted_requests_succeed(make_app: AppFactory) -> None:
    async def scenario() -> None:
        app = make_app(queue_max_requests=3)
        async with running(app) as client:
            gate = hold(app)
            first = asyncio.ensure_future(client.post("/v1/score", json=score_body()))
            await asyncio.to_thread(gate.entered.wait, 10)
            admitted = [
                asyncio.ensure_future(client.post("/v1/score", json=score_body(f"a{k}")))
                for k in range(3)
            ]
            await until(lambda: app.state.engine.queue_depth("sarn") == 3)
            refused = []
            for k in range(10):
                start = time.perf_counter()
                refused.append(await client.post("/v1/score", json=score_body(f"x{k}")))
                assert time.perf_counter() - start < 0.2
            health = [await client.get(p) for p in ("/healthz", "/readyz", "/metrics")]
            gate.opened.set()
            done = await asyncio.gather(first, *admitted)
            metrics = (await client.get("/metrics")).text
        assert [r.status_code for r in refused] == [429] * 10
        assert all(r.headers["Retry-After"] == "1" for r in refused)
        assert refused[0].json()["error"]["code"] == "queue_full"
        assert [r.status_code for r in health] == [200, 200, 200]  # probes are never shed
        assert [r.status_code for r in done] == [200] * 4
        assert gate.calls == 2
        assert 'ctr_requests_rejected_total{reason="queue_full"} 10.0' in metrics

    run(scenario())


def test_expired_deadline_gives_504_without_inference(make_app: AppFactory) -> None:
    async def scenario() -> None:
        app = make_app()
        async with running(app) as client:
            gate = hold(app)
            first = asyncio.ensure_future(client.post("/v1/score", json=score_body()))
            await asyncio.to_thread(gate.entered.wait, 10)
            start = time.perf_counter()
            late = await client.post(
                "/v1/score", json=score_body("late"), headers={"X-Request-Timeout-Ms": "50"}
            )
            elapsed = time.perf_counter() - start
            gate.opened.set()
            assert (await first).status_code == 200
            calls_before = gate.calls
            assert (await client.post("/v1/score", json=score_body("next"))).status_code == 200
            metrics = (await client.get("/metrics")).text
        assert late.status_code == 504
        assert late.json()["error"]["code"] == "deadline_exceeded"
        assert 0.04 < elapsed < 0.5
        assert calls_before == 1  # the expired request never reached ONNX Runtime
        assert gate.calls == 2  # only "next" ran after it
        assert 'ctr_requests_rejected_total{reason="deadline"} 1.0' in metrics

    run(scenario())


def test_a_request_that_breaks_its_batch_fails_alone(
    make_app: AppFactory, reference: Callable[[str], LoadedModel]
) -> None:
    """A batch-level failure is retried request by request: only the culprit gets a 500."""
    poison = reference("sarn").vocabs["item"].index("i66")
    assert poison > 1  # a trained item, not PAD/OOV (which other slates contain)

    async def scenario() -> None:
        app = make_app()
        async with running(app) as client:
            gate = hold(app)
            real_run = gate._run

            def fragile(feeds: dict[str, np.ndarray]) -> np.ndarray:
                if poison in feeds["cand_items"]:
                    raise RuntimeError("/secret/path/model.onnx: kernel failure")
                return real_run(feeds)

            gate._run = fragile  # type: ignore[method-assign]
            first = asyncio.ensure_future(client.post("/v1/score", json=score_body()))
            await asyncio.to_thread(gate.entered.wait, 10)
            bad = [("i66", "c2"), ("i1", "c1")]
            slates = {"ok1": CANDIDATES, "bad": bad, "ok2": CANDIDATES[:2]}
            queued = [
                asyncio.ensure_future(client.post("/v1/score", json=score_body(user, cands)))
                for user, cands in slates.items()
            ]
            await until(lambda: app.state.engine.queue_depth("sarn") == 3)
            gate.opened.set()
            answers = await asyncio.gather(first, *queued)
        assert [a.status_code for a in answers] == [200, 200, 500, 200]
        assert answers[2].json()["error"]["code"] == "internal_error"
        assert "secret" not in answers[2].text
        sarn = reference("sarn")
        assert answers[1].json()["scores"] == expected_scores(sarn, [], CANDIDATES, "ok1")
        assert answers[3].json()["scores"] == expected_scores(sarn, [], CANDIDATES[:2], "ok2")

    run(scenario())


def test_naive_baseline_scores_the_same_with_one_call_per_request(
    make_app: AppFactory, reference: Callable[[str], LoadedModel]
) -> None:
    """The benchmark's naive variant: same answers, no batching, user side per candidate."""

    async def scenario() -> None:
        app = make_app(naive=True)
        async with running(app) as client:
            gate = Gate(app.state.engine.registry.models["sarn"])
            gate.opened.set()
            await client.post("/v1/events", json=events_body("u1", HISTORY))
            answers = await asyncio.gather(
                *(client.post("/v1/score", json=score_body()) for _ in range(5))
            )
            feeds_users: list[int] = []
            real_run = gate._run

            def spy(feeds: dict[str, np.ndarray]) -> np.ndarray:
                feeds_users.append(len(feeds["hist_items"]))
                return real_run(feeds)

            gate._run = spy  # type: ignore[method-assign]
            await client.post("/v1/score", json=score_body())
        expected = expected_scores(reference("sarn"), HISTORY, CANDIDATES)
        for answer in answers:
            np.testing.assert_allclose(answer.json()["scores"], expected, rtol=0, atol=1e-6)
        assert gate.calls == 6  # one ORT call per request, never merged
        assert feeds_users == [len(CANDIDATES)]  # the history is repeated once per candidate

    run(scenario())
