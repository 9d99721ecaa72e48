"""JSON log lines that carry the request id.

Everything the process writes to stderr is one JSON object per line: Python warnings (a
library's DeprecationWarning or UserWarning) are routed through `logging` by
`logging.captureWarnings` and come out as records of level `warning` from the `py.warnings`
logger, like any other library that logs. `ctr serve` configures this before it imports the
serving stack, so warnings raised while those libraries import are caught too.

The request id lives in a context variable set by the HTTP middleware for the duration of a
request, and a logging filter copies it onto every record, so any log line written while
serving a request (engine, store, batcher) carries it. API keys and histories are never logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# Set by `service.tracing` when tracing is on: the current trace id, for every JSON line.
_trace_id_source: Callable[[], str | None] | None = None


def set_trace_id_source(source: Callable[[], str | None]) -> None:
    global _trace_id_source
    _trace_id_source = source


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if _trace_id_source is not None and getattr(record, "trace_id", None) is None:
            trace_id = _trace_id_source()
            if trace_id is not None:
                record.trace_id = trace_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any extras."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._time = ""

    def _iso_time(self, created: float) -> str:
        """The record's second as ISO 8601, formatted once per second (one access line per
        request would otherwise format it every time)."""
        second = int(created)
        if second != self._second:
            self._second, self._time = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        return self._time

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": self._iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            {k: v for k, v in vars(record).items() if k not in _STANDARD and k != "color_message"}
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    """Routes every logger (uvicorn's included) and every Python warning through one JSON
    handler on stderr."""
    # None of these reach a JSON line; looking them up (the caller's frame above all) was a
    # tenth of a millisecond of every request's access line.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)
