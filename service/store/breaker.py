"""A small circuit breaker for the scoring path's Redis reads.

Without one, every request pays the full Redis timeout during an outage. After `failures`
consecutive failures the breaker opens and calls are skipped for `reset_s` seconds; then one
trial call is let through (half-open): success closes it, failure re-opens it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Consecutive-failure breaker; not thread-safe (used from the event loop only)."""

    def __init__(
        self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._failures < self._threshold:
            return "closed"
        return "open" if self._clock() < self._open_until else "half_open"

    def allow(self) -> bool:
        """True when a call may go ahead; in half-open state only one trial at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._trial_in_flight:
            return False
        self._trial_in_flight = True
        return True

    def release(self) -> None:
        """Ends a call that neither succeeded nor failed (cancelled by its caller)."""
        self._trial_in_flight = False

    def record_success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        self._trial_in_flight = False
        if self._failures >= self._threshold:
            self._open_until = self._clock() + self._reset_s
