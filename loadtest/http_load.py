"""A load generator for `ctr bench overhead`: HTTP/1.1 over kept-alive connections on one
asyncio event loop, requests encoded before the clock starts.

Why not threads: the generator shares the host with the service it measures (2 cores here),
and a pool of up to 256 `http.client` threads that encode each body as it goes spent a share
of those cores, and made requests start up to ~5 ms late at the 99th percentile (the threads
queue for one interpreter). Here a request costs a socket write and a read of its answer; the
answer's status line and `content-length` are all it parses. What a late start still costs
is charged to the request (latency counts from its scheduled time) and reported apart
(`Answer.late`), so the generator's delay can be told from the service's.

The parser handles what the service sends (`content-length` bodies, `connection: close` after
some errors) and chunked bodies; a connection that breaks mid-request gives status 0 (no
answer) and is reopened for the next request.
"""

from __future__ import annotations

import asyncio
import gc
import re
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

_T = TypeVar("_T")
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
NO_ANSWER = 0  # the status of a request whose connection broke before its answer


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float  # from the request's scheduled start (its creation without a schedule)
    late: float = 0.0  # how late the generator started it against its schedule


def post_request(url: str, path: str, body: bytes) -> bytes:
    """The bytes of one `POST path` with a JSON body, sent as they are."""
    host = urlsplit(url).netloc
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)

    async def exchange(self, request: bytes) -> int:
        """Sends `request`, reads its whole answer, returns its status (`NO_ANSWER` if the
        connection broke; it reopens on the next call)."""
        if self._reader is not None and self._reader.at_eof():
            self.close()  # the server closed it while it was idle (its keep-alive timeout)
        try:
            await self.open()
            assert self._reader is not None and self._writer is not None
            self._writer.write(request)
            head = await self._reader.readuntil(b"\r\n\r\n")
            await self._read_body(head)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.close()
            return NO_ANSWER
        if _CLOSE.search(head):
            self.close()
        return int(head[9:12])

    async def _read_body(self, head: bytes) -> None:
        assert self._reader is not None
        length = _LENGTH.search(head)
        if length:
            await self._reader.readexactly(int(length.group(1)))
        elif _CHUNKED.search(head):
            while size := int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await self._reader.readexactly(size + 2)
            await self._reader.readuntil(b"\r\n")  # the last chunk's end (no trailers sent)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class Load:
    """`connections` kept-alive connections to `url`; a request waits for a free one. They
    are taken in turn, so none idles past the server's keep-alive timeout (uvicorn's 5 s)
    during a step and has to be reopened on the clock."""

    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        self._idle: asyncio.Queue[_Connection] = asyncio.Queue()
        self._all = [_Connection(host, port) for _ in range(connections)]
        for connection in self._all:
            self._idle.put_nowait(connection)

    async def connect_all(self) -> None:
        """Opens every connection before any request is timed, as a fleet of backends keeps
        its connections open. (Opened by their first requests, the connects of a whole step
        waited for the accept of a saturated event loop: every refusal over 50 ms at 2×
        saturation was the first request on its connection.)"""
        await asyncio.gather(*(c.open() for c in self._all))

    async def send(self, request: bytes, scheduled: float | None = None) -> Answer:
        """One request; its latency counts from `scheduled` (monotonic) when given, or from
        when it began if that was earlier: uvloop's timers run on the loop's cached clock, so a
        sleep can end a few milliseconds before the time it was asked for."""
        began = time.monotonic()
        start = began if scheduled is None else min(began, scheduled)
        connection = await self._idle.get()
        try:
            status = await connection.exchange(request)
        finally:
            self._idle.put_nowait(connection)
        return Answer(status, time.monotonic() - start, max(0.0, began - start))

    def close(self) -> None:
        for connection in self._all:
            connection.close()


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """Runs `main` on a fresh event loop (uvloop's where installed) with the garbage collector
    off, as `timeit` times: in the bench's process, which holds its world's data, a full
    collection stopped every request in flight for 30-60 ms (start late p99 14-27 ms at 2×
    saturation, against ~3 ms without)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is in every lock file on Linux
            return asyncio.run(main)
        return uvloop.run(main)
    finally:
        if collecting:
            gc.enable()


def open_loop(
    url: str, requests: Sequence[bytes], starts: Sequence[float], connections: int
) -> list[Answer]:
    """`requests[i]` sent at `starts[i]` seconds from now, whatever came of the ones before
    (open loop); the connections are opened first."""

    async def main() -> list[Answer]:
        load = Load(url, connections)
        await load.connect_all()
        begin = time.monotonic() + 0.2
        tasks = []
        for request, offset in zip(requests, starts, strict=True):
            at = begin + offset
            # One sleep, not a loop until the time: uvloop's timers have whole milliseconds, so
            # a loop would spin through hundreds of passes for a sub-millisecond wait.
            if (wait := at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(load.send(request, at)))
        answers = list(await asyncio.gather(*tasks))
        load.close()
        return answers

    return run(main())


def closed_loop(url: str, requests: Sequence[bytes], clients: int, seconds: float) -> list[Answer]:
    """`clients` clients, each sending its next request when its last one is answered, for
    `seconds`; the requests are taken in turn, from the start again when they run out."""

    async def main() -> list[Answer]:
        load = Load(url, clients)
        await load.connect_all()
        stop = time.monotonic() + seconds
        answers: list[Answer] = []

        async def client() -> None:
            while time.monotonic() < stop:
                answers.append(await load.send(requests[len(answers) % len(requests)]))

        await asyncio.gather(*(client() for _ in range(clients)))
        load.close()
        return answers

    return run(main())


def burst(url: str, requests: Sequence[bytes], connections: int) -> list[Answer]:
    """Every request at once, over `connections` connections opened with them."""

    async def main() -> list[Answer]:
        load = Load(url, connections)
        answers = list(await asyncio.gather(*(load.send(r) for r in requests)))
        load.close()
        return answers

    return run(main())
