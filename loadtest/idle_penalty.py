"""What the same code costs this machine after an idle gap: the service's `/healthz`, called
in-process through its whole ASGI stack, back to back and each call after the thread slept.

At concurrency 1 the service's threads sleep between the stages of every request (waiting for
the client, for Redis, for the inference worker), and each stage then runs on a cold core:
caches, TLB and branch predictors lost to whatever ran meanwhile, on a virtual machine the
vCPU halted and resumed. On the 2-vCPU VM these docs were measured on, `/healthz` took 3×
its back-to-back CPU after a 3 ms sleep (docs/performance.md "Third pass"), which is why the
service's CPU per request at concurrency 1 is several times the sum of its parts measured in
tight loops. `ctr bench overhead` prints this next to its concurrency-1 figures: a host where
the ratio is near 1 pays no such penalty.

Only the calls are timed (`time.thread_time` around each), never the sleeps.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

GAPS_MS = (0.0, 1.0, 3.0, 10.0)


async def _healthz(app: Any) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/healthz",
        "raw_path": b"/healthz",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return int(messages[0]["status"])


async def _cpu_per_call_us(app: Any, gap_s: float, calls: int) -> float:
    spent = 0.0
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)  # the whole thread idles, as the service's loop does
        start = time.thread_time()
        status = await _healthz(app)
        spent += time.thread_time() - start
        if status != 200:
            raise RuntimeError(f"/healthz answered {status}")
    return spent / calls * 1e6


def idle_penalty(calls: int = 200, repeats: int = 3) -> dict[str, float]:
    """CPU µs of one in-process `/healthz` (median of `repeats` means of `calls`) per idle gap
    before each call, keyed by the gap in ms ("0" = back to back)."""
    from service.http.api import build_app

    app = build_app()  # no lifespan: /healthz touches neither the engine nor Redis

    async def measure() -> dict[str, float]:
        for _ in range(calls):  # imports, first-call caches
            await _healthz(app)
        return {
            f"{gap:g}": statistics.median(
                [await _cpu_per_call_us(app, gap / 1e3, calls) for _ in range(repeats)]
            )
            for gap in GAPS_MS
        }

    return asyncio.run(measure())
