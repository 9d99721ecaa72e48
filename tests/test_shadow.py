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
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
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

from runtime.loader import ScoringRequest, open_model
from runtime.repository import latest_version, model_dir
from service.store.behavior import BehaviorStore, StoreConfig
from service.store.embedded_redis import RedisServer

__all__ = ["ab_repo", "ab_template", "make_app", "start_server"]  # fixtures used below
OUTPUTS = ("scores", "conversion_scores", "ctcvr_scores")

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
CANDIDATES = [
    ("i3", "c3"),
    ("i40", "c0"),
    ("i7", "c7"),
    ("i21", "c5"),
    ("i60", "c4"),
    ("nope", "c1"),
]
PAIR = {"variant": "live", "model": "sarn", "shadow": "sarn", "output": "scores"}


def _bodies() -> list[dict[str, object]]:
    """20 fixed requests: stored and inline histories, slates of 1 to 6."""
    bodies: list[dict[str, object]] = []
    for k in range(20):
        body: dict[str, object] = {
            "request_id": f"req-{k}",
            "user_id": "div" if k % 2 else f"u{k}",
            "candidates": items(CANDIDATES[: 1 + k % 6]),
        }
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
    ab_repo: Path,
    tmp_path: Path,
    redis_server: RedisServer,
    start_server: Callable[..., Server],
) -> None:
    routing, fault = tmp_path / "routing.yaml", tmp_path / "fault"
    routing.write_text(VARIANT.format(shadow=SHADOW))
    fault.write_text("")
    server = start_server(
        ab_repo,
        CTR_ROUTING_FILE=str(routing),
        CTR_REDIS_URL=redis_server.url,
        CTR_SHADOW_STREAM="true",
        CTR_SHADOW_QUEUE_MAX_REQUESTS="2",
        SLATECTR_TEST_FAULT_FILE=str(fault),
    )
    events = [
        {"user_id": "div", "item_id": i, "category_id": c, "ts": 100 + k}
        for k, (i, c) in enumerate(HISTORY)
    ]
    with server.client() as client:
        assert client.post("/v1/events", json={"events": events}).status_code == 202
        fixed = {"request_id": "fixed", "user_id": "div", "candidates": items(CANDIDATES)}
        answer = client.post("/v1/score", json=fixed).json()
    wait_for(
        lambda: sample(server.metrics(), "ctr_shadow_duration_seconds_count") == 1,
        what="the shadow of the fixed request",
    )

    # Hand-computed divergence. References: the torch-free loader of each version, on the
    # stored history (v1 keeps its newest 10 items, v2 its newest 14: the shadow must get them).
    v1, v2 = (open_model(model_dir(ab_repo, "sarn", v)) for v in (1, 2))
    assert (v1.history_len, v2.history_len) == (10, 14)
    request = ScoringRequest("div", HISTORY, CANDIDATES)
    primary = [float(s) for s in v1.score([request])[0][:, 0]]
    shadow = [float(s) for s in v2.score([request])[0][:, 0]]
    assert answer["scores"] == primary and answer["version"] == "1"
    (short,) = v2.score([ScoringRequest("div", HISTORY[-10:], CANDIDATES)])
    assert shadow != [float(s) for s in short[:, 0]]
    k = len(CANDIDATES)
    assert len(set(primary)) == len(set(shadow)) == k  # no ties: the textbook formula applies
    rank_p = {s: r for r, s in enumerate(sorted(primary), start=1)}
    rank_s = {s: r for r, s in enumerate(sorted(shadow), start=1)}
    d2 = sum((rank_p[p] - rank_s[s]) ** 2 for p, s in zip(primary, shadow, strict=True))
    rho = 1 - 6 * d2 / (k * (k * k - 1))
    abs_diffs = [abs(p - s) for p, s in zip(primary, shadow, strict=True)]
    metrics = server.metrics()
    assert sample(metrics, "ctr_shadow_abs_diff_count", **PAIR) == k
    assert np.isclose(
        sample(metrics, "ctr_shadow_abs_diff_sum", **PAIR), sum(abs_diffs), rtol=0, atol=1e-9
    )
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
        before, "ctr_shadow_duration_seconds_count"
    )
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
    routing.write_text(
        "experiments: [{name: m, variants: [{name: v, model: ncm, weight: 1, "
        "shadow: {model: ncm}}]}]"
    )
    body = {"user_id": "u1", "candidates": items(CANDIDATES[:3])}

    def shadowed(app: FastAPI) -> float:
        return sample(
            parse_metrics(app.state.metrics.render().decode()), "ctr_shadow_duration_seconds_count"
        )

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


@pytest.fixture(scope="module")
def mt_repo(service_model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's repository plus gru-mt v2: the same tiny multi-task GRU as the session's
    gru-mt v1 (conftest), trained with another seed, so every output differs between them."""
    import torch

    from exporters.pipeline import ExportOptions, export_run
    from models.training.loop import train_config_for
    from models.training.run import train_run

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mt-shadow")
    shutil.copytree(service_model_repo, root / "repo")
    world = service_model_repo.parent / "world" / "behavior"
    config = train_config_for("gru", epochs=1, batch_size=64, history_len=10, device="cpu", seed=1)
    tiny = {"embed_dim": 4, "context_dim": 4, "mlp_hidden": (8,), "tasks": ("ctr", "cvr")}
    train_run(
        "gru",
        world / "train.parquet",
        world / "test.parquet",
        root / "gru-mt2",
        config,
        tiny,
        progress=False,
    )
    export_run(root / "gru-mt2", root / "repo", ExportOptions(name="gru-mt", version=2))
    return root / "repo"


MT_ROUTING = """
experiments:
  - name: both
    match: {surface: both}
    variants:
      - {name: mtmt, model: gru-mt, version: 1, weight: 1,
         shadow: {model: gru-mt, version: 2, fraction: 1.0}}
  - name: single
    match: {surface: single}
    variants:
      - {name: mtst, model: gru-mt, version: 1, weight: 1, shadow: {model: sarn, fraction: 1.0}}
"""


def _rho(a: list[float], b: list[float]) -> float:
    """Spearman's rho by the textbook formula (the caller checks there are no ties)."""
    k = len(a)
    rank_a = {v: r for r, v in enumerate(sorted(a), start=1)}
    rank_b = {v: r for r, v in enumerate(sorted(b), start=1)}
    d2 = sum((rank_a[x] - rank_b[y]) ** 2 for x, y in zip(a, b, strict=True))
    return 1 - 6 * d2 / (k * (k * k - 1))


def test_multi_task_shadows_compare_every_output_both_sides_have(
    make_app: AppFactory, mt_repo: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """gru-mt v1 shadowed by gru-mt v2 is compared on pCTR, pCVR and pCTCVR (abs diff and rank
    correlation labelled by output, values from the loaders of both versions); shadowed by the
    single-task SARN it is compared on `scores` only. The stream records carry the same."""
    routing = tmp_path / "routing.yaml"
    routing.write_text(MT_ROUTING)
    history = items(HISTORY[:12])
    pairs = {"mtmt": ("gru-mt", "both"), "mtst": ("sarn", "single")}

    async def scenario() -> tuple[dict[str, dict[str, object]], str]:
        app = make_app(repo=mt_repo, routing_file=routing, shadow_stream=True)
        stream = redis.Redis.from_url(redis_server.url)
        async with running(app) as client:
            answers = {}
            for variant, (_, surface) in pairs.items():
                body = {
                    "user_id": "mt-user",
                    "candidates": items(CANDIDATES),
                    "history": history,
                    "context": {"surface": surface},
                }
                answer = await client.post("/v1/score", json=body)
                assert answer.status_code == 200 and answer.json()["variant"] == variant
                answers[variant] = answer.json()
            await until(lambda: stream.xlen("v1:shadow:pairs") == 2, timeout_s=10)
            return answers, app.state.metrics.render().decode()

    answers, text = asyncio.run(scenario())
    metrics = parse_metrics(text)
    request = ScoringRequest("mt-user", HISTORY[:12], CANDIDATES)
    v1, v2 = (open_model(model_dir(mt_repo, "gru-mt", v)) for v in (1, 2))
    sarn = open_model(model_dir(mt_repo, "sarn", latest_version(mt_repo, "sarn")))
    assert v1.output_names == v2.output_names == OUTPUTS and sarn.output_names == ("scores",)
    primary = v1.score([request])[0]  # [K, 3]
    shadows = {"mtmt": v2.score([request])[0], "mtst": sarn.score([request])[0]}
    k = len(CANDIDATES)
    for name in OUTPUTS:  # the primary's answer is v1's, whatever its shadow
        column = [float(x) for x in primary[:, OUTPUTS.index(name)]]
        assert answers["mtmt"][name] == answers["mtst"][name] == column, name

    records = {
        r["variant"]: r
        for _, r in cast(
            list[tuple[str, dict[str, str]]],
            redis.Redis.from_url(redis_server.url, decode_responses=True).xrange("v1:shadow:pairs"),
        )
    }
    for variant, (shadow_name, _) in pairs.items():
        compared = OUTPUTS if variant == "mtmt" else ("scores",)
        record = records[variant]
        assert json.loads(record["outputs"]) == list(compared)
        labels = {"variant": variant, "model": "gru-mt", "shadow": shadow_name}
        for j, name in enumerate(compared):
            p = [float(x) for x in primary[:, j]]
            q = [float(x) for x in shadows[variant][:, j]]
            assert len(set(p)) == len(set(q)) == k  # no ties: the textbook formula applies
            diffs = [abs(a - b) for a, b in zip(p, q, strict=True)]
            assert sum(diffs) > 0  # the two sides differ, so the sums below tell outputs apart
            assert sample(metrics, "ctr_shadow_abs_diff_count", output=name, **labels) == k
            assert np.isclose(
                sample(metrics, "ctr_shadow_abs_diff_sum", output=name, **labels),
                sum(diffs),
                rtol=0,
                atol=1e-9,
            ), (variant, name)
            assert sample(metrics, "ctr_shadow_rank_correlation_count", output=name, **labels) == 1
            rank_key = "rank_correlation" if name == "scores" else f"rank_correlation_{name}"
            assert np.isclose(float(record[rank_key]), _rho(p, q), rtol=0, atol=1e-12)
            assert json.loads(record[f"primary_{name}"]) == p
            assert json.loads(record[f"shadow_{name}"]) == q
        # Outputs one side lacks: no series at all, no stream fields.
        for name in set(OUTPUTS) - set(compared):
            for metric in ("ctr_shadow_abs_diff_count", "ctr_shadow_rank_correlation_count"):
                assert not [
                    key
                    for key in metrics
                    if key[0] == metric
                    and (("output", name) in key[1])
                    and ("variant", variant) in key[1]
                ]
            assert f"primary_{name}" not in record and f"shadow_{name}" not in record
        assert sample(metrics, "ctr_shadow_duration_seconds_count", **labels) == 1


def test_a_single_task_primary_is_compared_with_a_multi_task_shadow_on_scores_alone() -> None:
    from service.shadow import shared_outputs

    assert shared_outputs(("scores",), OUTPUTS) == ("scores",)
    assert shared_outputs(OUTPUTS, ("scores",)) == ("scores",)
    assert shared_outputs(OUTPUTS, OUTPUTS[::-1]) == OUTPUTS  # in the primary's order
