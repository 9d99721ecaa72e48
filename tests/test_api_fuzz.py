"""The HTTP API against its own OpenAPI document, over HTTP, on a live `ctr serve` (issue 19).

One uvicorn process (`routing_support.launch`: torch made unimportable) on a copy of the
session's model repository, with a routing file and a redis-server this module starts itself
(so a test can SIGSTOP it). Two halves:

- Fuzzing: schemathesis reads the served /openapi.json and generates requests for every
  operation (a bounded, seeded number per operation, so CI sees the same cases every run), with
  the ingest and admin keys where the operation needs them. Every response must be documented
  (status code, content type, headers, body schema), auth must be enforced, and no answer may
  be a 5xx but a scoring request's 504 for a deadline it chose too short: Redis and the models
  are healthy here. schemathesis runs through its strategies (`as_strategy`), not its pytest
  plugin: the plugin's fixture-loaded schemas break on pytest 9.2 (`Function._nodeid` is gone).
- Reachability: every status code the document lists for an operation is produced by one
  directed request, and its body must match the documented schema. A status nothing can
  produce is a contract bug: fix the document, do not skip it here.

The tests share the server and run in file order; the last ones stop it (the drain's 503s).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from routing_support import (
    ADMIN,
    Server,
    corrupt,
    launch,
    publish_copy,
    wait_for,
    wait_ready,
)
from schemathesis import Case, GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation, BaseSchema

from runtime.repository import latest_version, model_dir
from service.store.embedded_redis import RedisServer

pytestmark = pytest.mark.slow
INGEST = "fuzz-ingest"
EXAMPLES = 25  # generated cases per operation and mode (positive, negative)
ROUTING = """
experiments:
  - name: fuzz
    match: {surface: ab}
    variants:
      - {name: control, model: sarn, weight: 1}
"""
Operation = tuple[str, str, int]  # (method, path template, status)
ITEM = {"item_id": "i1", "category_id": "c1"}
NOT_UTF8 = b'{"user_id": "\xff\xfe"}'  # a body that is not text: 400, not 422
JSON = {"content-type": "application/json"}


@dataclass
class Live:
    server: Server
    redis: RedisServer
    repo: Path
    routing: Path
    # What the directed requests produced, by operation and status; the last test checks it
    # against the document.
    reached: set[Operation] = field(default_factory=set)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.server.url, timeout=30, headers=headers)


@pytest.fixture(scope="module")
def live(service_model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("api-fuzz")
    repo = Path(shutil.copytree(service_model_repo, root / "repo"))  # gains a corrupt version
    routing = root / "routing.yaml"
    routing.write_text(ROUTING)
    redis = RedisServer().start()
    server = launch(
        repo,
        root / "server.log",  # stdout and stderr
        CTR_REDIS_URL=redis.url,
        CTR_INGEST_API_KEYS=INGEST,
        CTR_ROUTING_FILE=str(routing),
        # One inference worker and a queue of two: a burst while Redis hangs fills it (429).
        CTR_INFER_WORKERS="1",
        CTR_QUEUE_MAX_REQUESTS="2",
        # A hung Redis holds a batch's history read for 1 s (504 for a short deadline) and
        # never opens the breaker, which would skip the read.
        CTR_REDIS_READ_TIMEOUT_MS="1000",
        CTR_BREAKER_FAILURES="1000",
        CTR_DRAIN_DELAY_S="1.0",
    )
    try:
        wait_ready(server)
        yield Live(server, redis, repo, routing)
    finally:
        os.kill(redis.pid, signal.SIGCONT)
        server.stop()
        redis.close()


@pytest.fixture(scope="module")
def api_schema(live: Live) -> BaseSchema:
    """The served document. A scoring request may ask for a deadline (X-Request-Timeout-Ms,
    5 ms at least) that a batch cannot meet: its documented 504 is an answer, not a server
    error; any other 5xx is (Redis and the models are healthy here)."""
    deadline = {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "504"]}}
    config = SchemathesisConfig.from_dict(
        {"operations": [{"include-path": "/v1/score", "checks": deadline}]}
    )
    return schemathesis.openapi.from_url(f"{live.server.url}/openapi.json", config=config)


def _keys(path: str) -> dict[str, str]:
    """The key each scope's operations need (the ignored_auth check probes without it)."""
    if path == "/v1/events":
        return {"X-API-Key": INGEST}
    if path.startswith(("/v1/admin/", "/v1/users/")):
        return {"X-API-Key": ADMIN}
    return {}


def _no_future_events(case: Case) -> Case:
    """An event's `ts` may lie at most a few minutes ahead of the service's clock: a bound the
    document states in words (it moves with the clock, so no JSON Schema keyword holds it)."""
    if case.operation.path == "/v1/events":
        body: Any = case.body  # positive: {"events": [{..., "ts": number}, ...]}
        for event in body["events"]:
            event["ts"] = min(event["ts"], time.time())
    return case


def _fuzz(operation: APIOperation, mode: GenerationMode) -> None:
    """`EXAMPLES` cases of `mode`, seeded by this function (the same cases every run)."""
    headers = _keys(operation.path)
    cases = operation.as_strategy(mode)
    if mode is GenerationMode.POSITIVE:
        cases = cases.map(_no_future_events)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def run(case: Case) -> None:
        case.call_and_validate(headers=headers)

    run()


def _has_inputs(operation: APIOperation) -> bool:
    return bool(operation.body) or any(True for _ in operation.iter_parameters())


def test_every_operation_answers_as_documented(api_schema: BaseSchema) -> None:
    """Schema-valid and schema-invalid requests to every operation of the served document: all
    of schemathesis's checks (server errors, status codes, content types, headers, body schemas,
    auth enforcement, negative data rejected, positive data accepted, unsupported methods)."""
    failures: list[str] = []
    results = list(api_schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results) >= 9, results
    for operation in operations:
        for mode in GenerationMode:
            try:
                _fuzz(operation, mode)
            except Unsatisfiable:  # no input at all: nothing can be invalid
                assert mode is GenerationMode.NEGATIVE and not _has_inputs(operation)
            except (Exception, FailureGroup) as exc:  # all operations run; all reported
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)


def test_the_service_is_still_ready_after_fuzzing(live: Live) -> None:
    with live.client() as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/score", json={"user_id": "u1", "candidates": [ITEM]}).is_success


# --- reachability --------------------------------------------------------------------------


def _expect(
    live: Live,
    api_schema: BaseSchema,
    operation: tuple[str, str],
    response: httpx.Response,
    status: int,
    code: str | None = None,
) -> None:
    """`response` has `status`, the body the document gives it, and (errors) the `code`."""
    method, path = operation
    assert response.status_code == status, (operation, response.status_code, response.text)
    api_schema[path][method].validate_response(response)
    if code is not None:
        assert response.json()["error"]["code"] == code, response.text
    live.reached.add((method, path, status))


SCORE = ("POST", "/v1/score")
EVENTS = ("POST", "/v1/events")
HISTORY = ("GET", "/v1/users/{user_id}/history")
ERASE = ("DELETE", "/v1/users/{user_id}/history")
MODELS = ("GET", "/v1/models")
RELOAD = ("POST", "/v1/admin/models/{name}/reload")
ROUTING_RELOAD = ("POST", "/v1/admin/routing/reload")
HEALTHZ = ("GET", "/healthz")
READYZ = ("GET", "/readyz")
TOO_LARGE = b'{"pad": "' + b"x" * (1 << 20) + b'"}'  # over the default 1 MiB body limit


def _score(user: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "candidates": [ITEM], **extra}


def _event(user: str = "u1") -> dict[str, Any]:
    return {"events": [{"user_id": user, "item_id": "i1", "category_id": "c1", "ts": 100}]}


def test_every_client_error_and_success_is_reachable(live: Live, api_schema: BaseSchema) -> None:
    check = functools.partial(_expect, live, api_schema)
    with live.client() as anon, live.client(ADMIN) as admin, live.client(INGEST) as ingest:
        check(SCORE, anon.post("/v1/score", json=_score()), 200)
        check(SCORE, anon.post("/v1/score", content=NOT_UTF8, headers=JSON), 400, "bad_request")
        check(SCORE, anon.post("/v1/score", json=_score(model="absent")), 404, "unknown_model")
        check(SCORE, anon.post("/v1/score", content=TOO_LARGE, headers=JSON), 413)
        check(SCORE, anon.post("/v1/score", json=_score(candidates=[])), 422, "invalid_request")

        check(EVENTS, ingest.post("/v1/events", json=_event()), 202)
        check(EVENTS, ingest.post("/v1/events", content=NOT_UTF8, headers=JSON), 400)
        check(EVENTS, anon.post("/v1/events", json=_event()), 401, "unauthorized")
        check(EVENTS, admin.post("/v1/events", json=_event()), 403, "forbidden")
        check(EVENTS, ingest.post("/v1/events", content=TOO_LARGE, headers=JSON), 413)
        check(EVENTS, ingest.post("/v1/events", json={"events": []}), 422, "invalid_request")

        for method, status in (("GET", 200), ("DELETE", 204)):
            operation = HISTORY if method == "GET" else ERASE
            path = "/v1/users/u1/history"
            check(operation, admin.request(method, path), status)
            check(operation, anon.request(method, path), 401, "unauthorized")
            check(operation, ingest.request(method, path), 403, "forbidden")
            check(operation, admin.request(method, "/v1/users/not%20an%20id/history"), 422)

        check(MODELS, anon.get("/v1/models"), 200)
        check(HEALTHZ, anon.get("/healthz"), 200)
        check(READYZ, anon.get("/readyz"), 200)

        reload = "/v1/admin/models/sarn/reload"
        version = latest_version(live.repo, "sarn")
        check(RELOAD, admin.post(reload, json={"version": version}), 200)
        check(RELOAD, admin.post(reload, content=NOT_UTF8, headers=JSON), 400, "bad_request")
        check(RELOAD, anon.post(reload), 401, "unauthorized")
        check(RELOAD, ingest.post(reload), 403, "forbidden")
        check(RELOAD, admin.post("/v1/admin/models/absent/reload"), 404, "unknown_model")
        check(RELOAD, admin.post(reload, json={"version": version + 9}), 404, "unknown_version")
        check(RELOAD, admin.post(reload, content=TOO_LARGE, headers=JSON), 413)
        check(RELOAD, admin.post(reload, json={"version": 1.5}), 422, "invalid_request")

        routing = "/v1/admin/routing/reload"
        check(ROUTING_RELOAD, admin.post(routing), 200)
        check(ROUTING_RELOAD, anon.post(routing), 401, "unauthorized")
        check(ROUTING_RELOAD, ingest.post(routing), 403, "forbidden")
        check(ROUTING_RELOAD, admin.post(routing, content=TOO_LARGE, headers=JSON), 413)
        live.routing.write_text("experiments: 3\n")
        try:
            check(ROUTING_RELOAD, admin.post(routing), 422, "invalid_routing")
        finally:
            live.routing.write_text(ROUTING)


def test_a_version_that_fails_to_load_is_a_503_for_both_reloads(
    live: Live, api_schema: BaseSchema
) -> None:
    source = model_dir(live.repo, "sarn", latest_version(live.repo, "sarn"))
    bad = latest_version(live.repo, "sarn") + 1
    directory = publish_copy(live.repo, "sarn", source, bad, damage=corrupt)
    pinned = ROUTING.replace("weight: 1", f"version: {bad}, weight: 1")
    try:
        with live.client(ADMIN) as admin:
            answer = admin.post("/v1/admin/models/sarn/reload", json={"version": bad})
            _expect(live, api_schema, RELOAD, answer, 503, "model_load_failed")
            live.routing.write_text(pinned)
            answer = admin.post("/v1/admin/routing/reload")
            _expect(live, api_schema, ROUTING_RELOAD, answer, 503, "model_load_failed")
    finally:
        live.routing.write_text(ROUTING)
        shutil.rmtree(directory)


def test_a_hung_redis_gives_the_documented_504_429_and_503s(
    live: Live, api_schema: BaseSchema
) -> None:
    with live.client() as anon, live.client(ADMIN) as admin, live.client(INGEST) as ingest:
        os.kill(live.redis.pid, signal.SIGSTOP)
        try:
            # The history read of the batch hangs past this request's 50 ms deadline.
            late = anon.post("/v1/score", json=_score(), headers={"X-Request-Timeout-Ms": "50"})
            _expect(live, api_schema, SCORE, late, 504, "deadline_exceeded")
            # One batch waits on Redis, two requests fill the queue: the rest are refused.
            burst = _concurrently(live, [_score(f"burst-{k}") for k in range(8)])
            refused = [r for r in burst if r.status_code == 429]
            assert refused and all(r.status_code in (200, 429) for r in burst), burst
            _expect(live, api_schema, SCORE, refused[0], 429)
            down = ingest.post("/v1/events", json=_event())
            _expect(live, api_schema, EVENTS, down, 503, "store_unavailable")
            down = admin.get("/v1/users/u1/history")
            _expect(live, api_schema, HISTORY, down, 503, "store_unavailable")
            down = admin.delete("/v1/users/u1/history")
            _expect(live, api_schema, ERASE, down, 503, "store_unavailable")
        finally:
            os.kill(live.redis.pid, signal.SIGCONT)
        assert anon.post("/v1/score", json=_score()).status_code == 200


def _concurrently(live: Live, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    answers: list[httpx.Response] = []
    start = threading.Barrier(len(bodies))

    def send(body: dict[str, Any]) -> None:
        with live.client() as client:
            start.wait()
            answers.append(client.post("/v1/score", json=body))

    threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return answers


def test_routing_reload_without_a_routing_file_is_a_409(
    live: Live, api_schema: BaseSchema, tmp_path: Path
) -> None:
    """The one status this server cannot give (it has a routing file): a second, plain one."""
    server = wait_ready(launch(live.repo, tmp_path / "plain.log", CTR_MODELS="sarn"))
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": ADMIN}) as admin:
            answer = admin.post("/v1/admin/routing/reload")
        _expect(live, api_schema, ROUTING_RELOAD, answer, 409, "no_routing_file")
    finally:
        server.stop()


def test_draining_gives_the_documented_503s_and_the_log_holds_only_json(
    live: Live, api_schema: BaseSchema
) -> None:
    """Last: stops the module's server (SIGTERM, then a 1 s drain before the listener closes)."""
    live.server.process.send_signal(signal.SIGTERM)
    with live.client() as anon:
        readiness: list[httpx.Response] = []

        def draining() -> bool:
            readiness.append(anon.get("/readyz"))
            return readiness[-1].status_code == 503

        wait_for(draining, what="readiness 503 after SIGTERM")
        refused = anon.post("/v1/score", json=_score())
    _expect(live, api_schema, READYZ, readiness[-1], 503)
    _expect(live, api_schema, SCORE, refused, 503, "draining")
    assert live.server.process.wait(20) in (0, -signal.SIGTERM)
    # stdout and stderr share the log: every line of both must be a JSON object.
    lines = [line for line in live.server.log.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line in the log: {line!r}") from None
        assert isinstance(record, dict) and {"level", "logger", "message"} <= record.keys()


def test_every_documented_status_was_reached(live: Live, api_schema: BaseSchema) -> None:
    documented = {
        (method.upper(), path, int(status))
        for path, item in api_schema.raw_schema["paths"].items()
        for method, operation in item.items()
        for status in operation["responses"]
    }
    assert documented - live.reached == set(), "documented but never produced"
    assert live.reached - documented == set(), "produced but not documented"
