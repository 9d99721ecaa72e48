"""What the batcher's test files share: a prepare step, an observer that records refusals, and
deadlines from now."""

from __future__ import annotations

import asyncio
import time

from service.scoring.batcher import BatchObserver


class Prepares:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.delay_s = delay_s

    async def __call__(self, batch: list[int]) -> list[int]:
        self.calls.append(list(batch))
        await asyncio.sleep(self.delay_s)
        return batch


class Counts(BatchObserver):
    def __init__(self) -> None:
        self.rejects: list[str] = []

    def on_reject(self, reason: str) -> None:
        self.rejects.append(reason)


def later(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds
