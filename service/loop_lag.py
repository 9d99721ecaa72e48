"""How late the event loop runs what is due: `ctr_event_loop_lag_seconds`.

Every stage of `ctr_stage_duration_seconds` starts when the service's code first sees a request;
the wait before that (bytes in the socket while the loop is busy with other requests' parses,
answers and batches) shows in none of them. Under overload it was most of a refusal's time as the
client saw it (docs/performance.md, sixth pass: ≤ 1 ms in the service, 8-11 ms on the wire). A
timer due every `interval_s` measures it: how much later than due the loop ran it is roughly
what a request arriving then waited for the loop (uvloop's timers are in whole milliseconds, so
an idle loop reads 0-1 ms).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

INTERVAL_S = 0.1


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float = INTERVAL_S) -> None:
    """Until cancelled: sleeps `interval_s` and observes how late the loop woke it (seconds)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - due))
