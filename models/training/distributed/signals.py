"""SIGTERM and SIGINT as requests to stop at the next safe point, not as a crash.

A scheduler preempting a job sends SIGTERM (torchrun passes it on to every worker and kills
them about 30 s later). While training, the handler only records the request; the loop polls it
every few steps, the ranks agree on it (`Ranks.any`), write a checkpoint and leave with
`Interrupted`, so `ctr train --resume` continues from that step. Outside training (loading,
counting, encoding) the signals keep their usual effect.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

EXIT_INTERRUPTED = 128 + signal.SIGTERM  # the exit code of a process ended by SIGTERM


class Interrupted(Exception):
    """The run stopped at a stop request after writing a checkpoint to resume from."""


class StopRequest:
    """Set by SIGTERM / SIGINT while `listening`; read by the training loop."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested, self.signal = True, signum

    @contextlib.contextmanager
    def listening(self) -> Iterator[StopRequest]:
        """Handles SIGTERM and SIGINT inside the block, restores the previous handlers after
        (a no-op outside the main thread, where Python cannot install handlers)."""
        previous = {}
        with contextlib.suppress(ValueError):  # not the main thread
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
