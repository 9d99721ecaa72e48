"""OpenTelemetry traces of scoring requests, exported to the SDK's in-memory exporter.

The app is the real one over the session's model repository and a real redis-server; only the
exporter differs from production (OTLP over HTTP), so the spans checked are the ones an
operator's collector would receive.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_support import HISTORY, events_body, run, running, score_body

from service.http.api import build_app
from service.logs import RequestIdFilter
from service.settings import Settings
from service.store.embedded_redis import RedisServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def access_lines() -> Iterator[list[logging.LogRecord]]:
    """The access log's records, through the service's own request-id/trace-id filter."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("service.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)


def _app(repo: Path, redis: RedisServer, exported: InMemorySpanExporter, **settings: Any) -> Any:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    values = {"repo": repo, "redis_url": redis.url, "default_model": "sarn", **settings}
    return build_app(Settings(**values), tracer_provider=provider)


def test_a_callers_trace_continues_through_the_stages_of_a_scoring_request(
    service_model_repo: Path,
    redis_server: RedisServer,
    exported: InMemorySpanExporter,
    access_lines: list[logging.LogRecord],
) -> None:
    app = _app(service_model_repo, redis_server, exported, request_timeout_ms=5000.0)
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"

    async def scenario() -> None:
        async with running(app) as client:
            await client.post("/v1/events", json=events_body("traced", HISTORY))
            exported.clear()
            answer = await client.post(
                "/v1/score", json=score_body(user="traced"), headers={"traceparent": traceparent}
            )
            assert answer.status_code == 200 and answer.json()["history_source"] == "redis"

    run(scenario())
    spans = exported.get_finished_spans()
    mine = [s for s in spans if format(s.context.trace_id, "032x") == TRACE_ID]
    server = next(
        s for s in mine if s.parent is not None and format(s.parent.span_id, "016x") == PARENT_ID
    )
    assert server.name.startswith("POST /v1/score")
    stages = {
        s.name: s
        for s in mine
        if s.parent is not None and s.parent.span_id == server.context.span_id
    }
    assert {"queue", "history", "inference"} <= set(stages), sorted(stages)
    inference = stages["inference"]
    assert inference.attributes is not None
    assert inference.attributes["ctr.batch.candidates"] == 4  # score_body's four candidates
    assert inference.attributes["ctr.batch.requests"] == 1
    assert inference.attributes["ctr.model"] == "sarn"
    # In order, inside the request: queue, then the read, then inference.
    assert _start(stages["queue"]) <= _start(stages["history"]) <= _start(inference)
    assert _end(inference) <= _end(server) and _start(server) <= _start(stages["queue"])
    traced = [r for r in access_lines if getattr(r, "endpoint", None) == "/v1/score"]
    assert traced and getattr(traced[-1], "trace_id", None) == TRACE_ID


def _parent(span: ReadableSpan) -> str | None:
    return format(span.parent.span_id, "016x") if span.parent is not None else None


def _start(span: ReadableSpan) -> int:
    assert span.start_time is not None
    return span.start_time


def _end(span: ReadableSpan) -> int:
    assert span.end_time is not None
    return span.end_time


def test_without_an_endpoint_the_app_is_not_instrumented(tmp_path: Path) -> None:
    # The OpenTelemetry SDK itself may be imported anyway (redis-py 8 loads it for its own
    # observability module); what must not happen is our instrumentation.
    code = (
        "import sys\n"
        "from service.http.api import build_app\n"
        "from service.settings import Settings\n"
        f"app = build_app(Settings(repo={str(tmp_path)!r}))\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry.instrumentation')]\n"
        "instrumented = getattr(app, '_is_instrumented_by_opentelemetry', False)\n"
        "print(loaded, instrumented)\n"
    )
    env_free = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "CTR_OTEL_ENDPOINT": ""}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**_environment(), **env_free},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] False"


# A process-wide provider, as `opentelemetry-instrument` or another library installs one; in a
# subprocess, since the global provider can be set only once per process.
GLOBAL_PROVIDER_RUN = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from service_support import running, score_body
from service.http.api import build_app
from service.settings import Settings

exported = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exported))
trace.set_tracer_provider(provider)
settings = Settings(repo={repo!r}, redis_url={redis!r}, default_model="sarn")


async def server_spans(app):
    exported.clear()
    async with running(app) as client:
        answer = await client.post("/v1/score", json=score_body())
        assert answer.status_code == 200, answer.text
    return [s.name for s in exported.get_finished_spans() if s.kind == trace.SpanKind.SERVER]


print(asyncio.run(server_spans(build_app(settings))))
print(asyncio.run(server_spans(build_app(settings, tracer_provider=provider))))
"""


def test_a_global_provider_gets_no_second_server_span_per_request(
    service_model_repo: Path, redis_server: RedisServer
) -> None:
    # FastAPI >= 0.142 traces every request itself whenever a global provider is set; the
    # service's own tracing is the one that carries the scoring stages, so FastAPI's is off.
    code = GLOBAL_PROVIDER_RUN.format(repo=str(service_model_repo), redis=redis_server.url)
    tests = str(Path(__file__).parent)
    env = {**_environment(), "PYTHONPATH": tests}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    untraced, traced = done.stdout.strip().splitlines()
    assert untraced == "[]"  # no endpoint configured: no spans at all
    assert traced == "['POST /v1/score']"  # the service's own server span, once


def _environment() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("CTR_", "OTEL_"))}
