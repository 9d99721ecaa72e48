"""A `ctr serve` child process that a load test or benchmark starts, owns and stops.

The service runs as a real uvicorn process (`python -m slatectr.cli serve`) on a free loopback
port with its embedded Redis (CTR_REDIS_URL is removed from its environment), so nothing
outside the test is touched. Its JSON log goes to a file next to the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

from loadtest.cpu_split import pinned
from service.processes import NotReady, free_port, stop_process, wait_until


class ServiceError(RuntimeError):
    """The service did not start or is not reachable."""


def wait_ready(
    url: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    path: str = "/readyz",
) -> None:
    """Polls `GET {url}{path}` until it answers 200; `ServiceError` says what it last saw."""
    last = "no answer"

    def ready() -> bool:
        nonlocal last
        try:
            answer = httpx.get(f"{url}{path}", timeout=2)
        except httpx.TransportError as exc:
            last = repr(exc)
            return False
        last = f"HTTP {answer.status_code}: {answer.text[:200]}"
        return answer.status_code == 200

    try:
        wait_until(ready, timeout_s, process, interval_s=0.2, what="the service")
    except NotReady as exc:
        raise ServiceError(f"{url}: {exc} ({last})") from None


class LocalService:
    """`with LocalService(repo, log) as svc:` -> `svc.url` serves until the block ends."""

    def __init__(
        self,
        repo: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 120.0,
        ready_path: str = "/readyz",
        cpus: set[int] | None = None,
    ) -> None:
        self.repo = Path(repo)
        self.log = Path(log)
        self.env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        # "/healthz" starts a service that may stay not-ready (CTR_REQUIRE_GPU on a host whose
        # CUDA fails): the models are loaded before it answers, so /readyz is then final.
        self.ready_path = ready_path
        self.cpus = cpus  # where it runs (`loadtest.cpu_split`); None: where the caller does
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
        with self.log.open("ab") as sink, pinned(self.cpus):
            self.process = subprocess.Popen(
                [sys.executable, "-m", "slatectr.cli", "serve"],
                env=environment,
                stdout=sink,
                stderr=sink,
            )
        try:
            wait_ready(self.url, self.ready_timeout_s, self.process, self.ready_path)
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
