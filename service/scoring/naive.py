"""The naive serving baseline (`CTR_NAIVE=true`), kept only to be benchmarked against.

What a straightforward service would do: no queue and no cross-request batching (each request
is prepared and run on its own, in the default thread pool), and the user side recomputed for
every candidate: a behaviour-model request of K candidates becomes K single-candidate rows,
each carrying its own copy of the history (U = K in the ragged layout). Slate models score
their slate as one unit, so for them only the batching is removed.

Same HTTP API, same store, same deadlines at admission; no load shedding beyond them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Generic, TypeVar

import numpy as np

from runtime.loader import LoadedModel, ScoringRequest
from service.scoring.batcher import DeadlineExceeded, Draining

Req = TypeVar("Req")
Prep = TypeVar("Prep")
Res = TypeVar("Res")


class UnbatchedRunner(Generic[Req, Prep, Res]):
    """Drop-in for `Batcher` with no queue: prepare and infer one request at a time."""

    def __init__(
        self,
        name: str,
        infer: Callable[[list[Prep]], Sequence[Res]],
        prepare: Callable[[list[Req]], Awaitable[list[Prep]]],
        retry_after_s: int = 1,
    ) -> None:
        self.name = name
        self._infer = infer
        self._prepare = prepare
        self._retry_after_s = retry_after_s
        self._draining = False
        self.depth = 0  # nothing is ever queued

    def start(self) -> None:
        """Nothing to start: there is no dispatcher."""

    def begin_drain(self) -> None:
        self._draining = True

    def can_meet(self, size: int, deadline: float) -> bool:
        """No estimate: the baseline admits whatever arrives."""
        return True

    def can_meet_typical(self, deadline: float) -> bool:
        return True

    async def stop(self, timeout_s: float = 5.0) -> None:
        self.begin_drain()

    async def submit(self, request: Req, size: int, deadline: float) -> Res:
        if self._draining:
            raise Draining(503, self._retry_after_s)
        if deadline <= time.monotonic():
            raise DeadlineExceeded()
        (prepared,) = await self._prepare([request])
        (result,) = await asyncio.to_thread(self._infer, [prepared])
        return result


def score_per_candidate(model: LoadedModel, request: ScoringRequest) -> np.ndarray:
    """One ORT call for one request, the history copied once per candidate (behaviour models).
    -> [K, O] like `LoadedModel.score`, every output of the model."""
    if model.kind == "slate":
        (scores,) = model.score([request])
        return scores
    rows = [replace(request, candidates=[candidate]) for candidate in request.candidates]
    return np.concatenate(model.score(rows))  # [K, O]: one row (user side + 1 candidate) each
