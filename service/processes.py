"""Child processes the service, its tools and its tests start (redis-server, uvicorn, locust,
a Triton peer): a free port to give them, waiting until one is ready, stopping it."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


class NotReady(RuntimeError):
    """A child process exited, or did not become ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (racy by nature: start the
    child on it at once, and retry on a clash)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    probe: Callable[[], bool],
    timeout_s: float,
    process: subprocess.Popen[Any] | None = None,
    interval_s: float = 0.05,
    what: str = "the process",
) -> None:
    """Calls `probe` until it returns True. Raises `NotReady` as soon as `process` (if given)
    has exited, or when `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise NotReady(f"{what} exited with code {process.returncode}")
        if probe():
            return
        if time.monotonic() >= deadline:
            raise NotReady(f"{what} was not ready after {timeout_s:g} s")
        time.sleep(interval_s)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when GET `url` answers 200; False on any other status or a connection error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def stop_process(process: subprocess.Popen[Any] | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; always reaped after.

    SIGTERM first so the child can drain (uvicorn) or flush (redis-server's AOF).
    """
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
