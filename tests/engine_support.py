"""The HTTP layer's stand-in for `ScoringEngine`: it records every call the routes make through
the `service.contracts.Engine` methods and answers as a test sets it (tests/test_http_layer.py,
tests/test_http_protocol.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.contracts import (
    Event,
    HistoryItem,
    IngestResult,
    ModelReloaded,
    ModelsResponse,
    ModelStatus,
    RoutingReloaded,
    ScoreResult,
    ScoringRequest,
)


class FakeEngine:
    """Records every call; answers with `score_result` or raises `error`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.error: Exception | None = None
        self.admitting = True
        self.admits_asked: list[float] = []
        self.score_result = ScoreResult("sarn", 3, "treatment", [0.25, 0.5], "redis", "exp-1")

    def _answer(self, name: str, argument: Any) -> None:
        self.calls.append((name, argument))
        if self.error is not None:
            raise self.error

    async def score(self, request: ScoringRequest) -> ScoreResult:
        self._answer("score", request)
        return self.score_result

    async def ingest(self, events: Sequence[Event], ignored: int = 0) -> IngestResult:
        self._answer("ingest", (list(events), ignored))
        return IngestResult(accepted=len(events), duplicates=0)

    async def history(self, user_id: str) -> list[HistoryItem]:
        self._answer("history", user_id)
        return [HistoryItem("i1", "c1", 10.0), HistoryItem("i2", "c2", 20.0)]

    async def erase(self, user_id: str) -> None:
        self._answer("erase", user_id)

    def readiness(self) -> tuple[bool, list[str]]:
        return False, ["model sarn failed to load"]

    def admits_any(self, deadline: float) -> bool:
        self.admits_asked.append(deadline)
        return self.admitting

    def status(self) -> ModelsResponse:
        model = ModelStatus(
            name="sarn",
            version=None,
            kind=None,
            max_history=None,
            provider=None,
            providers=[],
            default=True,
            status="failed",
        )
        return ModelsResponse(default_model="sarn", models=[model], reload_poll_s=7.0)

    async def reload_model(self, name: str, version: int | None) -> ModelReloaded:
        self._answer("reload_model", (name, version))
        return ModelReloaded(name, version or 4, 3, True, "CPUExecutionProvider")

    async def reload_routing(self) -> RoutingReloaded:
        self._answer("reload_routing", None)
        return RoutingReloaded("ab" * 32, True, 2)

    def begin_drain(self) -> None:
        self.calls.append(("begin_drain", None))

    async def stop(self, timeout_s: float) -> None:
        self.calls.append(("stop", timeout_s))
