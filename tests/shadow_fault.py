"""Fault injection for the shadow tests, installed inside a `ctr serve` child process.

Why a fault-injecting shadow rather than a real one: the promise under test is about what a
misbehaving shadow must NOT do to the primary path, and no real exported model can be told to
stall until the test has collected its answers, or to raise, on demand. So the real model's
`run()` is wrapped, only in the shadow's own worker thread (threads named `infer-shadow-...`;
the same model's warm-up and any primary use are untouched). The control file holds the mode:
empty (real inference), `hold` (block until the file changes, at most 10 s: a shadow that is
slower than any primary request), or `raise`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from runtime.loader import LoadedModel


def _mode(control: Path) -> str:
    try:
        return control.read_text().strip()
    except OSError:
        return ""


def install(control: Path) -> None:
    real_run = LoadedModel.run

    def run(self: LoadedModel, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if threading.current_thread().name.startswith("infer-shadow-"):
            deadline = time.monotonic() + 10
            while _mode(control) == "hold" and time.monotonic() < deadline:
                time.sleep(0.01)
            if _mode(control) == "raise":
                raise RuntimeError("injected shadow failure")
        return real_run(self, feeds)

    LoadedModel.run = run  # type: ignore[method-assign]
