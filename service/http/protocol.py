"""The HTTP/1.1 protocol `ctr serve` runs: uvicorn's own (httptools), with two changes for the
one event loop that every request shares.

* **A request the service refuses from its headers is answered in the read that brought
  them.** uvicorn starts every request as a task, and a task's first step waits for the loop's
  next pass, behind whatever that pass has queued: the answers of a finished batch, other
  requests' parses. At 2x saturation that wait was most of a refusal's time: p99 5.0 ms from
  the read to the first line of the app, against 0.8 ms from there to the last byte
  (docs/performance.md, "Ninth pass"). So when `refused_early` says a `POST /v1/score` will
  be refused (no model can answer a request of its usual size by its deadline), the request's
  first step runs at once, inside this read. It still goes through the whole app, whose
  middleware decides again, answers, counts and logs it as any other request; only the wait
  for the next pass is gone. Should the app not finish in that step after all (the load fell
  in between and it was admitted), the rest runs as the task it would have been.
* **A response's head and body leave in one write.** uvicorn writes them separately: two
  system calls and two TCP segments per response. (On the 2-core VM of docs/performance.md
  the loop's time in writes stayed the same: there a write costs the reader's wake-up.)

`uvicorn --factory service.http.api:create_app` runs uvicorn's protocol instead: the same
answers, without these two.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Coroutine, Generator
from typing import Any

from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.http.middleware import refused_early
from service.http.shortcut import is_score


def scoring_protocol(app: FastAPI) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's `Config(http=...)`, answering for `app`."""

    class ScoringProtocol(_ScoringProtocol):
        served = app

    return ScoringProtocol


class _ScoringProtocol(HttpToolsProtocol):
    served: FastAPI

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_HeadWithBody(transport, self.loop))  # type: ignore[arg-type]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        scope = cycle.scope
        if not (is_score(scope) and refused_early(self.served, scope, time.monotonic())):  # type: ignore[arg-type]
            super()._start_asgi_task(cycle, app)
            return
        # One context per request, as uvicorn's task would have
        reset = self.config.reset_contextvars
        context = contextvars.Context() if reset else contextvars.copy_context()
        coroutine = cycle.run_asgi(app)
        try:
            pending = context.run(coroutine.send, None)
        except StopIteration:
            return  # answered
        task = self.loop.create_task(_Continued(coroutine, pending, context).wait())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)


class _Continued:
    """A coroutine already run up to its first suspension (on `pending`, the future it
    yielded), to be awaited by a task for the rest: what `yield from` does, minus the first
    step. Each step runs in `context`, the one its first step ran in (a context variable set
    there is reset there; `create_task(context=...)` would need Python 3.11)."""

    def __init__(
        self, coroutine: Coroutine[Any, Any, None], pending: Any, context: contextvars.Context
    ) -> None:
        self._coroutine = coroutine
        self._pending = pending
        self._context = context

    async def wait(self) -> None:
        await self

    def __await__(self) -> Generator[Any, None, None]:
        coroutine, pending, run = self._coroutine, self._pending, self._context.run
        while True:
            try:
                yield pending
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as exc:  # thrown in by the task: cancellation
                try:
                    pending = run(coroutine.throw, exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = run(coroutine.send, None)
                except StopIteration:
                    return


class _HeadWithBody:
    """The connection's transport, holding a response head back until the body's write (or
    the loop's next pass, for a head with no body right behind it) so that both leave in one
    write. Bytes go out in the order they were written; everything else is the transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held = b""

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif data.startswith(b"HTTP/1.1 "):  # uvicorn writes a response's head on its own
            self._held = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held and not self._transport.is_closing():
            self._transport.write(self._held)
        self._held = b""

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
