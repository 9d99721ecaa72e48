"""Starts and stops the benchmark peer (loadtest/triton/server.py) in its own Python.

`nvidia-pytriton` pins numpy < 2, so it cannot share the project's environment: it goes into a
separate venv (`pip install -e ".[bench]" onnxruntime` there, see docs/performance.md) and
the peer runs with that venv's interpreter. Its Python backend stub links against
`libpython3.x.so`, which a pyenv or venv interpreter does not put on the loader path, hence
`LD_LIBRARY_PATH` set to the interpreter's own LIBDIR (SERVING.md, key finding 5).

The peer runs in a new session (process group) because PyTriton starts `tritonserver` as a
child; stopping signals the whole group so no Triton process outlives the benchmark.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from loadtest.local_service import ServiceError
from service.processes import NotReady, free_port, http_ok, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
PEER_PYTHON_ENV = "CTR_BENCH_PEER_PYTHON"


def find_peer_python(given: Path | None) -> Path:
    """--peer-python, else $CTR_BENCH_PEER_PYTHON, else ./.venv-bench, else this Python if it
    has pytriton."""
    candidates = [given, os.environ.get(PEER_PYTHON_ENV), REPO_ROOT / ".venv-bench/bin/python"]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return Path(candidate)
    if importlib.util.find_spec("pytriton") is not None:
        return Path(sys.executable)
    raise ServiceError(
        "no Python with nvidia-pytriton: create one with `python -m venv .venv-bench && "
        ".venv-bench/bin/pip install -e '.[bench]' onnxruntime` "
        "(or pass --peer-python, or --peer none)"
    )


def python_libdir(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


class TritonPeer:
    """`with TritonPeer(model_dir, python, log) as peer:` -> `peer.url` (Triton HTTP)."""

    def __init__(
        self,
        model_dir: Path,
        python: Path,
        log: Path,
        name: str = "ctr",
        delay_us: int = 0,
        max_batch: int = 64,
        ready_timeout_s: float = 240.0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.python = python
        self.log = log
        self.name = name
        self.delay_us = delay_us
        self.max_batch = max_batch
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TritonPeer:
        self.port, grpc, metrics = free_port(), free_port(), free_port()
        libdir = python_libdir(self.python)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "LD_LIBRARY_PATH": os.pathsep.join(
                p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p
            ),
        }
        command = [
            str(self.python),
            "-m",
            "loadtest.triton.server",
            "--model-dir",
            str(self.model_dir),
            "--name",
            self.name,
            "--http-port",
            str(self.port),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--delay-us",
            str(self.delay_us),
            "--max-batch",
            str(self.max_batch),
        ]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                command, env=env, cwd=REPO_ROOT, stdout=sink, stderr=sink, start_new_session=True
            )
        try:
            self._wait_ready()
        except ServiceError:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        ready = f"{self.url}/v2/models/{self.name}/ready"
        try:
            wait_until(
                lambda: http_ok(ready),
                self.ready_timeout_s,
                self.process,
                interval_s=0.5,
                what="the Triton peer",
            )
        except NotReady as exc:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise ServiceError(f"{exc}; log tail:\n{tail}") from None

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None:
            return
        group = self.process.pid  # a session leader: its pid is the group id
        for sig in (signal.SIGINT, signal.SIGKILL):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # tritonserver may still be exiting after its parent: give it the same grace.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(group):
            time.sleep(0.2)
        if _group_alive(group):
            os.killpg(group, signal.SIGKILL)
        self.process = None

    def __enter__(self) -> TritonPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
