"""The HTTP layer alone, over a fake engine: what each route hands the `Engine` and what it
makes of the answer or the error.

The fake (tests/engine_support.py) stands in for `ScoringEngine` on purpose (issue 15: the
routes must talk to the `service.contracts.Engine` methods only): a route that reached into
engine parts would fail here with an AttributeError. The real engine behind the same routes is
covered by test_service_api.py, test_service_scoring.py and the end-to-end tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from engine_support import FakeEngine
from service_support import run

from service.contracts import (
    Event,
    ModelUnavailable,
    ReloadFailed,
    ScoreResult,
    ScoringRequest,
    StoreUnavailable,
    UnknownModel,
)
from service.http.api import build_app
from service.metrics import ServiceMetrics
from service.scoring.batcher import DeadlineExceeded, QueueFull
from service.settings import Settings


async def _client(engine: FakeEngine, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    async def open_engine(_: Settings, __: ServiceMetrics, ___: object) -> FakeEngine:
        return engine

    app = build_app(Settings(**settings), open_engine=open_engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
            yield client


def _score_body(**extra: Any) -> dict[str, Any]:
    candidates = [{"item_id": "i9", "category_id": "c3"}, {"item_id": "i7", "category_id": "c1"}]
    return {"user_id": "u42", "candidates": candidates, **extra}


def test_a_score_body_becomes_one_scoring_request_and_the_result_the_response() -> None:
    engine = FakeEngine()

    async def go() -> None:
        async for client in _client(engine):
            sent = time.monotonic()
            body = _score_body(
                history=[{"item_id": "i1", "category_id": "c1"}],
                context={"device": "ios"},
                model="sarn",
            )
            answer = await client.post(
                "/v1/score",
                json=body,
                headers={"X-Request-ID": "rid-7", "X-Request-Timeout-Ms": "250"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == {
                "request_id": "rid-7",
                "model": "sarn",
                "version": "3",
                "variant": "treatment",
                "scores": [0.25, 0.5],
                "history_source": "redis",
            }
            ((name, request),) = engine.calls[:1]
            assert name == "score" and isinstance(request, ScoringRequest)
            assert request.user_id == "u42" and request.request_id == "rid-7"
            assert list(request.candidates) == [("i9", "c3"), ("i7", "c1")]
            assert list(request.history or []) == [("i1", "c1")]
            assert dict(request.context) == {"device": "ios"} and request.model == "sarn"
            assert sent + 0.2 < request.deadline < time.monotonic() + 0.3

    run(go())


def test_no_history_in_the_body_asks_the_engine_for_the_stored_one() -> None:
    engine = FakeEngine()
    engine.score_result = ScoreResult(
        "mt", 1, "default", [0.5], "inline", None, conversion_scores=[0.2], ctcvr_scores=[0.1]
    )

    async def go() -> None:
        async for client in _client(engine, request_timeout_ms=80.0):
            answer = await client.post("/v1/score", json=_score_body(request_id="client-1"))
            body = answer.json()
            assert body["conversion_scores"] == [0.2] and body["ctcvr_scores"] == [0.1]
            request = engine.calls[0][1]
            assert request.history is None and request.model is None
            assert request.request_id == "client-1"
            assert math.isfinite(request.deadline) and request.deadline < time.monotonic() + 0.08

    run(go())


def test_the_shadow_callback_is_run_once_as_a_background_task() -> None:
    engine = FakeEngine()
    calls: list[str] = []
    engine.score_result = ScoreResult(
        "sarn", 3, "t", [0.1], "redis", None, lambda: calls.append("x")
    )

    async def go() -> None:
        async for client in _client(engine):
            answer = await client.post("/v1/score", json=_score_body())
            assert answer.status_code == 200 and answer.json()["scores"] == [0.1]
            assert calls == ["x"]
            engine.score_result = ScoreResult("sarn", 3, "t", [0.1], "redis")
            await client.post("/v1/score", json=_score_body())
            assert calls == ["x"]

    run(go())


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (UnknownModel("nope"), 404, "unknown_model"),
        (ModelUnavailable("sarn"), 503, "model_unavailable"),
        (QueueFull(429, 2), 429, "queue_full"),
        (DeadlineExceeded(), 504, "deadline_exceeded"),
    ],
)
def test_engine_errors_on_score_map_to_statuses(error: Exception, status: int, code: str) -> None:
    engine = FakeEngine()
    engine.error = error

    async def go() -> None:
        async for client in _client(engine):
            answer = await client.post("/v1/score", json=_score_body())
            assert answer.status_code == status
            assert answer.json()["error"]["code"] == code
            if status == 429:
                assert answer.headers["Retry-After"] == "2"

    run(go())


def test_events_reach_the_engine_as_clicks_with_the_others_counted() -> None:
    engine = FakeEngine()
    events = [
        {"user_id": "u1", "item_id": "i1", "category_id": "c1", "ts": 100, "event_id": "e1"},
        {"user_id": "u1", "item_id": "i2", "category_id": "c2", "ts": 101, "type": "view"},
        {"user_id": "u2", "item_id": "i3", "category_id": "c3", "ts": 102, "type": "click"},
    ]

    async def go() -> None:
        async for client in _client(engine):
            answer = await client.post("/v1/events", json={"events": events})
            assert answer.status_code == 202
            assert answer.json() == {"accepted": 2, "duplicates": 0, "ignored": 1}
            ((name, (passed, ignored)),) = engine.calls
            assert name == "ingest" and ignored == 1
            assert passed == [Event("u1", "i1", "c1", 100.0, "e1"), Event("u2", "i3", "c3", 102.0)]
            engine.error = StoreUnavailable("down")
            refused = await client.post("/v1/events", json={"events": events[:1]})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"

    run(go())


def test_history_erase_models_readiness_and_reloads_are_engine_calls() -> None:
    engine = FakeEngine()

    async def go() -> None:
        async for client in _client(engine):
            history = await client.get("/v1/users/u9/history")
            assert history.json() == {
                "user_id": "u9",
                "items": [
                    {"item_id": "i1", "category_id": "c1", "ts": 10.0},
                    {"item_id": "i2", "category_id": "c2", "ts": 20.0},
                ],
            }
            assert (await client.delete("/v1/users/u9/history")).status_code == 204
            models = (await client.get("/v1/models")).json()
            assert models["reload_poll_s"] == 7.0 and models["models"][0]["status"] == "failed"
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["reasons"] == ["model sarn failed to load"]
            reloaded = await client.post("/v1/admin/models/sarn/reload", json={"version": 4.0})
            assert reloaded.json()["previous_version"] == "3"  # 4.0 is the integer 4
            fraction = await client.post("/v1/admin/models/sarn/reload", json={"version": 4.5})
            assert fraction.status_code == 422
            routed = await client.post("/v1/admin/routing/reload")
            assert routed.json() == {"sha256": "ab" * 32, "changed": True, "experiments": 2}
            engine.error = ReloadFailed(503, "model_load_failed", "sarn v5 failed at warmup")
            failed = await client.post("/v1/admin/models/sarn/reload", json={"version": 5})
            assert failed.status_code == 503
            assert failed.json()["error"]["code"] == "model_load_failed"
        names = [name for name, _ in engine.calls]
        assert names == [
            "history",
            "erase",
            "reload_model",
            "reload_routing",
            "reload_model",
            "stop",
        ]
        assert engine.calls[2][1] == ("sarn", 4) and engine.calls[1][1] == "u9"

    run(go())


def test_a_score_no_model_could_answer_in_time_is_refused_before_its_body_is_read() -> None:
    engine = FakeEngine()
    engine.admitting = False

    async def go() -> None:
        async for client in _client(engine, request_timeout_ms=80.0, retry_after_s=2):
            # Not even valid JSON: the refusal comes before the body is parsed.
            answer = await client.post(
                "/v1/score",
                content=b"{not json",
                headers={"content-type": "application/json", "X-Request-Timeout-Ms": "40"},
            )
            assert answer.status_code == 429 and answer.headers["Retry-After"] == "2"
            assert answer.json()["error"]["code"] == "overloaded"
            assert "deadline" in answer.json()["error"]["message"]
            (deadline,) = engine.admits_asked
            assert deadline < time.monotonic() + 0.04  # the client's 40 ms, from arrival
            assert engine.calls == []  # never scored
            assert (await client.get("/healthz")).status_code == 200  # only scoring sheds
            events = {"events": [{"user_id": "u", "item_id": "i", "category_id": "c", "ts": 1}]}
            assert (await client.post("/v1/events", json=events)).status_code == 202
            # Counted under the scoring route, where the SLO rules look for its 429s.
            text = (await client.get("/metrics")).text
            refused = 'ctr_request_duration_seconds_count{endpoint="/v1/score",model=""'
            assert f'{refused},status="429",variant=""}} 1.0' in text
            assert 'endpoint="unmatched"' not in text

    run(go())


def test_a_deadline_below_the_floor_is_a_client_error() -> None:
    engine = FakeEngine()

    async def go() -> None:
        async for client in _client(engine):
            too_short = await client.post(
                "/v1/score", json=_score_body(), headers={"X-Request-Timeout-Ms": "4"}
            )
            assert too_short.status_code == 422
            assert too_short.json()["error"]["details"][0]["loc"] == [
                "header",
                "x-request-timeout-ms",
            ]
            floor = await client.post(
                "/v1/score", json=_score_body(), headers={"X-Request-Timeout-Ms": "5"}
            )
            assert floor.status_code == 200

    run(go())
