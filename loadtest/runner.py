"""`ctr loadtest`: seed, run locust headless, write the report, gate on the SLO.

With `url` it drives that service and starts nothing; without, it starts `ctr serve` on the
given model repository with an embedded Redis (loadtest.local_service), and stops it after.
Either way the store is seeded through `POST /v1/events` from the world's event log, then
locust runs the stepped scenario of loadtest/locustfile.py as a subprocess (`--processes N`
for N worker processes), and the report directory gets locust's CSV and HTML, steps.json,
summary.json/.md and the plots (loadtest.report).

Exit codes: 0 the SLO holds (or none stated), 1 it is missed, 2 the run could not be made.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.local_service import LocalService, ServiceError, wait_ready
from loadtest.population import parse_range, read_events
from loadtest.report import Slo, machine, write_report
from loadtest.seed import SeedError, seed_histories
from loadtest.steps import parse_plan

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CSV_PREFIX = "locust"
EXIT_OK, EXIT_SLO, EXIT_ERROR = 0, 1, 2


class LoadTestError(RuntimeError):
    """The load test could not be run (service, seeding or locust failed)."""


@dataclass
class LoadTestConfig:
    world: Path  # `ctr simulate --out` directory (or its events.parquet)
    out: Path  # report directory
    url: str | None = None  # None: start a local service on `repo`
    repo: Path | None = None
    steps: str = "4,8,16,32"  # users per step
    step_seconds: float = 10.0
    user_rate: float = 0.0  # requests/s per user; 0 = closed loop
    arrival: str = "pacing"  # or "poisson" (with user_rate)
    settle_s: float = 2.0
    spawn_rate: float = 100.0
    slate: str = "100"  # N or LOW-HIGH
    history: str = "0"  # inline history length; 0 = stored history
    ingest_ratio: float = 0.1
    zipf: float = 1.1
    model: str = ""
    timeout_ms: float = 0.0
    api_key: str = ""
    seed_history: int = 50  # events per user posted before the run; 0 = no seeding
    seed_batch: int = 1000
    workers: int = 0  # locust worker processes (0: one process)
    seed: int = 0
    slo: Slo = field(default_factory=Slo)
    service_env: dict[str, str] = field(default_factory=dict)  # local service only
    locustfile: Path = LOCUSTFILE
    ready_path: str = "/readyz"  # polled before a run against `url`
    user_classes: list[str] = field(default_factory=list)  # default: every class in the file
    locust_args: list[str] = field(default_factory=list)  # extra arguments, passed verbatim

    def validate(self) -> None:
        if self.url is None and self.repo is None:
            raise LoadTestError("give a service URL (--url) or a model repository (--repo)")
        parse_plan(self.steps, self.step_seconds, self.user_rate)
        parse_range(self.slate)
        parse_range(self.history)
        if self.arrival not in ("pacing", "poisson"):
            raise LoadTestError("arrival must be pacing or poisson")
        if not 0 <= self.ingest_ratio <= 1:
            raise LoadTestError("ingest ratio must be within [0, 1]")

    def planned_seconds(self) -> float:
        return len(parse_plan(self.steps, self.step_seconds, self.user_rate)) * self.step_seconds


@dataclass
class LoadTestResult:
    summary: dict[str, Any]
    exit_code: int


@contextlib.contextmanager
def _target(config: LoadTestConfig) -> Iterator[str]:
    """The URL to drive; a local service lives exactly as long as the block."""
    if config.url is not None:
        url = config.url.rstrip("/")
        wait_ready(url, timeout_s=30, path=config.ready_path)
        yield url
        return
    assert config.repo is not None
    with LocalService(config.repo, config.out / "service.log", config.service_env) as service:
        yield service.url


def locust_command(config: LoadTestConfig, url: str) -> list[str]:
    options = {
        "world": config.world,
        "slate": config.slate,
        "history": config.history,
        "zipf": config.zipf,
        "ingest-ratio": config.ingest_ratio,
        "model": config.model,
        "timeout-ms": config.timeout_ms,
        "steps": config.steps,
        "step-seconds": config.step_seconds,
        "user-rate": config.user_rate,
        "arrival": config.arrival,
        "spawn-rate": config.spawn_rate,
        "settle": config.settle_s,
        "steps-out": config.out / "steps.json",
        "seed": config.seed,
    }
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(config.locustfile),
        "--headless",
        "--host",
        url,
        "--csv",
        str(config.out / CSV_PREFIX),
        "--html",
        str(config.out / "report.html"),
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--loglevel",
        "WARNING",
        "--logfile",
        str(config.out / "locust.log"),
    ]
    if config.workers > 0:
        command += ["--processes", str(config.workers)]
    for name, value in options.items():
        command += [f"--ctr-{name}", str(value)]
    return [*command, *config.locust_args, *config.user_classes]


def run_locust(config: LoadTestConfig, url: str) -> list[str]:
    command = locust_command(config, url)
    # The API key travels in the environment, not on a command line others can read.
    env = {**os.environ, "CTR_LT_API_KEY": config.api_key}
    limit = config.planned_seconds() + 60  # start-up, shutdown and report writing
    with (config.out / "locust.out").open("wb") as sink:
        try:
            done = subprocess.run(
                command, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=limit, check=False
            )
        except subprocess.TimeoutExpired:
            raise LoadTestError(f"locust did not finish within {limit:.0f}s") from None
    if done.returncode != 0 or not (config.out / f"{CSV_PREFIX}_stats.csv").exists():
        tail = (config.out / "locust.out").read_text(errors="replace")[-2000:]
        raise LoadTestError(f"locust exited with code {done.returncode}:\n{tail}")
    return command


def run_loadtest(config: LoadTestConfig) -> LoadTestResult:
    config.validate()
    config.out.mkdir(parents=True, exist_ok=True)
    events = read_events(config.world)
    before = machine()
    started = time.time()
    try:
        with _target(config) as url:
            seeded = None
            if config.seed_history > 0:
                seeded = seed_histories(
                    url, events, config.seed_history, config.seed_batch, config.api_key or None
                )
            command = run_locust(config, url)
    except (ServiceError, SeedError) as exc:
        raise LoadTestError(str(exc)) from exc
    extra = {
        "target": config.url or "local ctr serve",
        "url": url,
        "local_service": config.url is None,
        "started": started,
        "duration_s": time.time() - started,
        "machine": before,
        "loadavg_1m_after": machine()["loadavg_1m"],
        "command": shlex.join(command),
        "seeding": None if seeded is None else asdict(seeded),
        "config": {k: str(v) for k, v in asdict(config).items() if k != "api_key"},
    }
    summary = write_report(
        config.out, config.out / CSV_PREFIX, config.out / "steps.json", config.slo, extra
    )
    return LoadTestResult(summary, EXIT_OK if summary["slo"]["passed"] else EXIT_SLO)
