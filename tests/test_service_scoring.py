"""Scoring through the app with real exported models, a real redis-server and real ORT sessions.

The reference for every score is the torch-free loader (`runtime.loader.open_model(...)
.score`), whose output the export step has checked against PyTorch. Requests run in-process
(httpx over ASGI, the app's lifespan running); see `service_support`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from service_support import (
    CANDIDATES,
    HISTORY,
    AppFactory,
    events_body,
    expected_scores,
    make_app,
    reference,
    run,
    run_value,
    running,
    score_body,
)

from runtime.loader import LoadedModel
from runtime.repository import latest_version, model_dir
from service.settings import Settings
from service.store.embedded_redis import RedisServer

__all__ = ["make_app", "reference"]  # fixtures used by the tests below


def test_stored_and_inline_history_score_exactly_like_the_loader(
    make_app: AppFactory, reference: Callable[[str], LoadedModel]
) -> None:
    async def scenario() -> None:
        async with running(make_app()) as client:
            posted = await client.post("/v1/events", json=events_body("u1", HISTORY))
            assert posted.status_code == 202
            stored = (await client.post("/v1/score", json=score_body(request_id="r-1"))).json()
            inline_history = [{"item_id": i, "category_id": c} for i, c in HISTORY]
            inline_body = score_body(history=inline_history)
            inline = (await client.post("/v1/score", json=inline_body)).json()
            fresh = (await client.post("/v1/score", json=score_body(user="new-user"))).json()
        sarn = reference("sarn")
        assert sarn.history_len < len(HISTORY)  # truncation to the newest items is exercised
        assert stored["scores"] == expected_scores(sarn, HISTORY, CANDIDATES)
        assert inline["scores"] == stored["scores"]
        assert fresh["scores"] == expected_scores(sarn, [], CANDIDATES, "new-user")
        assert fresh["scores"] != stored["scores"]  # the history does change the scores
        assert (stored["history_source"], inline["history_source"]) == ("redis", "inline")
        assert stored["request_id"] == "r-1"
        assert (stored["model"], stored["version"], stored["variant"]) == (
            "sarn",
            str(sarn.version),
            "default",
        )

    run(scenario())


def test_a_pinned_slate_model_scores_like_its_loader(
    make_app: AppFactory, reference: Callable[[str], LoadedModel]
) -> None:
    async def scenario() -> None:
        async with running(make_app()) as client:
            await client.post("/v1/events", json=events_body("u2", HISTORY[:5]))
            answer = (await client.post("/v1/score", json=score_body("u2", model="ncm"))).json()
            models = (await client.get("/v1/models")).json()
            unknown = await client.post("/v1/score", json=score_body(model="nosuchmodel"))
        ncm = reference("ncm")
        assert answer["model"] == "ncm"
        assert answer["scores"] == expected_scores(ncm, HISTORY[:5], CANDIDATES, "u2")
        assert models["default_model"] == "sarn"
        by_name = {m["name"]: m for m in models["models"]}
        assert set(by_name) == {"sarn", "ncm", "gru-mt"}
        assert by_name["ncm"]["kind"] == "slate"
        assert by_name["sarn"]["provider"] == reference("sarn").providers[0]
        assert by_name["sarn"]["versions"][0]["layout"] == reference("sarn").layout  # cpu-fused
        assert by_name["ncm"]["versions"][0]["layout"] == "slate"
        assert unknown.status_code == 404

    run(scenario())


def test_hung_redis_falls_back_within_the_deadline_and_recovers(
    make_app: AppFactory, reference: Callable[[str], LoadedModel], redis_server: RedisServer
) -> None:
    async def scenario() -> None:
        app = make_app(redis_read_timeout_ms=30.0)
        async with running(app) as client:
            await client.post("/v1/events", json=events_body("u1", HISTORY))
            os.kill(redis_server.pid, signal.SIGSTOP)
            try:
                start = time.perf_counter()
                degraded = await client.post(
                    "/v1/score", json=score_body(), headers={"X-Request-Timeout-Ms": "1000"}
                )
                elapsed = time.perf_counter() - start
            finally:
                os.kill(redis_server.pid, signal.SIGCONT)
            recovered = (await client.post("/v1/score", json=score_body())).json()
            metrics = (await client.get("/metrics")).text
            ready = await client.get("/readyz")
        sarn = reference("sarn")
        assert degraded.status_code == 200
        assert degraded.json()["history_source"] == "fallback"
        assert degraded.json()["scores"] == expected_scores(sarn, [], CANDIDATES)
        assert elapsed < 1.0
        assert recovered["history_source"] == "redis"
        assert recovered["scores"] == expected_scores(sarn, HISTORY, CANDIDATES)
        assert 'ctr_history_source_total{source="fallback"} 1.0' in metrics
        assert 'ctr_history_source_total{source="redis"} 1.0' in metrics
        assert ready.status_code == 200
        assert "\nctr_ready 1.0\n" in metrics

    run(scenario())


def test_the_breaker_gauge_follows_a_redis_outage(
    make_app: AppFactory, redis_server: RedisServer
) -> None:
    """`ctr_redis_breaker_open` is what the Redis alert reads: 1 once the breaker skips Redis,
    0 again after the first read that succeeds."""

    async def gauge(client: Any) -> str:
        text = (await client.get("/metrics")).text
        return str(text.split("\nctr_redis_breaker_open ")[1].split("\n")[0])

    async def scenario() -> None:
        app = make_app(redis_read_timeout_ms=20.0, breaker_failures=2, breaker_reset_s=0.2)
        async with running(app) as client:
            await client.post("/v1/score", json=score_body())
            healthy = await gauge(client)
            os.kill(redis_server.pid, signal.SIGSTOP)
            try:
                sources = [
                    (await client.post("/v1/score", json=score_body())).json()["history_source"]
                    for _ in range(3)
                ]
                during = await gauge(client)
            finally:
                os.kill(redis_server.pid, signal.SIGCONT)
            await asyncio.sleep(0.3)  # past breaker_reset_s: the next read is the trial
            recovered = (await client.post("/v1/score", json=score_body())).json()
            after = await gauge(client)
        assert sources == ["fallback"] * 3
        assert (healthy, during, after) == ("0.0", "1.0", "0.0")
        assert recovered["history_source"] == "redis"

    run(scenario())


def test_metrics_cover_the_scoring_path(make_app: AppFactory) -> None:
    async def scenario() -> None:
        async with running(make_app()) as client:
            await client.post("/v1/score", json=score_body())
            text = (await client.get("/metrics")).text
        for histogram in (
            "ctr_request_duration_seconds",
            "ctr_queue_wait_seconds",
            "ctr_inference_duration_seconds",
            "ctr_batch_candidates",
            "ctr_store_duration_seconds",
        ):
            assert f"# TYPE {histogram} histogram" in text
        assert 'ctr_batch_candidates_sum{model="sarn"} 4.0' in text
        assert 'endpoint="/v1/score",le="+Inf",model="sarn",status="200",variant="default"' in text
        assert 'ctr_model_info{model="sarn",provider="' in text

    run(scenario())


def test_every_stage_of_a_scored_request_is_timed(make_app: AppFactory) -> None:
    """Two requests with a stored history (one read each): each stage is observed once per
    request; the stages of one request add up to no more than its whole duration."""

    async def scenario() -> tuple[dict[str, tuple[float, float]], float]:
        async with running(make_app()) as client:
            await client.post("/v1/events", json=events_body("staged", HISTORY))
            for _ in range(2):
                answer = await client.post("/v1/score", json=score_body(user="staged"))
                assert answer.json()["history_source"] == "redis"
            text = (await client.get("/metrics")).text
        stages = {}
        for stage in ("parse", "queue", "history", "encode", "infer", "respond"):
            count = _sample(text, "ctr_stage_duration_seconds_count", stage=stage)
            stages[stage] = (count, _sample(text, "ctr_stage_duration_seconds_sum", stage=stage))
        total = _sample(text, "ctr_request_duration_seconds_sum", endpoint="/v1/score")
        return stages, total

    stages, total = run_value(scenario())
    assert {stage: count for stage, (count, _) in stages.items()} == dict.fromkeys(stages, 2.0)
    assert 0 < sum(seconds for _, seconds in stages.values()) <= total


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample `name{labels...}` in a Prometheus text page (summed over any
    other labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_gpu_requirement_decides_readiness(make_app: AppFactory) -> None:
    async def scenario() -> None:
        async with running(make_app(require_gpu=True)) as client:
            ready = await client.get("/readyz")
            providers = [m["provider"] for m in (await client.get("/v1/models")).json()["models"]]
        on_gpu = all(p == "CUDAExecutionProvider" for p in providers)
        assert ready.status_code == (200 if on_gpu else 503)
        if not on_gpu:
            assert "model sarn is not on the GPU" in ready.json()["reasons"]

    run(scenario())


def test_a_corrupt_model_is_refused_and_the_others_serve(
    make_app: AppFactory, service_model_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(service_model_repo, repo)
    onnx_file = model_dir(repo, "sarn", latest_version(repo, "sarn")) / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-100])

    async def scenario() -> None:
        async with running(make_app(repo=repo)) as client:
            ready = await client.get("/readyz")
            models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
            sarn = await client.post("/v1/score", json=score_body())
            ncm = await client.post("/v1/score", json=score_body(model="ncm"))
            alive = await client.get("/healthz")
            metrics = (await client.get("/metrics")).text
        assert ready.status_code == 503
        assert "\nctr_ready 0.0\n" in metrics
        assert 'ctr_model_load_failed{model="sarn"} 1.0' in metrics
        assert 'ctr_model_load_failed{model="ncm"} 0.0' in metrics
        assert "model sarn failed to load" in ready.json()["reasons"]
        assert models["sarn"]["status"] == "failed"
        assert sarn.status_code == 503
        assert str(repo) not in sarn.text  # no paths in error bodies
        assert ncm.status_code == 200
        assert alive.status_code == 200

    run(scenario())


def test_a_history_cap_below_what_a_model_reads_is_warned_about_at_load(
    make_app: AppFactory, reference: Callable[[str], LoadedModel], caplog: pytest.LogCaptureFixture
) -> None:
    sarn = reference("sarn")
    cap = sarn.history_len - 1

    async def scenario() -> None:
        async with running(make_app(history_cap=cap)) as client:
            assert (await client.get("/readyz")).status_code == 200

    with caplog.at_level(logging.WARNING, logger="service.engine"):
        run(scenario())
    warned = [r.getMessage() for r in caplog.records if "CTR_HISTORY_CAP" in r.getMessage()]
    assert any(f"sarn v{sarn.version} reads {sarn.history_len}" in w for w in warned), warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="service.engine"):
        run(_serve_once(make_app(history_cap=200)))
    assert not [r for r in caplog.records if "CTR_HISTORY_CAP" in r.getMessage()]


async def _serve_once(app: Any) -> None:
    async with running(app) as client:
        await client.get("/readyz")


def test_the_renamed_inline_history_limit_refuses_its_old_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CTR_MAX_HISTORY", "50")
    with pytest.raises(ValueError, match="CTR_MAX_HISTORY was renamed CTR_MAX_INLINE_HISTORY"):
        Settings()
    monkeypatch.delenv("CTR_MAX_HISTORY")
    monkeypatch.setenv("CTR_MAX_INLINE_HISTORY", "7")
    assert Settings().max_inline_history == 7


def test_a_corrupt_newest_version_leaves_the_previous_one_serving(
    make_app: AppFactory,
    service_model_repo: Path,
    reference: Callable[[str], LoadedModel],
    tmp_path: Path,
) -> None:
    """A scale-up during a bad publish: the new replica serves the highest version that
    verifies and says which one it refused; strict mode keeps the old rule (not ready)."""
    repo = tmp_path / "repo"
    shutil.copytree(service_model_repo, repo)
    good = latest_version(repo, "sarn")
    bad = model_dir(repo, "sarn", good + 1)
    shutil.copytree(model_dir(repo, "sarn", good), bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "version": good + 1}))
    onnx_file = bad / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-100])

    async def scenario() -> None:
        async with running(make_app(repo=repo)) as client:
            ready = await client.get("/readyz")
            sarn = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
            scored = await client.post("/v1/score", json=score_body())
            metrics = (await client.get("/metrics")).text
        assert ready.status_code == 200, ready.json()
        assert sarn["sarn"]["version"] == str(good) and sarn["sarn"]["status"] == "ready"
        assert sarn["sarn"]["refused_versions"] == [
            {"version": str(good + 1), "stage": "load", "error": "ModelIntegrityError"}
        ]
        assert scored.json()["version"] == str(good)
        assert scored.json()["scores"] == expected_scores(reference("sarn"), [], CANDIDATES)
        assert f'ctr_model_version_refused{{model="sarn",version="{good + 1}"}} 1.0' in metrics

    async def strict() -> None:
        async with running(make_app(repo=repo, strict_versions=True)) as client:
            ready = await client.get("/readyz")
        assert ready.status_code == 503 and "model sarn failed to load" in ready.json()["reasons"]

    run(scenario())
    run(strict())
