"""Shadow scoring over real HTTP: divergence metrics against hand-computed values, the pairs in a
real Redis stream, and primary answers byte-for-byte unchanged by a shadow that stalls or raises.

One `ctr serve` process, a real redis-server, sarn v1 as the primary of the variant and sarn v2
(another seed, a longer history) as its shadow. The stalling and raising shadows are the real
v2 model wrapped by `shadow_fault` (see there why a real part cannot show it): the wrapper only
acts in the shadow's own worker thread. The baseline is the same server with the same variant
and no shadow (routing file swapped through the admin reload).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import redis
from fastapi import FastAPI
from prometheus_client.utils import floatToGoString
from routing_support import (
    Server,
    ab_repo,
    ab_template,
    items,
    parse_metrics,
    sample,
    start_server,
    wait_for,
)
from service_support import AppFactory, hold, make_app, run, running, until

from exporters.loader import ScoringRequest, open_model
from exporters.repository import model_dir
from service.embedded_redis import RedisServer
from service.store import BehaviorStore, StoreConfig

__all__ = ["ab_repo", "ab_template", "make_app", "start_server"]  # fixtures used below

VARIANT = """
experiments:
  - name: mirror
    variants:
      - name: live
        model: sarn
        version: 1
        weight: 1
{shadow}"""
SHADOW = "        shadow: {model: sarn, version: 2, fraction: 1.0}\n"
HISTORY = [(f"i{k}", f"c{k % 8}") for k in range(15)]  # longer than v1 (10) and v2 (14) read
CANDIDATES = [("i3", "c3"), ("i40", "c0"), ("i7", "c7"), ("i21", "c5"), ("i60", "c4"),
              ("nope", "c1")]  # fmt: skip
PAIR = {"variant": "live", "model": "sarn", "shadow": "sarn"}


def _bodies() -> list[dict[str, object]]:
    """20 fixed requests: stored and inline histories, slates of 1 to 6."""
    bodies: list[dict[str, object]] = []
    for k in range(20):
        body: dict[str, object] = {"request_id": f"req-{k}", "user_id": "div" if k % 2 else f"u{k}",
                                   "candidates": items(CANDIDATES[: 1 + k % 6])}  # fmt: skip
        if k % 4 == 0:
            body["history"] = items(HISTORY[: k % 15])
        bodies.append(body)
    return bodies


def _collect(server: Server) -> list[bytes]:
    with server.client() as client:
        answers = [client.post("/v1/score", json=body) for body in _bodies()]
    assert [a.status_code for a in answers] == [200] * len(answers)
    return [a.content for a in answers]


def _shadow_queue(server: Server) -> int:
    with server.client() as client:
        listing = client.get("/v1/models").json()
    sarn = next(m for m in listing["models"] if m["name"] == "sarn")
    return sum(v["shadow_queue_depth"] for v in sarn["versions"])


def _use_routing(server: Server, routing: Path, text: str) -> None:
    routing.write_text(text)
    answer = server.admin("/v1/admin/routing/reload")
    assert answer.status_code == 200 and answer.json()["changed"], answer.text


def test_divergence_stream_and_untouched_primary_answers(
    ab_repo: Path, tmp_path: Path, redis_server: RedisServer,
    start_server: Callable[..., Server],
) -> None:  # fmt: skip
    routing, fault = tmp_path / "routing.yaml", tmp_path / "fault"
    routing.write_text(VARIANT.format(shadow=SHADOW))
    fault.write_text("")
    server = start_server(ab_repo, CTR_ROUTING_FILE=str(routing), CTR_REDIS_URL=redis_server.url,
                          CTR_SHADOW_STREAM="true", CTR_SHADOW_QUEUE_MAX_REQUESTS="2",
                          SLATECTR_TEST_FAULT_FILE=str(fault))  # fmt: skip
    events = [{"user_id": "div", "item_id": i, "category_id": c, "ts": 100 + k}
              for k, (i, c) in enumerate(HISTORY)]  # fmt: skip
    with server.client() as client:
        assert client.post("/v1/events", json={"events": events}).status_code == 202
        fixed = {"request_id": "fixed", "user_id": "div", "candidates": items(CANDIDATES)}
        answer = client.post("/v1/score", json=fixed).json()
    wait_for(lambda: sample(server.metrics(), "ctr_shadow_duration_seconds_count") == 1,
             what="the shadow of the fixed request")  # fmt: skip

    # Hand-computed divergence. References: the torch-free loader of each version, on the
    # stored history (v1 keeps its newest 10 items, v2 its newest 14: the shadow must get them).
    v1, v2 = (open_model(model_dir(ab_repo, "sarn", v)) for v in (1, 2))
    assert (v1.max_history, v2.max_history) == (10, 14)
    request = ScoringRequest("div", HISTORY, CANDIDATES)
    primary = [float(s) for s in v1.score([request])[0]]
    shadow = [float(s) for s in v2.score([request])[0]]
    assert answer["scores"] == primary and answer["version"] == "1"
    assert shadow != [float(s) for s in v2.score([ScoringRequest("div", HISTORY[-10:],
                                                                 CANDIDATES)])[0]]  # fmt: skip
    k = len(CANDIDATES)
    assert len(set(primary)) == len(set(shadow)) == k  # no ties: the textbook formula applies
    rank_p = {s: r for r, s in enumerate(sorted(primary), start=1)}
    rank_s = {s: r for r, s in enumerate(sorted(shadow), start=1)}
    d2 = sum((rank_p[p] - rank_s[s]) ** 2 for p, s in zip(primary, shadow, strict=True))
    rho = 1 - 6 * d2 / (k * (k * k - 1))
    abs_diffs = [abs(p - s) for p, s in zip(primary, shadow, strict=True)]
    metrics = server.metrics()
    assert sample(metrics, "ctr_shadow_abs_diff_count", **PAIR) == k
    assert np.isclose(sample(metrics, "ctr_shadow_abs_diff_sum", **PAIR), sum(abs_diffs),
                      rtol=0, atol=1e-9)  # fmt: skip
    for bound in (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        expected = sum(d <= bound for d in abs_diffs)
        le = floatToGoString(bound)
        assert sample(metrics, "ctr_shadow_abs_diff_bucket", le=le, **PAIR) == expected
    # rho can be negative, so the histogram has no _sum (OpenMetrics); its bucket must be
    # rho's, and the exact value is checked in the stream record below.
    assert sample(metrics, "ctr_shadow_rank_correlation_count", **PAIR) == 1
    for bound in (-0.5, 0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0):
        le = floatToGoString(bound)
        bucket = sample(metrics, "ctr_shadow_rank_correlation_bucket", le=le, **PAIR)
        assert bucket == (rho <= bound), (bound, rho)

    # The pair went to the capped Redis stream, without the user id.
    stream = redis.Redis.from_url(redis_server.url, decode_responses=True)
    entries = cast(list[tuple[str, dict[str, str]]], stream.xrange("v1:shadow:pairs"))
    [(_, record)] = entries
    assert record["request_id"] == "fixed" and "div" not in record.values()
    assert (record["version"], record["shadow_version"]) == ("1", "2")
    assert json.loads(record["shadow_scores"]) == shadow
    assert json.loads(record["primary_scores"]) == primary
    assert json.loads(record["items"]) == [i for i, _ in CANDIDATES]
    assert np.isclose(float(record["rank_correlation"]), rho, rtol=0, atol=1e-12)

    # Baseline: the same variant without a shadow.
    _use_routing(server, routing, VARIANT.format(shadow=""))
    baseline = _collect(server)

    # A shadow that stalls: every primary answer comes back while it is still stuck.
    _use_routing(server, routing, VARIANT.format(shadow=SHADOW))
    before = server.metrics()
    fault.write_text("hold")
    stalled = _collect(server)
    held = server.metrics()
    assert _shadow_queue(server) >= 1  # shadow work still pending after the last answer
    assert sample(held, "ctr_shadow_duration_seconds_count") == sample(
        before, "ctr_shadow_duration_seconds_count")  # fmt: skip
    dropped = sample(held, "ctr_shadow_dropped_total", shadow="sarn", reason="queue_full")
    assert dropped - sample(before, "ctr_shadow_dropped_total", reason="queue_full") >= 17
    fault.write_text("")
    wait_for(lambda: _shadow_queue(server) == 0, what="the stalled shadow to drain")

    # A shadow that raises: counted, never seen.
    fault.write_text("raise")
    raising = _collect(server)
    wait_for(lambda: _shadow_queue(server) == 0, what="the raising shadow to drain")
    errors = sample(server.metrics(), "ctr_shadow_errors_total", shadow="sarn", stage="inference")
    assert errors >= 1
    assert baseline == stalled == raising
    assert b"sarn" in baseline[0] and b'"variant":"live"' in baseline[0]


def test_the_shadow_waits_while_primary_requests_are_queued(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """Above saturation the shadow must not compete with queued primary work: a shadow job
    (ncm mirroring ncm) waits while sarn's queue holds a request, and runs once it is empty."""
    routing = tmp_path / "routing.yaml"
    routing.write_text("experiments: [{name: m, variants: [{name: v, model: ncm, weight: 1, "
                       "shadow: {model: ncm}}]}]")  # fmt: skip
    body = {"user_id": "u1", "candidates": items(CANDIDATES[:3])}

    def shadowed(app: FastAPI) -> float:
        return sample(parse_metrics(app.state.metrics.render().decode()),
                      "ctr_shadow_duration_seconds_count")  # fmt: skip

    async def scenario() -> None:
        app = make_app(routing_file=routing)
        async with running(app) as client:
            gate = hold(app, "sarn")
            sarn = body | {"model": "sarn"}
            pinned = [asyncio.ensure_future(client.post("/v1/score", json=sarn))]
            await asyncio.to_thread(gate.entered.wait, 10)  # the first runs (held) ...
            pinned.append(asyncio.ensure_future(client.post("/v1/score", json=sarn)))
            await until(lambda: app.state.engine.queue_depth("sarn") == 1)  # one queued
            assert (await client.post("/v1/score", json=body)).json()["variant"] == "v"
            await asyncio.sleep(0.3)
            assert shadowed(app) == 0  # the shadow job waits for the queued primary request
            gate.opened.set()
            assert [r.status_code for r in await asyncio.gather(*pinned)] == [200, 200]
            await until(lambda: shadowed(app) == 1)

    run(scenario())


def test_the_pair_stream_is_capped(redis_server: RedisServer) -> None:
    """XADD MAXLEN ~ trims whole stream nodes (100 entries each by default): the stream stays
    within cap + one node however many pairs arrive."""

    async def scenario() -> int:
        store = BehaviorStore.from_url(redis_server.url, StoreConfig())
        try:
            for k in range(350):
                await store.append_stream("v1:shadow:pairs", {"request_id": f"r{k}"}, 10)
        finally:
            await store.close()
        return int(redis.Redis.from_url(redis_server.url).xlen("v1:shadow:pairs"))

    length = asyncio.run(scenario())
    assert 10 <= length <= 110
