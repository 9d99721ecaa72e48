"""Locust scenario for the SlateCTR scoring service (`locust -f loadtest/locustfile.py`).

Traffic: mostly `POST /v1/score` (one Zipf-drawn user, a slate of K candidates, the history
read from Redis or sent inline), some `POST /v1/events` (a few fresh clicks of a Zipf-drawn
user, unique event ids). Users, items and histories come from the world the model was
trained on (`--ctr-world`, the `ctr simulate` output), so seeded histories exist in Redis.

Load: `SteppedLoad` runs the plan `--ctr-steps 4,8,16,32` (concurrent users per step, each
`--ctr-step-seconds` long): closed-loop users by default, or `--ctr-user-rate R` requests/s
per user (paced, or Poisson arrivals with `--ctr-arrival poisson`), so the last steps can go
past saturation. Per-step percentiles go to `--ctr-steps-out` (JSON; see loadtest/steps.py).

Outcomes: 2xx with the right number of scores is a success; 429/503 is *shed* load, counted
as a success under its own name `/v1/score [shed]` (so it neither fails the run nor mixes its
fast answers into the latency of admitted requests); anything else is a failure.

Every option is also an env var (`CTR_LT_SLATE=20-100`, ...); `ctr loadtest` sets them.
Distributed: `--processes N`, or `--master`/`--worker` as usual.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locust import FastHttpUser, LoadTestShape, events, task
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment

from loadtest.population import Population, Sampler, parse_range
from loadtest.steps import SHED_STATUSES, SHED_SUFFIX, StepPlan, StepRecorder, parse_plan

SCORE = "/v1/score"
EVENTS = "/v1/events"
_POPULATION: dict[str, Population] = {}
_USER_SEEDS = itertools.count()


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    def add(name: str, default: str, help_text: str) -> None:
        env = "CTR_LT_" + name.upper().replace("-", "_")
        parser.add_argument(
            f"--ctr-{name}",
            default=default,
            env_var=env,
            help=f"{help_text} [{env}]",
            include_in_web_ui=False,
        )

    add("world", "runs/demo/world", "world dir (ctr simulate --out) or events file")
    add("slate", "100", "candidates per score request: N or LOW-HIGH")
    add("history", "0", "inline history length, N or LOW-HIGH; 0 = the stored history (Redis)")
    add("zipf", "1.1", "Zipf exponent of user popularity")
    add("ingest-ratio", "0.1", "fraction of tasks that post events instead of scoring")
    add("ingest-batch", "1-5", "events per POST /v1/events: N or LOW-HIGH")
    add("model", "", "pin this model in score requests (empty: the service's default)")
    add("timeout-ms", "0", "X-Request-Timeout-Ms sent with each score request (0: none)")
    add("api-key", "", "X-API-Key for /v1/events when the service requires one")
    add("steps", "4,8,16,32", "users per step, comma-separated")
    add("step-seconds", "10", "length of each step")
    add("user-rate", "0", "requests/s per user; 0 = closed loop without think time")
    add("arrival", "pacing", "with --ctr-user-rate: pacing (constant) or poisson")
    add("spawn-rate", "100", "users started per second when a step begins")
    add("settle", "2", "seconds at the start of each step left out of its statistics")
    add("steps-out", "", "write per-step statistics (JSON) here")
    add("seed", "0", "random seed of the population and the draws")


def options(environment: Environment) -> Any:
    if environment.parsed_options is None:
        raise RuntimeError("this locustfile needs locust's command-line options")
    return environment.parsed_options


def population(environment: Environment) -> Population:
    """Loaded once per process from the options (workers load their own copy)."""
    opts = options(environment)
    key = f"{opts.ctr_world}|{opts.ctr_history}|{opts.ctr_zipf}|{opts.ctr_seed}"
    if key not in _POPULATION:
        longest = max(parse_range(opts.ctr_history)[1], 1)
        _POPULATION[key] = Population.load(
            opts.ctr_world, longest, float(opts.ctr_zipf), int(opts.ctr_seed)
        )
    return _POPULATION[key]


def classify(resp: ResponseContextManager, expected: int, check: Callable[[Any], bool]) -> float:
    """Success, shed (renamed, not a failure) or failure, for a catch_response block. -> the
    seconds a shed answer asks the client to wait (its Retry-After), else 0."""
    status = resp.status_code
    if status in SHED_STATUSES:
        resp.request_meta["name"] += SHED_SUFFIX
        resp.success()
        return _retry_after_s(resp)
    elif status != expected:
        resp.failure(f"HTTP {status}")
    elif not check(resp.json()):
        resp.failure("unexpected response body")
    else:
        resp.success()
    return 0.0


def _retry_after_s(resp: ResponseContextManager) -> float:
    value = resp.headers.get("Retry-After") if resp.headers is not None else None
    try:
        return max(0.0, float(str(value))) if value is not None else 0.0
    except ValueError:
        return 0.0


MAX_BACKLOG_S = 1.0  # a paced user behind schedule catches up at most this much


class PacedUser(FastHttpUser):
    """Base of the scenario's users: a population sampler and the arrival process.

    With `--ctr-user-rate R` each user starts a task on a schedule of mean gap 1/R (constant
    or exponential, i.e. Poisson arrivals); a task that overruns its gap does not shift the
    schedule, so the offered rate holds as long as the users can keep up (up to
    MAX_BACKLOG_S of catching up). Rate 0: closed loop, the next task starts at once.
    A shed answer's Retry-After is honoured, as a well-behaved client does: a user retrying
    at once would only measure the storm it makes (every refusal still costs the server).
    """

    abstract = True

    def on_start(self) -> None:
        opts = options(self.environment)
        self.sampler: Sampler = population(self.environment).sampler(
            hash((int(opts.ctr_seed), os.getpid(), next(_USER_SEEDS))) & 0xFFFFFFFF
        )
        self.slate = parse_range(opts.ctr_slate)
        self.rate = float(opts.ctr_user_rate)
        self.poisson = opts.ctr_arrival == "poisson"
        self._next_start = time.monotonic()
        self._backoff_s = 0.0

    def back_off(self, seconds: float) -> None:
        """The next task waits at least this long (a shed answer's Retry-After)."""
        self._backoff_s = seconds

    def wait_time(self) -> float:
        backoff, self._backoff_s = self._backoff_s, 0.0
        return max(backoff, self._scheduled_wait())

    def _scheduled_wait(self) -> float:
        if self.rate <= 0:
            return 0.0
        gap = self.sampler.rng.exponential(1 / self.rate) if self.poisson else 1 / self.rate
        now = time.monotonic()
        self._next_start = max(self._next_start + gap, now - MAX_BACKLOG_S)
        return float(max(0.0, self._next_start - now))

    def draw(self, bounds: tuple[int, int]) -> int:
        return int(self.sampler.rng.integers(bounds[0], bounds[1] + 1))


class ScoringUser(PacedUser):
    """One simulated client of the scoring service."""

    host = "http://127.0.0.1:8000"

    def on_start(self) -> None:
        super().on_start()
        opts = options(self.environment)
        self.history = parse_range(opts.ctr_history)
        self.ingest_batch = parse_range(opts.ctr_ingest_batch)
        self.ingest_ratio = float(opts.ctr_ingest_ratio)
        self.model = str(opts.ctr_model)
        self.score_headers = (
            {"X-Request-Timeout-Ms": str(opts.ctr_timeout_ms)}
            if float(opts.ctr_timeout_ms) > 0
            else {}
        )
        self.event_headers = {"X-API-Key": str(opts.ctr_api_key)} if opts.ctr_api_key else {}

    @task
    def act(self) -> None:
        if self.ingest_ratio > 0 and self.sampler.rng.random() < self.ingest_ratio:
            self.ingest()
        else:
            self.score()

    def score(self) -> None:
        user = self.sampler.user()
        k = max(1, self.draw(self.slate))
        body: dict[str, Any] = {
            "user_id": user,
            "candidates": [{"item_id": i, "category_id": c} for i, c in self.sampler.candidates(k)],
        }
        length = self.draw(self.history)
        if length > 0:
            body["history"] = [
                {"item_id": i, "category_id": c} for i, c in self.sampler.history(user, length)
            ]
        if self.model:
            body["model"] = self.model
        with self.client.post(
            SCORE, json=body, headers=self.score_headers, name=SCORE, catch_response=True
        ) as resp:
            self.back_off(classify(resp, 200, lambda answer: len(answer.get("scores", ())) == k))

    def ingest(self) -> None:
        user = self.sampler.user()
        now = time.time()
        batch = [
            {
                "user_id": user,
                "item_id": i,
                "category_id": c,
                "ts": now,
                "event_id": f"lt-{uuid.uuid4().hex}",
            }
            for i, c in self.sampler.candidates(max(1, self.draw(self.ingest_batch)))
        ]
        with self.client.post(
            EVENTS,
            json={"events": batch},
            headers=self.event_headers,
            name=EVENTS,
            catch_response=True,
        ) as resp:
            self.back_off(classify(resp, 202, lambda answer: answer.get("accepted", -1) >= 0))


class SteppedLoad(LoadTestShape):
    """Users per step from `--ctr-steps`; records each step's steady window (loadtest.steps)."""

    recorder: StepRecorder | None = None

    def _recorder(self) -> StepRecorder:
        if self.recorder is None:
            assert self.runner is not None
            opts = options(self.runner.environment)
            plan = parse_plan(
                opts.ctr_steps, float(opts.ctr_step_seconds), float(opts.ctr_user_rate)
            )
            low, high = parse_range(opts.ctr_slate)
            out = opts.ctr_steps_out or None
            self.recorder = StepRecorder(
                plan,
                float(opts.ctr_settle),
                None if out is None else Path(out),
                SCORE,
                (low + high) / 2,
            )
        return self.recorder

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        recorder = self._recorder()
        step: StepPlan | None = recorder.tick(self.get_run_time(), self.runner.stats.entries)
        if step is None:
            return None
        return step.users, float(options(self.runner.environment).ctr_spawn_rate)
