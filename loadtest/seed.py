"""Seeds the behaviour store through the public API (`POST /v1/events`), never Redis directly.

Each user's last `per_user` events of the world's log are posted with their own `event_id`s,
so seeding is idempotent: a second run against the same service reports duplicates instead of
growing the histories. A few requests run concurrently to keep seeding short.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pandas as pd

from loadtest.population import last_events


class SeedError(RuntimeError):
    """The service refused the seed events."""


@dataclass
class SeedResult:
    events: int
    accepted: int
    duplicates: int
    seconds: float


def event_batches(frame: pd.DataFrame, per_user: int, batch: int) -> list[list[dict[str, Any]]]:
    """Bodies' event lists of at most `batch` events each (events without ids get stable ones)."""
    kept = last_events(frame, per_user)
    if "event_id" in kept.columns:
        ids = kept["event_id"].astype(str).tolist()
    else:
        ids = [f"seed-{i}" for i in kept.index]
    records = [
        {"user_id": u, "item_id": i, "category_id": c, "ts": float(t), "event_id": e}
        for u, i, c, t, e in zip(
            kept["user_id"], kept["item_id"], kept["category_id"], kept["ts"], ids, strict=True
        )
    ]
    return [records[start : start + batch] for start in range(0, len(records), batch)]


def seed_histories(
    url: str,
    frame: pd.DataFrame,
    per_user: int,
    batch: int = 1000,
    api_key: str | None = None,
    concurrency: int = 4,
) -> SeedResult:
    start = time.perf_counter()
    batches = event_batches(frame, per_user, batch)
    headers = {"X-API-Key": api_key} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:

        def post(events: list[dict[str, Any]]) -> tuple[int, int]:
            answer = client.post("/v1/events", json={"events": events})
            if answer.status_code != 202:
                raise SeedError(f"POST /v1/events: HTTP {answer.status_code} {answer.text[:300]}")
            body = answer.json()
            return int(body["accepted"]), int(body["duplicates"])

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            counts = list(pool.map(post, batches))
    return SeedResult(
        events=sum(len(b) for b in batches),
        accepted=sum(a for a, _ in counts),
        duplicates=sum(d for _, d in counts),
        seconds=time.perf_counter() - start,
    )
