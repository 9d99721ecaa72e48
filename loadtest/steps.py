"""Per-step statistics of a stepped load test, from snapshots of locust's cumulative stats.

Locust keeps, per request name, cumulative counts and a histogram of response times (ms,
rounded as locust rounds them). The load shape takes a snapshot when a step has settled
(`settle_s` after its users were asked for, so the ramp-up is left out) and another when the
step ends; the difference is that step's steady window.

In distributed runs the master's stats lag the workers by their report interval (about 3 s),
so a window there is shifted by up to that much; on one process it is exact. Percentiles are
nearest-rank over locust's rounded histogram (it keeps whole ms below 100 ms, then 10 ms and
100 ms buckets), so they can differ by one bucket from locust's own CSV columns.

Request names: the locustfiles report shed answers (429/503) under `<name> [shed]`, a row of
their own, never as failures; every other non-2xx answer is a failure.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

SHED_SUFFIX = " [shed]"
SHED_STATUSES = (429, 503)
PERCENTILES = {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}


class _Entry(Protocol):
    num_requests: int
    num_failures: int
    response_times: dict[int, int]


@dataclass
class EntrySnapshot:
    requests: int
    failures: int
    response_times: dict[int, int]  # rounded ms -> count


Snapshot = dict[str, EntrySnapshot]  # request name -> cumulative counts


def snapshot(entries: Mapping[tuple[str, str], _Entry]) -> Snapshot:
    """Copies locust's `stats.entries` ({(name, method): StatsEntry})."""
    out: Snapshot = {}
    for (name, _method), entry in entries.items():
        previous = out.get(name)
        times = dict(entry.response_times)
        if previous is not None:  # one name sent with two methods: merge
            for ms, count in previous.response_times.items():
                times[ms] = times.get(ms, 0) + count
            out[name] = EntrySnapshot(
                previous.requests + entry.num_requests,
                previous.failures + entry.num_failures,
                times,
            )
        else:
            out[name] = EntrySnapshot(entry.num_requests, entry.num_failures, times)
    return out


def difference(later: Snapshot, earlier: Snapshot) -> Snapshot:
    """What happened between two snapshots of the same run."""
    out: Snapshot = {}
    for name, entry in later.items():
        before = earlier.get(name, EntrySnapshot(0, 0, {}))
        times = {ms: n - before.response_times.get(ms, 0) for ms, n in entry.response_times.items()}
        out[name] = EntrySnapshot(
            entry.requests - before.requests,
            entry.failures - before.failures,
            {ms: n for ms, n in times.items() if n > 0},
        )
    return out


def percentile(response_times: dict[int, int], fraction: float) -> float:
    """Nearest-rank percentile: the smallest recorded time t with at least
    ceil(fraction x n) of the n requests taking t or less (0 when there are none).

    Computed here rather than with locust's helper: importing locust monkey-patches the whole
    process with gevent, which the runner and the report must not be.
    """
    total = sum(response_times.values())
    rank = max(1, math.ceil(fraction * total - 1e-9))
    seen = 0
    for ms in sorted(response_times):
        seen += response_times[ms]
        if seen >= rank:
            return float(ms)
    return 0.0


@dataclass
class StepPlan:
    """One step of the load shape: `users` concurrent users for `seconds`."""

    users: int
    seconds: float
    user_rate: float = 0.0  # tasks/s per user; 0 = closed loop, no think time

    @property
    def offered_rps(self) -> float | None:
        return self.users * self.user_rate if self.user_rate > 0 else None


@dataclass
class StepResult:
    step: int
    users: int
    offered_rps: float | None
    window_s: float
    requests: int
    failures: int
    shed: int
    rps: float
    score_rps: float  # admitted scoring requests answered per second (any status but shed)
    candidates_per_s: float
    error_rate: float  # failures / requests
    shed_rate: float  # shed / requests
    p50_ms: float
    p95_ms: float
    p99_ms: float
    by_name: dict[str, dict[str, float]] = field(default_factory=dict)


def step_result(
    index: int, plan: StepPlan, window: Snapshot, window_s: float, score_name: str, mean_k: float
) -> StepResult:
    requests = sum(e.requests for e in window.values())
    failures = sum(e.failures for e in window.values())
    shed = sum(e.requests for name, e in window.items() if name.endswith(SHED_SUFFIX))
    score = window.get(score_name, EntrySnapshot(0, 0, {}))
    seconds = max(window_s, 1e-9)
    latency = {key: percentile(score.response_times, q) for key, q in PERCENTILES.items()}
    return StepResult(
        step=index,
        users=plan.users,
        offered_rps=plan.offered_rps,
        window_s=window_s,
        requests=requests,
        failures=failures,
        shed=shed,
        rps=requests / seconds,
        score_rps=score.requests / seconds,
        candidates_per_s=(score.requests - score.failures) * mean_k / seconds,
        error_rate=failures / requests if requests else 0.0,
        shed_rate=shed / requests if requests else 0.0,
        by_name={
            name: {
                "requests": e.requests,
                "failures": e.failures,
                **{k: percentile(e.response_times, q) for k, q in PERCENTILES.items()},
            }
            for name, e in window.items()
            if e.requests
        },
        **latency,
    )


class StepRecorder:
    """Follows a plan of steps; call `tick(now, entries)` about once a second (the shape does).

    Returns the users wanted now, or None when the plan is over. Writes `path` (JSON) after
    every finished step, so an interrupted run still leaves what it measured.
    """

    def __init__(
        self,
        plan: list[StepPlan],
        settle_s: float,
        path: Path | None,
        score_name: str,
        mean_k: float,
    ) -> None:
        self.plan = plan
        self.settle_s = settle_s
        self.path = path
        self.score_name = score_name
        self.mean_k = mean_k
        self.results: list[StepResult] = []
        self._boundaries = _cumulative([p.seconds for p in plan])
        self._settled: tuple[float, Snapshot] | None = None
        self.started = time.time()

    def current(self, elapsed: float) -> int | None:
        for index, end in enumerate(self._boundaries):
            if elapsed < end:
                return index
        return None

    def tick(self, elapsed: float, entries: Mapping[tuple[str, str], _Entry]) -> StepPlan | None:
        index = self.current(elapsed)
        done = len(self.results)
        if done < len(self.plan) and (index is None or index > done):
            self._finish(done, elapsed, entries)
        if index is None:
            return None
        start = self._boundaries[index] - self.plan[index].seconds
        settle = min(self.settle_s, self.plan[index].seconds / 2)
        if self._settled is None and index == len(self.results) and elapsed >= start + settle:
            self._settled = (elapsed, snapshot(entries))
        return self.plan[index]

    def _finish(
        self, index: int, elapsed: float, entries: Mapping[tuple[str, str], _Entry]
    ) -> None:
        if self._settled is None:  # a step shorter than one tick: use the whole step
            start = self._boundaries[index] - self.plan[index].seconds
            self._settled = (start, {})
        since, before = self._settled
        window = difference(snapshot(entries), before)
        self.results.append(
            step_result(
                index, self.plan[index], window, elapsed - since, self.score_name, self.mean_k
            )
        )
        self._settled = None
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        document: dict[str, Any] = {
            "started": self.started,
            "settle_s": self.settle_s,
            "plan": [asdict(p) for p in self.plan],
            "steps": [asdict(r) for r in self.results],
        }
        self.path.write_text(json.dumps(document, indent=2) + "\n")


def _cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def parse_plan(steps: str, seconds: float, user_rate: float) -> list[StepPlan]:
    """'4,8,16' -> three steps of `seconds` each."""
    users = [int(part) for part in str(steps).split(",") if part.strip()]
    if not users or min(users) < 1 or seconds <= 0:
        raise ValueError(f"bad step plan {steps!r} / {seconds}s: users >= 1, seconds > 0")
    return [StepPlan(u, seconds, user_rate) for u in users]
