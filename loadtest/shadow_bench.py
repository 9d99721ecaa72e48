"""Benchmark: primary latency with the shadow at 0 % and at 100 % of traffic, same load.

`python -m loadtest.shadow_bench --repo REPO --model din` starts `ctr serve` on REPO (embedded
Redis, loadtest.local_service) with a routing file that sends every user to one variant, the
model at version `--primary` with a shadow at version `--shadow`. It seeds stored histories,
then for each load and each repeat runs both shadow fractions back to back (order alternating
per repeat, so drift on a shared machine hits both alike), switching by rewriting the routing
file and calling the admin reload.

Loads: `--rates` are open-loop arrival rates (requests start on a fixed schedule whatever the
service does, and latency counts from the scheduled start, so a stalled service cannot hide
its queueing: no coordinated omission); they show the service below saturation. `--concurrency`
are closed-loop clients (each sends when its last answer came back): at and above saturation.
Per run: client-side p50 / p99 of the successful answers, throughput, and from /metrics how
many shadow requests were scored or dropped. The table shows medians over the repeats, the
median of the paired (same repeat, back to back) p99 ratios, and the p99 of all repeats'
answers pooled. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from loadtest.local_service import LocalService
from runtime.features import FeatureSpec
from service.processes import NotReady, wait_until

ROUTING = """experiments:
  - name: bench
    variants:
      - name: live
        model: {model}
        version: {primary}
        weight: 1
        shadow: {{model: {model}, version: {shadow}, fraction: {fraction}}}
"""


def _vocab(repo: Path, model: str, version: int) -> list[tuple[str, str]]:
    """(item, category) pairs the model knows, so requests exercise real embeddings."""
    _, vocabs = FeatureSpec.load(repo / model / str(version))
    items, cats = vocabs["item"].tokens, vocabs["category"].tokens
    return [(item, cats[k % len(cats)]) for k, item in enumerate(items)]


def _seed(url: str, pairs: list[tuple[str, str]], users: int, per_user: int) -> None:
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=url, timeout=30) as client:
        for u in range(users):
            picks = rng.integers(0, len(pairs), per_user)
            events = [
                {
                    "user_id": f"b{u}",
                    "item_id": pairs[p][0],
                    "category_id": pairs[p][1],
                    "ts": 1_700_000_000 + k,
                }
                for k, p in enumerate(picks)
            ]
            client.post("/v1/events", json={"events": events}).raise_for_status()


def _shadow_counts(url: str) -> tuple[float, float]:
    """(shadow requests scored, shadow requests dropped) so far."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    scored = dropped = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ctr_shadow_duration_seconds_count":
                scored += s.value
            elif s.name == "ctr_shadow_dropped_total":
                dropped += s.value
    return scored, dropped


async def _closed_loop(
    url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    """`concurrency` clients, each sending the next request when the last answered."""
    latencies: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient, offset: int) -> None:
        nonlocal failures
        k = offset
        while time.perf_counter() < stop_at:
            body = bodies[k % len(bodies)]
            k += concurrency
            start = time.perf_counter()
            try:
                answer = await client.post("/v1/score", json=body)
                ok = answer.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1

    began = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(concurrency)))
    return latencies, failures, time.perf_counter() - began


async def _open_loop(
    url: str, bodies: list[dict[str, Any]], rate: float, seconds: float
) -> tuple[list[float], int, float]:
    """Requests started every 1/rate s; latency from the scheduled start to the answer."""
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)

    async def one(client: httpx.AsyncClient, body: dict[str, Any], scheduled: float) -> None:
        nonlocal failures
        try:
            ok = (await client.post("/v1/score", json=body)).status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            latencies.append(time.perf_counter() - scheduled)
        else:
            failures += 1

    began = time.perf_counter()
    count = int(rate * seconds)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        tasks = []
        for k in range(count):
            scheduled = began + k / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, bodies[k % len(bodies)], scheduled)))
        await asyncio.gather(*tasks)
    return latencies, failures, time.perf_counter() - began


def _shadow_idle(url: str, timeout_s: float = 30.0) -> None:
    """Waits (at most `timeout_s`, then goes on) until no shadow work is queued, so a run is
    not charged for the previous one's."""

    def idle() -> bool:
        listing = httpx.get(f"{url}/v1/models", timeout=10).json()
        return sum(v["shadow_queue_depth"] for m in listing["models"] for v in m["versions"]) == 0

    with contextlib.suppress(NotReady):
        wait_until(idle, timeout_s, interval_s=0.1, what="the shadow queues")


def _use(url: str, routing: Path, text: str) -> None:
    routing.write_text(text)
    httpx.post(f"{url}/v1/admin/routing/reload", timeout=60).raise_for_status()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    routing = out / "routing.yaml"
    texts = {
        f: ROUTING.format(model=args.model, primary=args.primary, shadow=args.shadow, fraction=f)
        for f in (0.0, 1.0)
    }
    routing.write_text(texts[0.0])
    pairs = _vocab(Path(args.repo), args.model, args.primary)
    rng = np.random.default_rng(1)
    bodies = [
        {
            "user_id": f"b{k % args.users}",
            "candidates": [
                {"item_id": pairs[p][0], "category_id": pairs[p][1]}
                for p in rng.integers(0, len(pairs), args.candidates)
            ],
        }
        for k in range(512)
    ]
    env = {
        "CTR_ROUTING_FILE": str(routing),
        "CTR_REQUEST_TIMEOUT_MS": "5000",
        "CTR_MAX_REQUEST_TIMEOUT_MS": "10000",
        "CTR_QUEUE_MAX_REQUESTS": "1024",
        "CTR_DEFAULT_MODEL": args.model,
        "CTR_MODELS": args.model,
    }
    rows: list[dict[str, Any]] = []
    with LocalService(Path(args.repo), out / "service.log", env) as service:
        _seed(service.url, pairs, args.users, args.history)
        loads = [("rate", r) for r in args.rates] + [("clients", c) for c in args.concurrency]
        for kind, level in loads:
            drive = _open_loop if kind == "rate" else _closed_loop
            for repeat in range(args.repeats):
                order = (0.0, 1.0) if repeat % 2 == 0 else (1.0, 0.0)
                for fraction in order:
                    _use(service.url, routing, texts[fraction])
                    asyncio.run(drive(service.url, bodies, level, args.warmup))
                    _shadow_idle(service.url)
                    before = _shadow_counts(service.url)
                    lat, failed, elapsed = asyncio.run(
                        drive(service.url, bodies, level, args.seconds)
                    )
                    after = _shadow_counts(service.url)
                    row = {
                        "load": f"{level} req/s" if kind == "rate" else f"{level} clients",
                        "shadow": fraction,
                        "repeat": repeat,
                        "p50_ms": 1000 * float(np.percentile(lat, 50)),
                        "p99_ms": 1000 * float(np.percentile(lat, 99)),
                        "rps": len(lat) / elapsed,
                        "failed": failed,
                        "shadow_scored": after[0] - before[0],
                        "shadow_dropped": after[1] - before[1],
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row | {"latencies": lat})
    (out / "rows.json").write_text(json.dumps(rows))
    return rows


def _paired_growth(rows: list[dict[str, Any]]) -> float:
    """Median over repeats of p99(100 %) / p99(0 %) - 1, each pair measured back to back: the
    statistic least moved by load that other tenants put on a shared machine."""
    by_repeat: dict[int, dict[float, float]] = {}
    for r in rows:
        by_repeat.setdefault(r["repeat"], {})[r["shadow"]] = r["p99_ms"]
    ratios = [p[1.0] / p[0.0] for p in by_repeat.values() if len(p) == 2]
    return 100 * (statistics.median(ratios) - 1)


def table(rows: list[dict[str, Any]]) -> str:
    """Medians over the repeats (and p99 of all repeats' answers pooled), one line per (load,
    shadow fraction)."""
    lines = [
        "| load | shadow | p50 ms | p99 ms | p99 vs 0 % | paired p99 vs 0 % | pooled p99 ms | "
        "answered req/s | shadow scored | shadow dropped | failed |",
        "|---" * 11 + "|",
    ]
    for load in dict.fromkeys(r["load"] for r in rows):
        medians: dict[float, dict[str, float]] = {}
        for fraction in (0.0, 1.0):
            mine = [r for r in rows if (r["load"], r["shadow"]) == (load, fraction)]
            medians[fraction] = {
                k: statistics.median(r[k] for r in mine)
                for k in ("p50_ms", "p99_ms", "rps", "shadow_scored", "shadow_dropped", "failed")
            }
            pooled = [x for r in mine for x in r["latencies"]]
            medians[fraction]["pooled_p99_ms"] = 1000 * float(np.percentile(pooled, 99))
        paired = _paired_growth([r for r in rows if r["load"] == load])
        for fraction, m in medians.items():
            growth = 100 * (m["p99_ms"] / medians[0.0]["p99_ms"] - 1)
            pair = f"{paired:+.1f} %" if fraction else "-"
            offered = m["shadow_scored"] + m["shadow_dropped"]
            dropped = f"{100 * m['shadow_dropped'] / offered:.0f} %" if offered else "-"
            lines.append(
                f"| {load} | {fraction:.0%} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                f"{growth:+.1f} % | {pair} | {m['pooled_p99_ms']:.1f} | {m['rps']:.0f} | "
                f"{m['shadow_scored']:.0f} | {dropped} | {m['failed']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True)
    parser.add_argument("--model", default="din")
    parser.add_argument("--primary", type=int, default=1)
    parser.add_argument("--shadow", type=int, default=2)
    parser.add_argument(
        "--rates",
        type=lambda t: [float(x) for x in t.split(",") if x],
        default=[40.0, 80.0],
        help="open-loop requests/s",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda t: [int(x) for x in t.split(",") if x],
        default=[8],
        help="closed-loop clients",
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--history", type=int, default=30)
    parser.add_argument("--out", default="runs/shadow-bench")
    args = parser.parse_args()
    print(table(run(args)))


if __name__ == "__main__":
    main()
