"""A `ctr serve` child process that a load test or benchmark starts, owns and stops.

The service runs as a real uvicorn process (`python -m slatectr.cli serve`) on a free loopback
port with its embedded Redis (CTR_REDIS_URL is removed from its environment), so nothing
outside the test is touched. Its JSON log goes to a file next to the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

from service.processes import stop_process
from service.store.embedded_redis import free_port


class ServiceError(RuntimeError):
    """The service did not start or is not reachable."""


def wait_ready(
    url: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    path: str = "/readyz",
) -> None:
    """Polls `GET {url}{path}` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"the service exited with code {process.returncode}")
        try:
            answer = httpx.get(f"{url}{path}", timeout=2)
            if answer.status_code == 200:
                return
            last = f"HTTP {answer.status_code}: {answer.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise ServiceError(f"{url} not ready after {timeout_s:.0f}s ({last})")


class LocalService:
    """`with LocalService(repo, log) as svc:` -> `svc.url` serves until the block ends."""

    def __init__(
        self,
        repo: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
        self.repo = Path(repo)
        self.log = Path(log)
        self.env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalService:
        if not self.repo.is_dir():
            raise ServiceError(f"model repository {self.repo} does not exist")
        self.port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
        environment.update(
            {
                "CTR_REPO": str(self.repo),
                "CTR_PORT": str(self.port),
                "CTR_HOST": "127.0.0.1",
                "CTR_LOG_LEVEL": "warning",
                **self.env,
            }
        )
        environment.pop("CTR_REDIS_URL", None)  # the embedded redis-server, owned by the child
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "slatectr.cli", "serve"],
                env=environment,
                stdout=sink,
                stderr=sink,
            )
        try:
            wait_ready(self.url, self.ready_timeout_s, self.process)
        except ServiceError as exc:
            self.stop()
            tail = self.log.read_text(errors="replace")[-2000:]
            raise ServiceError(f"{exc}; log tail:\n{tail}") from None
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        stop_process(self.process, timeout_s)
        self.process = None

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
