"""`ctr loadtest`: the locust scenario against a real `ctr serve` (uvicorn + embedded Redis).

Two short runs (a few seconds of load each) and unit checks of the step statistics:
* local: the runner starts the service itself, seeds it, runs two steps with scoring and
  ingestion, writes every report file, passes a lax SLO (exit 0) and stops the service;
* external URL, distributed (master + 2 worker processes), a queue of one request so the
  service sheds load, an impossible p99: exit 1, shed answers counted apart from failures,
  the service (not the runner's) still running afterwards, histories seeded via the API.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from loadtest.cpu_split import format_cpu_list, parse_cpu_list
from loadtest.local_service import LocalService
from loadtest.overhead import (
    _idle_lines,
    bucket_quantile,
    main_thread_cpu_seconds,
    process_cpu_seconds,
)
from loadtest.population import Population, parse_range, zipf_weights
from loadtest.report import Slo
from loadtest.seed import event_batches
from loadtest.steps import EntrySnapshot, StepPlan, StepRecorder, difference, percentile

pytestmark = pytest.mark.slow
SLATE = 8
REPORT_FILES = [
    "locust_stats.csv",
    "locust_stats_history.csv",
    "locust_failures.csv",
    "report.html",
    "steps.json",
    "summary.json",
    "summary.md",
    "latency.png",
    "throughput.png",
]


@pytest.fixture(scope="module")
def world(service_model_repo: Path) -> Path:
    """The world the fixture's models were trained on (conftest: REPO/../world)."""
    return service_model_repo.parent / "world"


def _loadtest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "slatectr.cli",
        "loadtest",
        "--slate",
        str(SLATE),
        "--step-seconds",
        "3",
        "--model",
        "sarn",
        "--seed-history",
        "12",
        *args,
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _stats_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_local_run_writes_the_report_and_passes_a_lax_slo(
    service_model_repo: Path, world: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    done = _loadtest(
        "--world",
        str(world),
        "--out",
        str(out),
        "--repo",
        str(service_model_repo),
        "--steps",
        "2,4",
        "--ingest-ratio",
        "0.2",
        "--slo-p99-ms",
        "60000",
        "--slo-error-rate",
        "0.5",
        "--serve-env",
        "CTR_REQUEST_TIMEOUT_MS=5000",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name

    rows = _stats_rows(out / "locust_stats.csv")
    score = int(rows["/v1/score"]["Request Count"])
    ingest = int(rows["/v1/events"]["Request Count"])
    assert score > 0 and ingest > 0
    assert score > ingest  # the mix is mostly scoring (80/20 here)
    assert int(rows["Aggregated"]["Request Count"]) == sum(
        int(r["Request Count"]) for name, r in rows.items() if name != "Aggregated"
    )

    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    totals = summary["totals"]
    assert totals["requests"] == int(rows["Aggregated"]["Request Count"])
    assert totals["rps"] > 0 and totals["score_rps"] > 0
    assert 0 < totals["p50_ms"] <= totals["p95_ms"] <= totals["p99_ms"]
    assert [s["users"] for s in summary["steps"]] == [2, 4]
    for step in summary["steps"]:
        assert step["requests"] > 0 and step["rps"] > 0 and step["window_s"] > 0
        assert 0 < step["p50_ms"] <= step["p95_ms"] <= step["p99_ms"]
        answered = (
            step["by_name"]["/v1/score"]["requests"] - step["by_name"]["/v1/score"]["failures"]
        )
        # every scoring request carries exactly SLATE candidates
        assert step["candidates_per_s"] == pytest.approx(SLATE * answered / step["window_s"])
    assert summary["slo"] == {
        "p99_ms": 60000.0,
        "error_rate": 0.5,
        "passed": True,
        "violations": [],
    }
    # 60 users x 12 events in the fixture's world, all kept (the last 12 per user)
    assert summary["seeding"]["events"] == 720
    assert summary["seeding"]["accepted"] == 720  # a fresh embedded Redis: nothing duplicate
    for name in ("latency.png", "throughput.png"):
        _assert_png(out / name)
    assert "Per step" in (out / "summary.md").read_text()
    assert "locust" in (out / "report.html").read_text().lower()
    with pytest.raises(httpx.TransportError):  # the runner stopped the service it started
        httpx.get(f"{summary['url']}/healthz", timeout=2)


def test_external_url_missed_slo_counts_shed_apart_and_leaves_the_service(
    service_model_repo: Path, world: Path, tmp_path: Path
) -> None:
    env = {
        "CTR_INGEST_API_KEYS": "lt-key",
        "CTR_DEFAULT_MODEL": "sarn",
        "CTR_QUEUE_MAX_REQUESTS": "1",
        "CTR_REQUEST_TIMEOUT_MS": "5000",
    }
    out = tmp_path / "report"
    with LocalService(service_model_repo, tmp_path / "service.log", env) as service:
        done = _loadtest(
            "--world",
            str(world),
            "--out",
            str(out),
            "--url",
            service.url,
            "--steps",
            "12",
            "--workers",
            "2",
            "--ingest-ratio",
            "0",
            "--slo-p99-ms",
            "0.001",
            env={"CTR_LT_API_KEY": "lt-key"},
        )
        assert done.returncode == 1, done.stdout + done.stderr
        assert httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
        history = httpx.get(f"{service.url}/v1/users/u7/history", timeout=5).json()["items"]

    events = pd.read_parquet(world / "events.parquet")
    expected = events[events.user_id == "u7"].sort_values("ts").tail(12)
    assert [h["item_id"] for h in history] == expected["item_id"].tolist()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["slo"]["passed"] is False
    assert summary["slo"]["violations"] and "p99" in summary["slo"]["violations"][0]
    assert summary["local_service"] is False
    shed = summary["by_name"]["/v1/score [shed]"]
    assert shed["requests"] > 0 and shed["failures"] == 0  # 429s: shed, never failures
    assert summary["totals"]["shed"] == shed["requests"]
    assert summary["totals"]["shed_rate"] > 0
    assert summary["by_name"]["/v1/score"]["requests"] > 0  # admitted ones were answered
    assert "--processes 2" in summary["command"]


def test_a_local_service_runs_on_the_cpus_it_is_given_and_sizes_its_workers_from_them(
    service_model_repo: Path, tmp_path: Path
) -> None:
    """`ctr bench overhead --service-cpus`: every thread of the service and of the redis-server
    it starts on the one CPU given, the service's workers sized from that CPU, and the caller's
    own CPUs as they were."""
    mine = os.sched_getaffinity(0)
    cpu = max(mine)
    log = tmp_path / "service.log"
    with LocalService(service_model_repo, log, {"CTR_LOG_LEVEL": "info"}, cpus={cpu}) as service:
        assert service.process is not None
        pid = service.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert children, "the embedded redis-server"
        threads = [int(t.name) for p in [pid, *map(int, children)] for t in _tasks(p)]
        assert {tid: os.sched_getaffinity(tid) for tid in threads} == {t: {cpu} for t in threads}
    assert os.sched_getaffinity(0) == mine
    assert "usable CPUs 1 (affinity and cgroup CPU quota)" in log.read_text()


def _tasks(pid: int) -> list[Path]:
    return list(Path(f"/proc/{pid}/task").iterdir())


def test_cpu_lists_in_the_kernel_format() -> None:
    usable = os.sched_getaffinity(0)
    assert parse_cpu_list(format_cpu_list(usable)) == usable
    assert format_cpu_list({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    for bad in ("", "a", "3-1", "-1", "1,,x"):
        with pytest.raises(ValueError, match="CPU list"):
            parse_cpu_list(bad)
    with pytest.raises(ValueError, match=f"CPUs {max(usable) + 1} are not usable here"):
        parse_cpu_list(str(max(usable) + 1))


# --- step statistics (no processes) ------------------------------------------------------


class _Entry:
    def __init__(self, requests: int, failures: int, times: dict[int, int]) -> None:
        self.num_requests, self.num_failures, self.response_times = requests, failures, times


def test_percentiles_of_a_histogram() -> None:
    times = {10: 50, 20: 45, 100: 5}  # 100 requests
    assert percentile(times, 0.50) == 10
    assert percentile(times, 0.95) == 20
    assert percentile(times, 0.99) == 100
    assert percentile({}, 0.99) == 0


def test_step_windows_leave_out_what_came_before() -> None:
    earlier = {"/v1/score": EntrySnapshot(10, 1, {5: 10})}
    later = {
        "/v1/score": EntrySnapshot(30, 1, {5: 12, 50: 18}),
        "/v1/score [shed]": EntrySnapshot(4, 0, {1: 4}),
    }
    window = difference(later, earlier)
    assert window["/v1/score"] == EntrySnapshot(20, 0, {5: 2, 50: 18})
    assert window["/v1/score [shed]"].requests == 4


def test_recorder_follows_the_plan_and_measures_each_steady_window(tmp_path: Path) -> None:
    plan = [StepPlan(2, 10.0), StepPlan(5, 10.0, user_rate=3.0)]
    recorder = StepRecorder(
        plan, settle_s=2.0, path=tmp_path / "steps.json", score_name="/v1/score", mean_k=10
    )
    entries: dict[tuple[str, str], Any] = {("/v1/score", "POST"): _Entry(0, 0, {})}
    assert recorder.tick(0.0, entries) is plan[0]
    entries = {("/v1/score", "POST"): _Entry(7, 0, {3: 7})}  # ramp-up: left out
    assert recorder.tick(2.0, entries) is plan[0]
    entries = {("/v1/score", "POST"): _Entry(87, 0, {3: 47, 9: 40})}
    assert recorder.tick(10.0, entries) is plan[1]
    assert len(recorder.results) == 1
    first = recorder.results[0]
    assert (first.requests, first.window_s, first.rps) == (80, 8.0, 10.0)
    assert first.candidates_per_s == 100.0  # 10 answered requests/s x 10 candidates
    assert first.offered_rps is None
    assert recorder.tick(20.0, entries) is None
    assert [s["users"] for s in json.loads((tmp_path / "steps.json").read_text())["steps"]] == [
        2,
        5,
    ]
    assert recorder.results[1].offered_rps == 15.0


def test_slo_checks_both_ways() -> None:
    assert Slo(25.0, 0.01).check(24.0, 0.0) == []
    assert len(Slo(25.0, 0.01).check(26.0, 0.02)) == 2
    assert Slo().check(1e9, 1.0) == []


def test_population_draws_zipf_users_and_bounded_inputs() -> None:
    weights = zipf_weights(100, 1.0, seed=3)
    assert weights.sum() == pytest.approx(1.0)
    assert weights.max() / weights.min() == pytest.approx(100.0)  # rank 1 vs rank 100
    frame = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b"],
            "item_id": ["i1", "i2", "i3", "i4"],
            "category_id": ["c1", "c1", "c2", "c2"],
            "ts": [3, 1, 2, 5],
        }
    )
    population = Population.from_events(frame.sort_values(["user_id", "ts"]), history=2)
    sampler = population.sampler(0)
    assert sampler.history("a", 5) == [("i3", "c2"), ("i1", "c1")]  # last 2 by time, oldest first
    assert set(sampler.candidates(20)) <= set(population.catalogue)
    assert parse_range("20-100") == (20, 100) and parse_range("7") == (7, 7)
    with pytest.raises(ValueError):
        parse_range("9-3")
    batches = event_batches(frame.sort_values(["user_id", "ts"]), per_user=2, batch=2)
    assert [len(b) for b in batches] == [2, 1]
    assert [e["item_id"] for b in batches for e in b] == ["i3", "i1", "i4"]


def test_the_overhead_bench_reads_a_process_cpu_time_as_the_process_own_clock_does() -> None:
    """`ctr bench overhead` charges the service's CPU from /proc/PID/stat, and its event loop's
    from the main thread's /proc/PID/task/PID/stat: checked here against this process's own
    clocks while its main thread spins and while another thread spins (ticks are 10 ms)."""
    pid = os.getpid()

    def spin() -> None:
        start = time.thread_time()
        while time.thread_time() - start < 0.3:
            sum(range(1000))

    before, main_before, clock = (
        process_cpu_seconds(pid),
        main_thread_cpu_seconds(pid),
        time.process_time(),
    )
    spin()  # on the main thread
    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    spent = process_cpu_seconds(pid) - before
    assert abs(spent - (time.process_time() - clock)) <= 0.05
    assert abs(main_thread_cpu_seconds(pid) - main_before - 0.3) <= 0.05  # the worker's not in


def test_the_idle_penalty_is_reported_against_the_back_to_back_cost() -> None:
    lines = _idle_lines({"0": 200.0, "3": 500.0})
    assert lines[2:4] == ["| none | 200 | 1.00 |", "| 3 ms | 500 | 2.50 |"]
    assert _idle_lines(None) == []  # a report from before the measurement existed


def test_a_quantile_from_two_readings_of_a_cumulative_histogram_is_its_bucket_bound() -> None:
    """`ctr bench overhead` reads the service's own refusal durations as the difference of two
    scrapes: 100 refusals between them, 60 within 0.5 ms, 98 within 2.5 ms, 100 within 5 ms."""
    before = {0.0005: 10.0, 0.0025: 10.0, 0.005: 10.0, math.inf: 10.0}
    after = {0.0005: 70.0, 0.0025: 108.0, 0.005: 110.0, math.inf: 110.0}
    assert bucket_quantile(before, after, 0.5) == 0.0005
    assert bucket_quantile(before, after, 0.98) == 0.0025
    assert bucket_quantile(before, after, 0.99) == 0.005
    assert math.isnan(bucket_quantile(before, before, 0.99))  # nothing refused in between
