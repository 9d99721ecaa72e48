"""Runs the app under uvicorn with a graceful, observable shutdown (what `ctr serve` calls).

On SIGTERM/SIGINT: readiness turns 503 at once and new scoring requests are refused (503 +
Retry-After); after `drain_delay_s` (time for a load balancer to notice) uvicorn stops
accepting connections, lets in-flight requests finish within `graceful_timeout_s`, then the
lifespan stops the engine (batchers drained, Redis clients closed, embedded Redis stopped).

uvicorn runs the service's HTTP protocol (`service.http.protocol`): refusals answered in the read
that brought them, each response in one write.

One process per container is the documented deployment: metrics need no multiprocess mode and
each process owns one ONNX Runtime session per model (see docs/service.md).
"""

from __future__ import annotations

import math
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.contracts import Engine
from service.http.api import build_app
from service.http.protocol import scoring_protocol
from service.logs import configure_logging
from service.settings import Settings


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that flips the engine to draining before the listener closes."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_delay_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_delay_s = drain_delay_s
        self._drain_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine: Engine | None = getattr(self._app.state, "engine", None)
        if engine is not None:  # None: the signal came before the engine finished starting
            engine.begin_drain()
        if self._drain_started or self._drain_delay_s <= 0:
            super().handle_exit(sig, frame)  # a second signal skips the remaining delay
            return
        self._drain_started = True
        timer = threading.Timer(self._drain_delay_s, self._end_delay, (sig, frame))
        timer.daemon = True
        timer.start()

    def _end_delay(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:  # uvicorn reads a repeated SIGINT as "force exit"
            super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level)
    app = build_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our JSON handler (configure_logging) formats uvicorn's lines too
        access_log=False,  # one JSON access line per request comes from our middleware
        timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s),
        server_header=False,
        lifespan="on",
        http=scoring_protocol(app),
    )
    DrainingServer(config, app, settings.drain_delay_s).run()
