"""Multi-task models through the app: pCTR, pCVR and pCTCVR in the `/v1/score` body.

`gru-mt` is the session's tiny multi-task GRU (conftest `service_model_repo`: trained with
tasks ("ctr", "cvr") on the simulated world's conversions and exported through the real
pipeline). The reference for every list is the torch-free loader of the same version; the
product identity pCTCVR = pCTR x pCVR is checked on the body alone, independently of how the
graph computes it. Requests run in-process against a real redis-server (`service_support`).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from routing_support import parse_metrics, publish_copy, sample
from service_support import (
    CANDIDATES,
    HISTORY,
    AppFactory,
    events_body,
    expected_outputs,
    hold,
    make_app,
    reference,
    running,
    score_body,
    until,
)

from runtime.loader import LoadedModel, ScoringRequest, open_model
from runtime.repository import latest_version, model_dir
from service.registry import ModelRegistry, ModelSpec, RefusedVersion, WarmupError, warm_up

__all__ = ["make_app", "reference"]  # fixtures used by the tests below

MT = "gru-mt"
OUTPUTS = ("scores", "conversion_scores", "ctcvr_scores")
SINGLE_TASK_KEYS = ["request_id", "model", "version", "variant", "scores", "history_source"]


def _assert_multi_task_body(answer: dict[str, Any], want: dict[str, list[float]]) -> None:
    """Lists aligned with the candidates, equal to the loader's columns, probabilities, and
    ctcvr = scores x conversion_scores element by element."""
    assert list(answer) == [*SINGLE_TASK_KEYS, "conversion_scores", "ctcvr_scores"]
    k = len(want["scores"])
    for name in OUTPUTS:
        assert len(answer[name]) == k, name
        np.testing.assert_allclose(answer[name], want[name], rtol=0, atol=1e-6, err_msg=name)
        assert all(0.0 <= p <= 1.0 for p in answer[name]), name
    ctr, cvr = np.array(answer["scores"]), np.array(answer["conversion_scores"])
    np.testing.assert_allclose(answer["ctcvr_scores"], ctr * cvr, rtol=0, atol=1e-6)
    # The three are different quantities: a body that repeats one list would pass the rest.
    assert answer["conversion_scores"] != answer["scores"] != answer["ctcvr_scores"]


def test_a_multi_task_model_answers_pctr_pcvr_and_pctcvr(
    make_app: AppFactory, reference: Callable[[str], LoadedModel]
) -> None:
    async def scenario() -> tuple[dict[str, Any], ...]:
        async with running(make_app()) as client:
            assert (await client.post("/v1/events", json=events_body("u1", HISTORY))).status_code
            stored = await client.post("/v1/score", json=score_body(model=MT, request_id="mt"))
            inline = await client.post(
                "/v1/score",
                json=score_body(
                    "u9",
                    model=MT,
                    history=[{"item_id": i, "category_id": c} for i, c in HISTORY[:4]],
                ),
            )
            fresh = await client.post("/v1/score", json=score_body("new-user", model=MT))
        assert [a.status_code for a in (stored, inline, fresh)] == [200, 200, 200]
        return stored.json(), inline.json(), fresh.json()

    stored, inline, fresh = asyncio.run(scenario())
    model = reference(MT)
    assert model.output_names == OUTPUTS
    assert stored["model"] == MT and stored["history_source"] == "redis"
    _assert_multi_task_body(stored, expected_outputs(model, HISTORY, CANDIDATES))
    _assert_multi_task_body(inline, expected_outputs(model, HISTORY[:4], CANDIDATES, "u9"))
    _assert_multi_task_body(fresh, expected_outputs(model, [], CANDIDATES, "new-user"))
    assert stored["conversion_scores"] != fresh["conversion_scores"]  # the history matters


def test_single_task_bodies_have_no_conversion_keys(make_app: AppFactory) -> None:
    """Absent, not null: a single-task body is exactly the keys it had before multi-task."""

    async def scenario() -> list[bytes]:
        async with running(make_app()) as client:
            answers = [
                await client.post("/v1/score", json=score_body(model=name))
                for name in ("sarn", "ncm")
            ]
        assert [a.status_code for a in answers] == [200, 200]
        return [a.content for a in answers]

    for content in asyncio.run(scenario()):
        assert list(json.loads(content)) == SINGLE_TASK_KEYS
        assert b"conversion_scores" not in content and b"ctcvr" not in content
        assert b"null" not in content


def test_a_batch_of_multi_task_requests_is_split_back_per_request(
    make_app: AppFactory, reference: Callable[[str], LoadedModel]
) -> None:
    """Queued requests of different slate sizes run as one [N, 3] batch; each answer gets its
    own rows of every column."""
    slates = {
        f"mt{k}": [(f"i{(k * 7 + j) % 80}", f"c{j % 8}") for j in range(1 + k % 4)]
        for k in range(6)
    }
    history = [("i1", "c1"), ("i2", "c2")]
    inline = [{"item_id": i, "category_id": c} for i, c in history]

    async def scenario() -> list[dict[str, Any]]:
        app = make_app()
        async with running(app) as client:
            gate = hold(app, MT)
            first = asyncio.ensure_future(client.post("/v1/score", json=score_body(model=MT)))
            await asyncio.to_thread(gate.entered.wait, 10)
            queued = [
                asyncio.ensure_future(
                    client.post("/v1/score", json=score_body(user, cands, model=MT, history=inline))
                )
                for user, cands in slates.items()
            ]
            await until(lambda: app.state.engine.queue_depth(MT) == len(slates))
            gate.opened.set()
            answers = [r.json() for r in await asyncio.gather(first, *queued)]
        assert gate.calls == 2  # the first alone, then every queued request in one run
        return answers[1:]

    answers = asyncio.run(scenario())
    model = reference(MT)
    for (user, cands), answer in zip(slates.items(), answers, strict=True):
        _assert_multi_task_body(answer, expected_outputs(model, history, cands, user))


def test_the_naive_baseline_answers_the_same_three_outputs(
    make_app: AppFactory, reference: Callable[[str], LoadedModel]
) -> None:
    body = score_body(model=MT, history=[{"item_id": i, "category_id": c} for i, c in HISTORY])

    async def scenario() -> dict[str, Any]:
        async with running(make_app(naive=True)) as client:
            answer = await client.post("/v1/score", json=body)
        assert answer.status_code == 200
        return dict(answer.json())

    _assert_multi_task_body(
        asyncio.run(scenario()), expected_outputs(reference(MT), HISTORY, CANDIDATES)
    )


def test_openapi_documents_the_optional_outputs(make_app: AppFactory) -> None:
    async def scenario() -> dict[str, Any]:
        async with running(make_app()) as client:
            return dict((await client.get("/openapi.json")).json())

    schema = asyncio.run(scenario())["components"]["schemas"]["ScoreResponse"]
    assert "conversion_scores" not in schema["required"] and "scores" in schema["required"]
    for name in ("conversion_scores", "ctcvr_scores"):
        field = schema["properties"][name]
        assert field["type"] == "array" and field["items"] == {"type": "number"}, field
        assert "null" not in json.dumps(field.get("anyOf", [])), field  # never sent as null


def test_the_models_listing_names_each_versions_outputs(make_app: AppFactory) -> None:
    async def scenario() -> dict[str, Any]:
        async with running(make_app()) as client:
            return dict((await client.get("/v1/models")).json())

    by_name = {m["name"]: m for m in asyncio.run(scenario())["models"]}
    assert [v["outputs"] for v in by_name[MT]["versions"]] == [list(OUTPUTS)]
    assert [v["outputs"] for v in by_name["sarn"]["versions"]] == [["scores"]]
    assert [v["outputs"] for v in by_name["ncm"]["versions"]] == [["scores"]]


def _nan_cvr_tower(directory: Path) -> None:
    """Only the CVR tower's float weights become NaN: pCTR stays a probability, pCVR and
    pCTCVR do not (a version that only a check of every output column refuses)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(directory / "model.onnx"))
    altered = 0
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if "extra_towers" in init.name and values.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(np.full_like(values, np.nan), init.name))
            altered += 1
    assert altered, "no CVR tower weights found in the graph"
    onnx.save(model, str(directory / "model.onnx"))


def test_a_version_whose_pcvr_is_not_a_probability_is_refused(
    service_model_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(service_model_repo, repo)
    good = latest_version(repo, MT)
    publish_copy(repo, MT, model_dir(repo, MT, good), good + 1, alter=_nan_cvr_tower)
    broken = open_model(model_dir(repo, MT, good + 1))
    (scores,) = broken.score([ScoringRequest("u1", HISTORY, CANDIDATES)])
    assert np.all((scores[:, 0] > 0) & (scores[:, 0] < 1)) and np.isnan(scores[:, 1:]).all()
    with pytest.raises(WarmupError, match="conversion_scores"):
        warm_up(broken)
    # The broken newest version is refused; the one before it serves (strict: nothing does).
    registry = ModelRegistry.load(repo, [ModelSpec(MT)])
    assert registry.models[MT].version == good and not registry.failures
    assert registry.refused[MT] == [RefusedVersion(good + 1, "warmup", "WarmupError")]
    strict = ModelRegistry.load(repo, [ModelSpec(MT)], strict_versions=True)
    assert strict.failures == {MT: "WarmupError"} and MT not in strict.models


def test_the_mean_prediction_of_each_output_is_a_metric(make_app: AppFactory) -> None:
    """ctr_prediction_mean: one observation per request and output, the slate's mean."""

    async def scenario() -> tuple[list[dict[str, Any]], str]:
        async with running(make_app()) as client:
            bodies = [
                await client.post("/v1/score", json=score_body(f"m{i}", model=MT)) for i in range(2)
            ]
            bodies.append(await client.post("/v1/score", json=score_body(model="sarn")))
            text = (await client.get("/metrics")).text
        return [b.json() for b in bodies], text

    (first, second, single), text = asyncio.run(scenario())
    metrics = parse_metrics(text)
    for output in OUTPUTS:
        labels = {"model": MT, "output": output}
        assert sample(metrics, "ctr_prediction_mean_count", **labels) == 2
        expected = np.mean(first[output]) + np.mean(second[output])  # by hand from the bodies
        assert sample(metrics, "ctr_prediction_mean_sum", **labels) == pytest.approx(expected)
    assert sample(metrics, "ctr_prediction_mean_sum", model="sarn", output="scores") == (
        pytest.approx(np.mean(single["scores"]))
    )
    assert sample(metrics, "ctr_prediction_mean_count", model="sarn") == 1  # no other output
