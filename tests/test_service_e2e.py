"""End to end: `ctr serve` as a real uvicorn process, over HTTP, with its embedded Redis.

The server is launched with `torch` made unimportable (`sys.modules["torch"] = None`), so it
starting at all proves the serving path never imports torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.loader import ScoringRequest, open_model
from runtime.repository import latest_version, model_dir
from service.processes import NotReady, free_port, http_ok, stop_process, wait_until

pytestmark = pytest.mark.slow
LAUNCH = (
    "import sys; sys.modules['torch'] = None; sys.argv = ['ctr', 'serve']; "
    "from slatectr.cli import main; main()"
)
INGEST, ADMIN = "e2e-ingest", "e2e-admin"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


def _start(
    repo: Path, log: Path, launch: str = LAUNCH, err: Path | None = None, **env: str
) -> Server:
    """`ctr serve` on a free port; stdout and stderr go to `log` (stderr to `err` if given)."""
    port = free_port()
    environment = {
        **os.environ,
        "CTR_REPO": str(repo),
        "CTR_PORT": str(port),
        "CTR_DEFAULT_MODEL": "sarn",
        "CTR_INGEST_API_KEYS": INGEST,
        "CTR_ADMIN_API_KEYS": ADMIN,
        "CTR_REQUEST_TIMEOUT_MS": "5000",
        **env,
    }
    environment.pop("CTR_REDIS_URL", None)  # the embedded redis-server
    with log.open("wb") as sink, (err or log).open("ab") as err_sink:
        process = subprocess.Popen(
            [sys.executable, "-c", launch],
            env=environment,
            stdout=sink,
            stderr=err_sink if err else sink,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: http_ok(f"{server.url}/readyz", 1), 60, process, 0.1, "ctr serve")
    except NotReady as exc:
        process.kill()
        raise AssertionError(f"{exc}:\n{log.read_text()}") from None
    return server


def _stop(server: Server) -> None:
    stop_process(server.process, 20)


@pytest.fixture(scope="module")
def server(service_model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = _start(service_model_repo, tmp_path_factory.mktemp("e2e") / "server.log")
    yield running
    _stop(running)


def _score_body(user: str, cands: list[tuple[str, str]]) -> dict[str, Any]:
    return {"user_id": user, "candidates": [{"item_id": i, "category_id": c} for i, c in cands]}


def _ingest(client: httpx.Client, user: str, history: list[tuple[str, str]]) -> httpx.Response:
    """Posts the history as events (ts increasing, event ids unique per user)."""
    events = [
        {"user_id": user, "item_id": i, "category_id": c, "ts": 100 + k, "event_id": f"{user}-{k}"}
        for k, (i, c) in enumerate(history)
    ]
    return client.post("/v1/events", json={"events": events}, headers={"X-API-Key": INGEST})


def test_ingest_then_score_over_http_matches_the_loader(
    server: Server, service_model_repo: Path
) -> None:
    history = [("i5", "c5"), ("i6", "c6"), ("i13", "c5")]
    cands = [("i1", "c1"), ("i2", "c2"), ("i77", "c5")]
    with httpx.Client(base_url=server.url) as client:
        posted = _ingest(client, "e2e", history)
        assert posted.status_code == 202
        assert posted.json() == {"accepted": 3, "duplicates": 0, "ignored": 0}
        answer = client.post(
            "/v1/score", json=_score_body("e2e", cands), headers={"X-Request-ID": "e2e-req-1"}
        )
    assert answer.status_code == 200
    assert answer.headers["X-Request-ID"] == "e2e-req-1"
    version = latest_version(service_model_repo, "sarn")
    sarn = open_model(model_dir(service_model_repo, "sarn", version))
    (expected,) = sarn.score([ScoringRequest("e2e", history, cands)])
    assert answer.json()["scores"] == [float(s) for s in expected[:, 0]]
    assert answer.json()["history_source"] == "redis"


def test_a_multi_task_model_answers_three_aligned_lists_over_http(
    server: Server, service_model_repo: Path
) -> None:
    """The multi-task GRU (`gru-mt`) through the real uvicorn process: pCTR, pCVR and pCTCVR
    on the wire, each equal to the loader's column; a single-task answer has no such keys."""
    history = [("i2", "c2"), ("i9", "c1"), ("i30", "c6")]
    cands = [("i3", "c3"), ("i40", "c0"), ("zzz", "c1")]
    with httpx.Client(base_url=server.url) as client:
        assert _ingest(client, "e2e-mt", history).status_code == 202
        answer = client.post("/v1/score", json=_score_body("e2e-mt", cands) | {"model": "gru-mt"})
        single = client.post("/v1/score", json=_score_body("e2e-mt", cands))
    assert answer.status_code == single.status_code == 200
    body = answer.json()
    gru = open_model(
        model_dir(service_model_repo, "gru-mt", latest_version(service_model_repo, "gru-mt"))
    )
    (expected,) = gru.score([ScoringRequest("e2e-mt", history, cands)])  # [K, 3]
    assert gru.output_names == ("scores", "conversion_scores", "ctcvr_scores")
    for j, name in enumerate(gru.output_names):
        assert body[name] == [float(s) for s in expected[:, j]], name
        assert all(0.0 <= p <= 1.0 for p in body[name])
    product = [p * q for p, q in zip(body["scores"], body["conversion_scores"], strict=True)]
    assert max(abs(a - b) for a, b in zip(body["ctcvr_scores"], product, strict=True)) <= 1e-6
    assert body["history_source"] == "redis" and body["model"] == "gru-mt"
    assert "conversion_scores" not in single.json() and b"ctcvr" not in single.content


def test_logs_are_json_lines_carrying_the_request_id(server: Server) -> None:
    with httpx.Client(base_url=server.url) as client:
        client.post(
            "/v1/score",
            json=_score_body("log-user", [("i1", "c1")]),
            headers={"X-Request-ID": "trace-me-42"},
        )
    time.sleep(0.2)
    lines = server.log_lines()  # every line parses as JSON
    mine = [line for line in lines if line.get("request_id") == "trace-me-42"]
    assert any(line.get("endpoint") == "/v1/score" and line.get("status") == 200 for line in mine)
    assert any("execution provider" in line["message"] for line in lines)  # logged at load
    assert not any(INGEST in json.dumps(line) for line in lines)  # keys never logged


def test_metrics_endpoint_serves_prometheus_text(server: Server) -> None:
    with httpx.Client(base_url=server.url) as client:
        client.post("/v1/score", json=_score_body("m", [("i1", "c1")]))
        metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'ctr_request_duration_seconds_bucket{endpoint="/v1/score"' in metrics.text
    assert "ctr_inference_duration_seconds_bucket" in metrics.text


def test_sigterm_drains_then_exits(service_model_repo: Path, tmp_path: Path) -> None:
    server = _start(service_model_repo, tmp_path / "drain.log", CTR_DRAIN_DELAY_S="1.0")
    outcomes: list[tuple[float, int | str]] = []
    stop = threading.Event()
    body = _score_body("load", [(f"i{k}", f"c{k % 8}") for k in range(200)])

    def load() -> None:  # keeps requests in flight across the signal
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not stop.is_set():
                try:
                    status = client.post("/v1/score", json=body).status_code
                    outcomes.append((time.monotonic(), status))
                except httpx.TransportError as exc:
                    outcomes.append((time.monotonic(), type(exc).__name__))
                    time.sleep(0.02)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    # Serving before the signal (a fixed sleep was not enough on a busy box: the first slates
    # were still queued behind the parser when SIGTERM came, and all got the drain's 503).
    wait_until(lambda: any(s == 200 for _, s in outcomes), 30, what="a first answered slate")
    time.sleep(0.2)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with httpx.Client(base_url=server.url) as probe:
        draining = probe.get("/readyz")
        refused = probe.post("/v1/score", json=_score_body("late", [("i1", "c1")]))
    exit_code = server.process.wait(20)
    exited = time.monotonic()
    stop.set()
    for thread in threads:
        thread.join(10)
    assert draining.status_code == 503
    assert "draining" in draining.json()["reasons"]
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    statuses = [s for _, s in outcomes]
    assert 200 in statuses
    assert set(statuses) <= {200, 503, "ConnectError", "RemoteProtocolError", "ReadError"}
    # Before the listener closed (the drain delay), every request got an HTTP answer.
    assert all(isinstance(s, int) for t, s in outcomes if t < signalled + 0.9)
    assert exit_code in (0, -signal.SIGTERM)
    assert exited - signalled < 10
    messages = [line["message"] for line in server.log_lines()]
    assert "service stopped" in messages


# A library that warns once, the first time the serving stack imports onnxruntime. No real
# dependency can be made to warn on purpose (redis-py's Retry warning, the one that broke these
# logs, is fixed), so this stand-in raises an ordinary `warnings.warn` from a finder on
# sys.meta_path: the same path any library's import-time warning takes.
WARNING_LAUNCH = (
    "import sys, warnings\n"
    "class WarnOnImport:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'onnxruntime':\n"
    "            sys.meta_path.remove(self)\n"
    "            warnings.warn('forced library warning', UserWarning)\n"
    "        return None\n"
    "sys.meta_path.insert(0, WarnOnImport())\n" + LAUNCH
)


def test_stderr_holds_only_json_lines_from_start_to_shutdown(
    service_model_repo: Path, tmp_path: Path
) -> None:
    err = tmp_path / "stderr.log"
    server = _start(service_model_repo, tmp_path / "stdout.log", WARNING_LAUNCH, err)
    with httpx.Client(base_url=server.url) as client:
        assert _ingest(client, "json-only", [("i1", "c1")]).status_code == 202
        assert client.post("/v1/score", json=_score_body("json-only", [("i2", "c2")])).is_success
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(20) in (0, -signal.SIGTERM)
    lines = [line for line in err.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line on stderr: {line!r}") from None
    assert all(isinstance(r, dict) and {"level", "logger", "message"} <= r.keys() for r in records)
    messages = [r["message"] for r in records]
    assert "service started" in messages and "service stopped" in messages
    warned = [r for r in records if r["logger"] == "py.warnings"]
    # The forced one, as a warning record; and nothing else: the redis-py Retry warning is gone.
    assert len(warned) == 1, warned
    assert warned[0]["level"] == "warning" and "forced library warning" in warned[0]["message"]
