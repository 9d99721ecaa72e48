"""`ctr bench overhead`: what the service adds to its model, and how it holds in a burst and
past saturation, in one run, on one model, on this machine.

1. Concurrency 1: K candidates, each user's L events stored in Redis (seeded through the API).
   Rounds interleave one `/v1/score`, one `/healthz` and the model alone in-process on the same
   request (`LoadedModel.score`, history included); overhead = HTTP p50 − model p50, also
   given net of the `/healthz` floor. The client is `http.client` on a kept-alive connection:
   httpx alone adds 2 ms per request, which is the client's cost, not the service's. The mean
   of every stage comes from the service's own `ctr_stage_duration_seconds`. Then the same in
   CPU time: what one `/v1/score` and one `/healthz` cost the service's process (from
   /proc/PID/stat, its threads together, and its main thread, the event loop, apart; the
   embedded redis-server is a child, not counted) and what the model alone costs in-process
   on one thread, as the service's worker runs it.
   CPU time hardly moves with neighbours on a shared host, where wall times swing 10×. Before
   all of it, the machine's idle penalty (`loadtest.idle_penalty`): how much more CPU the same
   code takes right after its thread slept, which every stage of a request at concurrency 1
   pays.
2. A burst: `burst_requests` requests of `burst_slate` candidates over `burst_clients`
   connections at once, at the service's default deadline.
3. Saturation (closed loop, `clients` connections) -> goodput μ; then open-loop Poisson arrivals at
   0.5, 1, 1.5 and 2 μ: per step the goodput (200/s), the shares of 429 and 504 (and of 504s
   after a model run, from the service's `ctr_batch_requests`: work spent for nothing), and
   the p99 of the refusals' latency: as the client saw it from each request's scheduled
   start, from the moment the generator actually sent it (the generator's own delay left
   out), and as the service's own `ctr_request_duration_seconds` did (from the middleware
   on: the difference waited before the service's code ran, or in the client). The load
   comes from `loadtest.http_load`: one event loop, requests encoded before the clock starts.
4. Saturation goodput with each of `workers` inference workers (a restart per setting).

With `service_cpus` and `generator_cpus` (`--service-cpus`, `--generator-cpus`) the service and
this process, which sends the load, run on CPUs of their own (`loadtest.cpu_split`).

Targets (issue 17): overhead ≤ 1 ms; the burst all 200 on a quiet box; at 2× saturation goodput
≥ 90% of the peak, 504s ≤ 1% at every step, refusals answered within 5 ms.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import statistics
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from loadtest import http_load
from loadtest.cpu_split import format_cpu_list, pinned
from loadtest.http_load import Answer, post_request
from loadtest.idle_penalty import idle_penalty
from loadtest.local_service import LocalService
from loadtest.population import Population, read_events
from loadtest.report import machine
from loadtest.seed import seed_histories

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

    from runtime.loader import LoadedModel

STAGES = ("parse", "queue", "history", "encode", "infer", "respond")
LOAD_STEPS = (0.5, 1.0, 1.5, 2.0)
SATURATION_REQUESTS = 2000  # encoded ahead, taken in turn by the closed-loop clients


@dataclass
class OverheadConfig:
    repo: Path
    world: Path
    out: Path
    model: str = "gru"
    slate: int = 100  # K at concurrency 1
    history: int = 50  # L events stored per user
    rounds: int = 400
    burst_requests: int = 128
    burst_slate: int = 50
    burst_clients: int = 32
    clients: int = 16  # closed-loop saturation
    step_seconds: float = 8.0
    workers: list[int] = field(default_factory=lambda: [1, 2])
    users: int = 200  # seeded users the requests draw from
    service_cpus: set[int] | None = None  # where the service runs (`loadtest.cpu_split`)
    generator_cpus: set[int] | None = None  # where this process, the load's sender, runs


class Client:
    """One kept-alive HTTP/1.1 connection (http.client: tens of µs per request)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        self._connection = http.client.HTTPConnection(host, parts.port, timeout=30)

    def post(self, path: str, body: bytes) -> Answer:
        start = time.perf_counter()
        self._connection.request("POST", path, body, {"content-type": "application/json"})
        response = self._connection.getresponse()
        response.read()
        return Answer(response.status, time.perf_counter() - start)

    def get(self, path: str) -> Answer:
        start = time.perf_counter()
        self._connection.request("GET", path)
        response = self._connection.getresponse()
        response.read()
        return Answer(response.status, time.perf_counter() - start)

    def close(self) -> None:
        self._connection.close()


def _body(user: str, candidates: list[tuple[str, str]]) -> bytes:
    items = [{"item_id": i, "category_id": c} for i, c in candidates]
    return json.dumps({"user_id": user, "candidates": items}).encode()


def _p(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else float("nan")


def concurrency_one(
    config: OverheadConfig, url: str, pid: int, population: Population
) -> dict[str, Any]:
    """Interleaved rounds of HTTP, /healthz and the model alone; stage means from /metrics;
    then the CPU costs (`cpu_costs`) of the service process `pid`."""
    from runtime.loader import ScoringRequest, open_model
    from runtime.repository import latest_version, model_dir

    directory = model_dir(config.repo, config.model, latest_version(config.repo, config.model))
    model = open_model(directory, intra_op_threads=1)
    sampler = population.sampler(1)
    client, http_s, health_s, model_s = Client(url), [], [], []
    before = _stage_sums(url)
    for _ in range(config.rounds):
        user = sampler.user()
        candidates = sampler.candidates(config.slate)
        answer = client.post("/v1/score", _body(user, candidates))
        if answer.status == 200:
            http_s.append(answer.seconds)
        health_s.append(client.get("/healthz").seconds)
        request = ScoringRequest(user, sampler.history(user, config.history), candidates)
        start = time.perf_counter()
        model.score([request])
        model_s.append(time.perf_counter() - start)
    stages = _stage_means(before, _stage_sums(url))
    cpu = cpu_costs(config, client, pid, population, model)
    client.close()
    http_p50, model_p50, health_p50 = (statistics.median(v) for v in (http_s, model_s, health_s))
    return {
        "answered": len(http_s),
        "http_p50_ms": http_p50 * 1e3,
        "model_p50_ms": model_p50 * 1e3,
        "healthz_p50_ms": health_p50 * 1e3,
        "overhead_ms": (http_p50 - model_p50) * 1e3,
        "overhead_net_of_healthz_ms": (http_p50 - model_p50 - health_p50) * 1e3,
        "stage_mean_ms": stages,
        "cpu_ms": cpu,
    }


def cpu_costs(
    config: OverheadConfig, client: Client, pid: int, population: Population, model: LoadedModel
) -> dict[str, float]:
    """CPU ms per request: the service's process for `/v1/score` and for `/healthz`, the model
    alone in this process (nothing else runs here meanwhile), and their difference."""
    from runtime.loader import ScoringRequest

    sampler = population.sampler(4)
    users = [sampler.user() for _ in range(config.rounds)]
    slates = [sampler.candidates(config.slate) for _ in users]
    bodies = [_body(user, slate) for user, slate in zip(users, slates, strict=True)]
    requests = [
        ScoringRequest(user, sampler.history(user, config.history), slate)
        for user, slate in zip(users, slates, strict=True)
    ]

    def service_ms(call: Callable[[int], Answer]) -> tuple[float, float]:
        """CPU ms per call: the whole process, and its event loop."""
        before, loop_before = process_cpu_seconds(pid), main_thread_cpu_seconds(pid)
        for i in range(len(bodies)):
            call(i)
        spent = process_cpu_seconds(pid) - before, main_thread_cpu_seconds(pid) - loop_before
        return spent[0] / len(bodies) * 1e3, spent[1] / len(bodies) * 1e3

    score, score_loop = service_ms(lambda i: client.post("/v1/score", bodies[i]))
    health, _ = service_ms(lambda _: client.get("/healthz"))
    start = time.process_time()
    for request in requests:
        model.score([request])
    alone = (time.process_time() - start) / len(requests) * 1e3
    return {
        "score": score,
        "score_loop": score_loop,
        "score_other_threads": score - score_loop,
        "healthz": health,
        "model": alone,
        "overhead": score - alone,
    }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc; its threads together)."""
    return _cpu_seconds(Path(f"/proc/{pid}/stat"))


def main_thread_cpu_seconds(pid: int) -> float:
    """The same for the process's main thread alone: in `ctr serve`, uvicorn's event loop."""
    return _cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))


def _cpu_seconds(stat_file: Path) -> float:
    fields = stat_file.read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stage_sums(url: str) -> dict[str, tuple[float, float]]:
    """Cumulative (seconds, observations) of every stage, from the service's /metrics."""
    sums: dict[str, list[float]] = {stage: [0.0, 0.0] for stage in STAGES}
    for sample in _samples(url):
        stage = sample.labels.get("stage")
        if sample.name.startswith("ctr_stage_duration_seconds") and stage in sums:
            if sample.name.endswith("_sum"):
                sums[stage][0] = sample.value
            elif sample.name.endswith("_count"):
                sums[stage][1] = sample.value
    return {stage: (total, count) for stage, (total, count) in sums.items()}


def _overload_counters(url: str) -> tuple[float, dict[float, float], dict[float, float]]:
    """From one read of the service's /metrics: the requests that have reached a model run so
    far (`ctr_batch_requests`' sum), its own histogram of refused scoring requests (429 and 503
    under `/v1/score`, every model and variant together) and its event loop's lag, both as
    cumulative counts per bucket bound."""
    ran, refusals, lag = 0.0, dict[float, float](), dict[float, float]()
    for s in _samples(url):
        labels = s.labels
        if s.name == "ctr_batch_requests_sum":
            ran += s.value
        elif s.name == "ctr_event_loop_lag_seconds_bucket":
            lag[float(labels["le"])] = s.value
        elif (
            s.name == "ctr_request_duration_seconds_bucket"
            and labels.get("endpoint") == "/v1/score"
            and labels.get("status") in ("429", "503")
        ):
            bound = float(labels["le"])
            refusals[bound] = refusals.get(bound, 0.0) + s.value
    return ran, refusals, lag


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The smallest bucket bound under which a share `q` of the observations made between two
    readings of a cumulative histogram fell (an upper bound on their q-quantile); nan if none
    were made."""
    total = after.get(math.inf, 0.0) - before.get(math.inf, 0.0)
    if total <= 0:
        return math.nan
    return next(b for b in sorted(after) if after[b] - before.get(b, 0.0) >= q * total)


def _samples(url: str) -> Iterator[Sample]:
    """Every sample of the service's /metrics page, read once."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(_metrics(url)):
        yield from family.samples


def _metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as page:
        return str(page.read().decode())


def _stage_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    means = {}
    for stage in STAGES:
        seconds = after[stage][0] - before[stage][0]
        count = after[stage][1] - before[stage][1]
        means[stage] = seconds / count * 1e3 if count else float("nan")
    return means


def _requests(url: str, population: Population, slate: int, count: int) -> list[bytes]:
    """`count` scoring requests, encoded before any is timed (the same draw every run)."""
    sampler = population.sampler(2)
    return [
        post_request(url, "/v1/score", _body(sampler.user(), sampler.candidates(slate)))
        for _ in range(count)
    ]


def burst(config: OverheadConfig, url: str, population: Population) -> dict[str, Any]:
    requests = _requests(url, population, config.burst_slate, config.burst_requests)
    answers = http_load.burst(url, requests, config.burst_clients)
    return {"requests": len(answers), **_statuses(answers)}


def _statuses(answers: list[Answer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for answer in answers:
        counts[str(answer.status)] = counts.get(str(answer.status), 0) + 1
    return dict(sorted(counts.items()))


def saturation(url: str, population: Population, slate: int, clients: int, seconds: float) -> float:
    """Goodput (200/s) of `clients` closed-loop clients."""
    requests = _requests(url, population, slate, SATURATION_REQUESTS)
    answers = http_load.closed_loop(url, requests, clients, seconds)
    return sum(a.status == 200 for a in answers) / seconds


def open_loop(
    url: str, population: Population, slate: int, rate: float, seconds: float
) -> dict[str, Any]:
    """Poisson arrivals at `rate`/s for `seconds`: every request sent on schedule, none
    retried (what a fleet of independent clients looks like to one replica)."""
    rng = np.random.default_rng(3)
    gaps = rng.exponential(1 / rate, int(rate * seconds * 1.2) + 1)
    starts = [float(t) for t in np.cumsum(gaps) if t < seconds]
    requests = _requests(url, population, slate, len(starts))
    ran_before, refusals_before, lag_before = _overload_counters(url)
    connections = min(256, max(16, int(rate * 0.25)))
    answers = http_load.open_loop(url, requests, starts, connections)
    ok = [a for a in answers if a.status == 200]
    ran_after, refusals_after, lag_after = _overload_counters(url)
    ran = ran_after - ran_before
    in_service = bucket_quantile(refusals_before, refusals_after, 0.99)
    refusals = [a for a in answers if a.status in (429, 503)]
    refused = [a.seconds for a in refusals]
    return {
        "offered_per_s": len(answers) / seconds,
        "goodput_per_s": len(ok) / seconds,
        "share_429_503": len(refused) / len(answers),
        "share_504": sum(a.status == 504 for a in answers) / len(answers),
        # 504s of requests that had reached a model run (work spent on them), the rest
        # were answered before any inference
        "share_504_after_run": max(0, ran - len(ok)) / len(answers),
        "refusal_p99_ms": _p(refused, 0.99) * 1e3,
        # the same from the moment the generator started each one (its own delay left out)
        "refusal_p99_sent_ms": _p([a.seconds - a.late for a in refusals], 0.99) * 1e3,
        # the same refusals from the middleware's start to their last byte (a bucket bound):
        # what the client saw beyond it waited before the service's code, or in the client
        "refusal_p99_in_service_ms": in_service * 1e3,
        # how late the service's loop ran its 0.1 s timer (a bucket bound): the wait before
        # a request's first line of service code
        "loop_lag_p99_ms": bucket_quantile(lag_before, lag_after, 0.99) * 1e3,
        "ok_p99_ms": _p([a.seconds for a in ok], 0.99) * 1e3,
        # how late the generator itself started requests (charged in the latencies above)
        "start_late_p99_ms": _p([a.late for a in answers], 0.99) * 1e3,
        "statuses": _statuses(answers),
    }


@contextmanager
def _service(config: OverheadConfig, log: Path, **env: str) -> Iterator[LocalService]:
    env = {"CTR_MODELS": config.model, **env}
    with LocalService(config.repo, log, env, cpus=config.service_cpus) as service:
        yield service


def run_overhead(config: OverheadConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    with pinned(config.generator_cpus):
        return _run_overhead(config, progress)


def _run_overhead(config: OverheadConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    config.out.mkdir(parents=True, exist_ok=True)
    population = Population.load(config.world, config.history)
    population.users = population.users[: config.users]
    population.weights = np.full(len(population.users), 1 / len(population.users))
    frame = read_events(config.world)
    frame = frame[frame["user_id"].isin(set(population.users))]
    result: dict[str, Any] = {"config": _jsonable(asdict(config)), "machine": machine()}
    progress("idle penalty")
    result["idle_penalty_us"] = idle_penalty()
    with _service(config, config.out / "service.log") as service:
        url = service.url
        assert service.process is not None
        seed_histories(url, frame, config.history)
        progress("concurrency 1")
        result["concurrency_1"] = concurrency_one(config, url, service.process.pid, population)
        progress("burst")
        result["burst"] = burst(config, url, population)
        progress("saturation")
        # The better of two: one short window on a shared box can catch a neighbour's burst,
        # and the steps below are multiples of it.
        peak = max(
            saturation(url, population, config.slate, config.clients, config.step_seconds)
            for _ in range(2)
        )
        result["saturation_per_s"] = peak
        result["steps"] = []
        for factor in LOAD_STEPS:
            progress(f"open loop at {factor}x saturation")
            step = open_loop(url, population, config.slate, peak * factor, config.step_seconds)
            result["steps"].append({"load": factor, **step})
    result["workers"] = []
    for workers in config.workers:
        progress(f"saturation with {workers} inference worker(s)")
        log = config.out / f"service-workers-{workers}.log"
        with _service(config, log, CTR_INFER_WORKERS=str(workers)) as service:
            seed_histories(service.url, frame, config.history)
            rate = saturation(
                service.url, population, config.slate, config.clients, config.step_seconds
            )
        result["workers"].append({"workers": workers, "goodput_per_s": rate})
    (config.out / "overhead.json").write_text(json.dumps(result, indent=2))
    (config.out / "overhead.md").write_text(markdown(result))
    return result


def _idle_lines(cpu_us: dict[str, float] | None) -> list[str]:
    """The machine's idle penalty (`loadtest.idle_penalty`): what waking costs every stage."""
    if not cpu_us:
        return []
    hot = cpu_us["0"]
    return [
        "| idle before each in-process /healthz | CPU µs | × back to back |",
        "|---|---|---|",
        *(
            f"| {'none' if gap == '0' else gap + ' ms'} | {us:.0f} | {us / hot:.2f} |"
            for gap, us in cpu_us.items()
        ),
        "",
    ]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else str(value)


def checks(result: dict[str, Any]) -> list[tuple[str, bool]]:
    """The issue's targets, each with whether this run met it."""
    c1, steps = result["concurrency_1"], result["steps"]
    peak = max(s["goodput_per_s"] for s in steps)
    at_2x = next(s for s in steps if s["load"] == 2.0)
    return [
        ("service overhead ≤ 1 ms (HTTP p50 − model p50)", c1["overhead_ms"] <= 1.0),
        (
            "burst: every request answered 200",
            result["burst"].get("200") == result["burst"]["requests"],
        ),
        ("goodput at 2× saturation ≥ 90% of peak", at_2x["goodput_per_s"] >= 0.9 * peak),
        ("504s ≤ 1% at every step", all(s["share_504"] <= 0.01 for s in steps)),
        (
            "refusals answered within 5 ms (p99)",
            all(s["refusal_p99_ms"] <= 5 for s in steps if s["share_429_503"] > 0),
        ),
    ]


def _cpu_line(config: dict[str, Any]) -> str:
    def where(cpus: list[int] | None) -> str:
        return "any CPU" if cpus is None else f"CPUs {format_cpu_list(set(cpus))}"

    service, generator = where(config["service_cpus"]), where(config["generator_cpus"])
    return f"Service (and its redis-server) on {service}; load generator on {generator}."


def markdown(result: dict[str, Any]) -> str:
    c1, config = result["concurrency_1"], result["config"]
    lines = [
        f"# ctr bench overhead: {config['model']}, K={config['slate']}, L={config['history']}",
        "",
        f"Machine: {result['machine']}",
        "",
        _cpu_line(config),
        "",
        "| concurrency 1 | ms |",
        "|---|---|",
        *(
            f"| {name} | {c1[key]:.2f} |"
            for name, key in (
                ("HTTP p50", "http_p50_ms"),
                ("model alone p50", "model_p50_ms"),
                ("/healthz p50", "healthz_p50_ms"),
                ("**overhead** (HTTP − model)", "overhead_ms"),
                ("overhead net of /healthz", "overhead_net_of_healthz_ms"),
            )
        ),
        *(f"| stage {stage} (mean) | {ms:.3f} |" for stage, ms in c1["stage_mean_ms"].items()),
        "",
        "| CPU per request (service process; model alone in-process, one thread) | ms |",
        "|---|---|",
        *(
            f"| {name} | {c1['cpu_ms'][key]:.2f} |"
            for name, key in (
                ("/v1/score, service", "score"),
                ("of it, the event loop (main thread)", "score_loop"),
                (
                    "of it, every other thread (inference worker, ONNX Runtime)",
                    "score_other_threads",
                ),
                ("model alone", "model"),
                ("**service CPU overhead** (score − model)", "overhead"),
                ("/healthz, service", "healthz"),
            )
        ),
        "",
        *_idle_lines(result.get("idle_penalty_us")),
        f"Burst of {config['burst_requests']} × {config['burst_slate']} candidates from "
        f"{config['burst_clients']} clients: {result['burst']}",
        "",
        f"Saturation (closed loop, {config['clients']} clients, the better of two windows): "
        f"{result['saturation_per_s']:.1f} answered/s",
        "",
        "| load | offered/s | goodput/s | 429+503 | 504 (after a run) | refusal p99 ms "
        "(from its start; in the service, ≤) | event-loop lag p99 ms, ≤ | 200 p99 ms "
        "| start late p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {s['load']}× | {s['offered_per_s']:.1f} | {s['goodput_per_s']:.1f} | "
            f"{s['share_429_503']:.1%} | {s['share_504']:.1%} ({s['share_504_after_run']:.1%}) "
            f"| {s['refusal_p99_ms']:.1f} ({s.get('refusal_p99_sent_ms', math.nan):.1f}; "
            f"{s['refusal_p99_in_service_ms']:g}) | {s.get('loop_lag_p99_ms', math.nan):g} "
            f"| {s['ok_p99_ms']:.1f} | {s.get('start_late_p99_ms', math.nan):.1f} |"
            for s in result["steps"]
        ),
        "",
        "| inference workers | goodput/s |",
        "|---|---|",
        *(f"| {w['workers']} | {w['goodput_per_s']:.1f} |" for w in result["workers"]),
        "",
        "| target | met |",
        "|---|---|",
        *(f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in checks(result)),
    ]
    return "\n".join(lines) + "\n"
