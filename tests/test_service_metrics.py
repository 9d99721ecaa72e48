"""Metrics across processes: prometheus-client multiprocess mode through ServiceMetrics; the
event-loop lag of a live `ctr serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from routing_support import Server, sample, start_server

__all__ = ["start_server"]  # a fixture used below

WORKER = """
from service.metrics import ServiceMetrics
m = ServiceMetrics()
m.rejected.labels("queue_full").inc(3)
m.request_duration.labels("/v1/score", "sarn", "default", "200").observe(0.004)
"""
SCRAPE = "from service.metrics import ServiceMetrics; print(ServiceMetrics().render().decode())"


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_two_worker_processes_are_aggregated_in_one_scrape(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        _python(WORKER, env)
    text = _python(SCRAPE, env)
    assert 'ctr_requests_rejected_total{reason="queue_full"} 6.0' in text
    assert (
        'ctr_request_duration_seconds_count{endpoint="/v1/score",model="sarn",'
        'status="200",variant="default"} 2.0'
    ) in text
    # le="0.005" bucket holds both 4 ms observations: the SLO-sized buckets survive aggregation.
    assert 'le="0.005",model="sarn",status="200",variant="default"} 2.0' in text


def test_every_rejection_reason_is_exported_before_the_first_rejection() -> None:
    """Known label values start at zero (Prometheus' advice): an alert on the rejection rate
    or a dashboard panel sees a series from start-up, not only after the first refusal."""
    text = _python(SCRAPE, {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
    for reason in ("overloaded", "queue_full", "draining", "deadline"):
        assert f'ctr_requests_rejected_total{{reason="{reason}"}} 0.0' in text


def test_a_stalled_event_loop_shows_in_the_loop_lag_histogram(
    service_model_repo: Path, start_server: Callable[..., Server]
) -> None:
    server = start_server(service_model_repo)

    def late() -> float:  # observations over 0.25 s
        metrics = server.metrics()
        count = sample(metrics, "ctr_event_loop_lag_seconds_count")
        return count - sample(metrics, "ctr_event_loop_lag_seconds_bucket", le="0.25")

    before = late()
    # The whole process stopped stands for a loop too busy to run its timers for a second.
    os.kill(server.process.pid, signal.SIGSTOP)
    time.sleep(1.0)
    os.kill(server.process.pid, signal.SIGCONT)
    time.sleep(0.3)  # the late timer runs, and its observation is recorded
    assert late() - before >= 1
