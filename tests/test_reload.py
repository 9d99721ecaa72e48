"""Hot reload over real HTTP: a new version swapped in under continuous traffic, versions that
fail to load or to warm up, what the admin endpoint accepts, and the polling file watch.

The repository starts with sarn v1 only (the session's fixture); the new version is a really
different SARN (another seed), published mid-test through the repository's atomic publish, so
every response's scores can be checked against the version it names.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from routing_support import (
    ADMIN,
    Server,
    ab_template,
    corrupt,
    items,
    nan_weights,
    publish_copy,
    sample,
    start_server,
    wait_for,
)

from runtime.loader import LoadedModel, ScoringRequest, open_model
from runtime.repository import model_dir

__all__ = ["ab_template", "start_server"]  # fixtures used below

THREADS = 4
RELOAD = "/v1/admin/models/sarn/reload"


@pytest.fixture
def repo(service_model_repo: Path, tmp_path: Path) -> Path:
    shutil.copytree(service_model_repo, tmp_path / "repo")
    return tmp_path / "repo"


def _body(thread: int) -> dict[str, Any]:
    history = [(f"i{(thread * 5 + k) % 80}", f"c{k % 8}") for k in range(3 + thread)]
    cands = [(f"i{(thread * 11 + k) % 80}", f"c{(thread + k) % 8}") for k in range(2 + thread)]
    return {"user_id": f"t{thread}", "candidates": items(cands), "history": items(history)}


def _expected(model: LoadedModel, body: dict[str, Any]) -> list[float]:
    pairs = [
        [(x["item_id"], x["category_id"]) for x in body[key]] for key in ("history", "candidates")
    ]
    (scores,) = model.score([ScoringRequest(body["user_id"], pairs[0], pairs[1])])
    return [float(s) for s in scores[:, 0]]


def _current(server: Server) -> dict[str, Any]:
    with server.client() as client:
        listing = client.get("/v1/models").json()
    return next(m for m in listing["models"] if m["name"] == "sarn")


def test_reload_under_traffic_switches_once_with_no_failed_request(
    repo: Path, ab_template: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server(repo)
    bodies = [_body(t) for t in range(THREADS)]
    references = {
        "1": open_model(model_dir(repo, "sarn", 1)),
        "2": open_model(model_dir(ab_template, "sarn", 2)),
    }
    expected = {v: [_expected(m, b) for b in bodies] for v, m in references.items()}
    assert expected["1"] != expected["2"]  # the two versions are told apart by their scores
    records: list[list[tuple[float, float, Any]]] = [[] for _ in range(THREADS)]
    stop = threading.Event()

    def load(thread: int) -> None:  # closed loop: the next request when the last answered
        with server.client() as client:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    answer: Any = client.post("/v1/score", json=bodies[thread])
                except Exception as exc:  # a transport failure is a failed request too
                    answer = exc
                records[thread].append((start, time.monotonic(), answer))

    workers = [threading.Thread(target=load, args=(t,)) for t in range(THREADS)]
    for worker in workers:
        worker.start()
    time.sleep(0.7)
    reload_started = time.monotonic()
    publish_copy(repo, "sarn", ab_template / "sarn" / "2", 2)
    reloaded = server.admin(RELOAD)
    reload_done = time.monotonic()
    time.sleep(0.7)
    stop.set()
    for worker in workers:
        worker.join(30)

    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json() | {"provider": ""} == {
        "model": "sarn",
        "version": "2",
        "previous_version": "1",
        "changed": True,
        "provider": "",
    }
    seen: dict[str, int] = {"1": 0, "2": 0}
    for thread, answers in enumerate(records):
        versions = []
        for start, end, answer in answers:
            assert not isinstance(answer, Exception), answer
            assert answer.status_code == 200, answer.text
            version = answer.json()["version"]
            np.testing.assert_allclose(
                answer.json()["scores"], expected[version][thread], rtol=0, atol=1e-5
            )
            versions.append(version)
            seen[version] += 1
            if end < reload_started:
                assert version == "1"
            if start > reload_done:
                assert version == "2"
        assert versions == sorted(versions)  # one switch per client, never back
    assert seen["1"] > 0 and seen["2"] > 0, seen
    # The old version is drained, then released; the swap is counted once.
    wait_for(
        lambda: [v["version"] for v in _current(server)["versions"]] == ["2"],
        what="v1 to be retired",
    )
    metrics = server.metrics()
    assert sample(metrics, "ctr_model_reloads_total", model="sarn") == 1
    assert sample(metrics, "ctr_model_info", model="sarn", version="1") == 0
    assert sample(metrics, "ctr_model_info", model="sarn", version="2") == 1


def test_versions_that_fail_to_load_or_warm_up_leave_the_old_one_serving(
    repo: Path, ab_template: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server(repo)
    v1 = open_model(model_dir(repo, "sarn", 1))
    publish_copy(repo, "sarn", repo / "sarn" / "1", 2, damage=corrupt)
    publish_copy(repo, "sarn", ab_template / "sarn" / "2", 3, alter=nan_weights)
    broken = server.admin(RELOAD)  # no version: the highest, v3
    corrupted = server.admin(RELOAD, json={"version": 2})
    for answer, stage, error in (
        (broken, "warmup", "WarmupError"),
        (corrupted, "load", "ModelIntegrityError"),
    ):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "model_load_failed"
        assert answer.json()["error"]["details"] == [{"stage": stage, "error": error}]
        assert "v1 keeps serving" in answer.json()["error"]["message"]
    with server.client() as client:
        scored = client.post("/v1/score", json=_body(1)).json()
        ready = client.get("/readyz").status_code
    assert scored["version"] == "1" and scored["scores"] == _expected(v1, _body(1))
    assert ready == 200
    assert _current(server)["version"] == "1"
    assert [v["version"] for v in _current(server)["versions"]] == ["1"]
    metrics = server.metrics()
    assert sample(metrics, "ctr_model_reload_failures_total", model="sarn", stage="load") == 1
    assert sample(metrics, "ctr_model_reload_failures_total", model="sarn", stage="warmup") == 1
    assert sample(metrics, "ctr_model_reloads_total") == 0

    # Only names and integer versions of the repository; the admin key is required.
    refused = {
        "unknown version": (RELOAD, {"version": 9}, 404),
        "unknown model": ("/v1/admin/models/nosuch/reload", None, 404),
        "a path as name": ("/v1/admin/models/..%2F..%2Fetc/reload", None, 404),
        "an upper-case name": ("/v1/admin/models/SARN/reload", None, 422),
        "a version string": (RELOAD, {"version": "2"}, 422),
        "a boolean version": (RELOAD, {"version": True}, 422),
        "version 0": (RELOAD, {"version": 0}, 422),
        "a path field": (RELOAD, {"path": "/tmp/model.onnx"}, 422),
        "a URL field": (RELOAD, {"url": "http://example.com/m.onnx"}, 422),
    }
    for why, (path, body, status) in refused.items():
        assert server.admin(path, json=body).status_code == status, why
    with server.client() as client:
        assert client.post(RELOAD).status_code == 401
        assert client.post(RELOAD, headers={"X-API-Key": ADMIN + "x"}).status_code == 403

    # A good version still loads afterwards; asking for the current one changes nothing; an
    # explicit older version is a rollback.
    publish_copy(repo, "sarn", ab_template / "sarn" / "2", 4)
    good = server.admin(RELOAD, json={"version": 4})
    assert good.status_code == 200 and good.json()["previous_version"] == "1"
    assert server.admin(RELOAD, json={"version": 4}).json()["changed"] is False
    back = server.admin(RELOAD, json={"version": 1})
    assert (back.status_code, back.json()["version"]) == (200, "1")
    with server.client() as client:
        assert client.post("/v1/score", json=_body(1)).json()["scores"] == _expected(v1, _body(1))


def _routing_sha(server: Server) -> str:
    with server.client() as client:
        return str(client.get("/v1/models").json()["routing"]["sha256"])


def test_the_file_watch_follows_new_versions_and_routing_changes(
    repo: Path, ab_template: Path, tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    routing = tmp_path / "routing.yaml"
    routing.write_text("experiments: []\n")
    server = start_server(repo, CTR_ROUTING_FILE=str(routing), CTR_RELOAD_POLL_S="0.2")
    assert _current(server)["follows_latest"] is True
    publish_copy(repo, "sarn", ab_template / "sarn" / "2", 2)
    wait_for(lambda: _current(server)["version"] == "2", what="the poll to load v2")
    publish_copy(repo, "sarn", repo / "sarn" / "1", 3, damage=corrupt)
    wait_for(
        lambda: sample(server.metrics(), "ctr_model_reload_failures_total") == 1,
        what="the corrupt v3 to be refused",
    )
    time.sleep(1.0)  # five more polls: a refused version is not retried
    assert sample(server.metrics(), "ctr_model_reload_failures_total", stage="load") == 1
    assert _current(server)["version"] == "2"

    text = "experiments: [{name: all, variants: [{name: all-ncm, model: ncm, weight: 1}]}]\n"
    routing.write_text(text)
    wait_for(
        lambda: _routing_sha(server) == hashlib.sha256(text.encode()).hexdigest(),
        what="the routing change",
    )
    body = {"user_id": "w", "candidates": items([("i1", "c1")])}
    with server.client() as client:
        routed = client.post("/v1/score", json=body).json()
    assert (routed["variant"], routed["model"]) == ("all-ncm", "ncm")

    applied = _routing_sha(server)
    routing.write_text("experiments: [{name: a, variants: [{name: x, model: nosuch, weight: 1}]}]")
    wait_for(
        lambda: sample(server.metrics(), "ctr_routing_reloads_total", outcome="invalid") == 1,
        what="the invalid routing file to be refused",
    )
    refused = server.admin("/v1/admin/routing/reload")
    assert refused.status_code == 422
    assert "nosuch" in refused.json()["error"]["details"][0]["msg"]
    assert _routing_sha(server) == applied
    with server.client() as client:
        assert client.post("/v1/score", json=body).json()["variant"] == "all-ncm"
