"""The service's HTTP protocol (`service.http.protocol`) in a real uvicorn server on a real
socket: a refusal answered inside the read that brought it, the answers the same as uvicorn's
own protocol gives, and each response in one write.

The engine is the HTTP layer's fake (tests/engine_support.py): it is how a test makes the
service refuse (a real engine refuses only under an overload no test can time exactly).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from engine_support import FakeEngine
from service_support import run, uvicorn_server

from service.http.api import build_app
from service.http.protocol import _Continued, _HeadWithBody
from service.metrics import ServiceMetrics
from service.settings import Settings

_BODY = json.dumps(
    {"user_id": "u42", "candidates": [{"item_id": "i9", "category_id": "c3"}]}
).encode()


class SecondThoughts(FakeEngine):
    """Refuses at the first look and admits at the next (load that fell in between)."""

    def admits_any(self, deadline: float) -> bool:
        super().admits_any(deadline)
        return len(self.admits_asked) > 1


class RequestTasks:
    """Counts the tasks the server starts for requests (uvicorn's `run_asgi` or the rest of
    an early start) through the loop's task factory."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        name = getattr(coro, "__qualname__", "")
        if name in ("RequestResponseCycle.run_asgi", "_Continued.wait"):
            self.names.append(name)
        return asyncio.Task(coro, loop=loop, **kwargs)


@asynccontextmanager
async def _server(engine: FakeEngine, protocol: bool = True) -> AsyncIterator[int]:
    async def open_engine(_: Settings, __: ServiceMetrics, ___: object) -> FakeEngine:
        return engine

    server = uvicorn_server(build_app(Settings(retry_after_s=2), open_engine=open_engine), protocol)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield server.config.port
    finally:
        server.should_exit = True
        await serving


async def _exchange(
    port: int, head: bytes, body: bytes = b"", then: bytes = b""
) -> tuple[bytes, bytes, bytes]:
    """Sends `head`, reads one response (head, body), then sends `body` + `then` and reads
    what comes back within 0.3 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    response_head = await reader.readuntil(b"\r\n\r\n")
    length = int(_header(response_head, b"content-length"))
    response_body = await reader.readexactly(length)
    writer.write(body + then)
    rest = b""
    if then:
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1)
        rest += await reader.readexactly(int(_header(rest, b"content-length")))
    writer.close()
    return response_head, response_body, rest


def _header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    raise KeyError(name)


def _score_head(request_id: bytes = b"req-1") -> bytes:
    return (
        b"POST /v1/score HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nx-request-id: %s\r\n\r\n" % (len(_BODY), request_id)
    )


def test_a_refusal_is_answered_in_the_read_of_its_headers_before_its_body_arrives() -> None:
    """No task is started for it (uvicorn starts one per request), and the connection serves
    the next request once the refused body has come in."""

    async def go() -> None:
        engine, tasks = FakeEngine(), RequestTasks()
        engine.admitting = False
        asyncio.get_running_loop().set_task_factory(tasks)
        async with _server(engine) as port:
            healthz = b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n"
            head, body, after = await _exchange(port, _score_head(), _BODY, then=healthz)
        assert head.startswith(b"HTTP/1.1 429 ")
        assert _header(head, b"retry-after") == b"2"
        assert _header(head, b"x-request-id") == b"req-1"
        assert json.loads(body)["error"]["code"] == "overloaded"
        assert json.loads(body)["request_id"] == "req-1"
        assert after.startswith(b"HTTP/1.1 200 ")  # the body was skipped, not read as a request
        assert tasks.names == ["RequestResponseCycle.run_asgi"]  # the /healthz only
        assert [name for name, _ in engine.calls] == ["stop"]  # never scored

    run(go())


class RefusesAfterAScore(FakeEngine):
    """Admits until it has scored once, then refuses (a load that rose meanwhile)."""

    def admits_any(self, deadline: float) -> bool:
        super().admits_any(deadline)
        return not self.calls


async def _pipelined(port: int, requests: bytes, answers: int) -> list[tuple[bytes, bytes]]:
    """Writes `requests` at once on one connection and reads `answers` responses in turn."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(requests)
    read = []
    for _ in range(answers):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        read.append((head, await reader.readexactly(int(_header(head, b"content-length")))))
    writer.close()
    return read


def test_pipelined_requests_are_answered_in_order_around_a_refusal_in_the_read() -> None:
    """HTTP/1.1 pipelining: a refusal answered in the read, then the next request; and a
    refusal that waited in uvicorn's pipeline behind a scored request (started when that one
    completes, inside its answer's write)."""

    async def go() -> None:
        healthz = b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n"
        refusing = FakeEngine()
        refusing.admitting = False
        async with _server(refusing) as port:
            first = await _pipelined(port, _score_head(b"r1") + _BODY + healthz, 2)
        assert [head[:12] for head, _ in first] == [b"HTTP/1.1 429", b"HTTP/1.1 200"]
        assert json.loads(first[0][1])["request_id"] == "r1"
        assert json.loads(first[1][1]) == {"status": "ok"}

        turning, tasks = RefusesAfterAScore(), RequestTasks()
        asyncio.get_running_loop().set_task_factory(tasks)
        requests = _score_head(b"s1") + _BODY + _score_head(b"s2") + _BODY + healthz
        async with _server(turning) as port:
            second = await _pipelined(port, requests, 3)
        statuses = [head[:12] for head, _ in second]
        assert statuses == [b"HTTP/1.1 200", b"HTTP/1.1 429", b"HTTP/1.1 200"]
        assert [json.loads(body)["request_id"] for _, body in second[:2]] == ["s1", "s2"]
        assert [name for name, _ in turning.calls] == ["score", "stop"]
        assert tasks.names == ["RequestResponseCycle.run_asgi"] * 2  # s1 and /healthz: not s2

    run(go())


@pytest.mark.parametrize("protocol", [True, False], ids=["service", "uvicorn"])
def test_the_refusal_is_the_one_uvicorns_own_protocol_gives(protocol: bool) -> None:
    async def go() -> None:
        engine = FakeEngine()
        engine.admitting = False
        async with _server(engine, protocol) as port:
            head, body, _ = await _exchange(port, _score_head(b"req-2"), _BODY)
        assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        names = sorted(line.partition(b":")[0] for line in head.split(b"\r\n")[1:] if line)
        assert names == [
            b"content-length",
            b"content-type",
            b"date",
            b"retry-after",
            b"server",
            b"x-request-id",
        ]
        assert json.loads(body) == {
            "error": {
                "code": "overloaded",
                "message": (
                    "the request cannot be scored within its deadline at the current load; "
                    "retry later or with a longer X-Request-Timeout-Ms"
                ),
            },
            "request_id": "req-2",
        }

    run(go())


def test_a_request_admitted_after_all_is_scored_by_the_rest_of_its_task() -> None:
    """The protocol's look says "refuse", the middleware's "admit": the request's first step,
    run at once, stops to wait for the body, and a task runs the rest (scoring it)."""

    async def go() -> None:
        engine, tasks = SecondThoughts(), RequestTasks()
        asyncio.get_running_loop().set_task_factory(tasks)
        async with _server(engine) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_score_head())
            await asyncio.sleep(0.05)  # the body comes in a later read
            writer.write(_BODY)
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(int(_header(head, b"content-length")))
            writer.close()
        assert head.startswith(b"HTTP/1.1 200 ")
        assert json.loads(body)["scores"] == [0.25, 0.5]
        assert [name for name, _ in engine.calls] == ["score", "stop"]
        assert len(engine.admits_asked) == 2
        assert tasks.names == ["_Continued.wait"]

    run(go())


class Writes:
    """A transport that records its writes (what `_HeadWithBody` hands on)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_a_response_head_leaves_with_its_body_in_one_write(loop: asyncio.AbstractEventLoop) -> None:
    writes = Writes()
    transport = _HeadWithBody(writes, loop)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert writes.writes == []
    transport.write(b"ok")
    assert writes.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    transport.write(b"more")  # not a head: straight through
    assert writes.writes[-1] == b"more"
    assert transport.get_extra_info("peername") == "info:peername"


def test_a_head_without_a_body_behind_it_leaves_in_the_next_pass_or_on_close(
    loop: asyncio.AbstractEventLoop,
) -> None:
    writes = Writes()
    transport = _HeadWithBody(writes, loop)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    loop.run_until_complete(asyncio.sleep(0))
    assert writes.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.close()
    assert writes.writes[-1] == b"HTTP/1.1 200 OK\r\n\r\n" and writes.closed
    loop.run_until_complete(asyncio.sleep(0))  # the pending flush finds nothing left
    assert len(writes.writes) == 2


request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_var")


def test_a_continued_coroutine_gets_its_result_and_its_cancellation() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        seen: list[str] = []

        async def waits(future: asyncio.Future[str]) -> None:
            token = request_var.set("set in the first step")
            try:
                seen.append(await future)
                seen.append(await future)  # a done future: no second suspension
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                request_var.reset(token)  # a ValueError in any other context than the first's
                seen.append("reset")

        future: asyncio.Future[str] = loop.create_future()
        coroutine = waits(future)
        context = contextvars.copy_context()
        pending = context.run(coroutine.send, None)
        assert pending is future  # suspended on it
        task = loop.create_task(_Continued(coroutine, pending, context).wait())
        future.set_result("answer")
        await asyncio.sleep(0.05)
        assert seen == ["answer", "answer"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen[-2:] == ["cancelled", "reset"]

    run(go())
