"""Step 3 of `ctr bench gpu`: raw ONNX Runtime throughput per model on the device.

One cell = (model, precision, K candidates per user, U users per call, binding). The feeds
are encoded once before timing by the service's encoder (`LoadedModel.encode`) from requests
of the world's real ids, every user with a full history of L items, so a cell times the graph
alone. Two ways to call it:
* plain `session.run` with numpy feeds: what the service's runtime does; ORT copies inputs
  to the device and the outputs back inside the call;
* IOBinding: inputs uploaded to the device once, outputs bound on the device
  (SERVING.md §3.3), so the timed call holds no host<->device copy.
Before timing, the bound outputs are compared with the plain ones (they must agree), so the
faster column computes the same thing.

Timing: two warm-up calls (first-shape allocations, kernel selection), then up to `repeats`
calls, fewer when they outlast `cell_seconds` (at least five): candidates/s from the median,
p50 and p99 per call. ORT synchronises the device at the end of every run, so a host clock
around the call measures the device work.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from loadtest.gpu.build import Say
from loadtest.gpu.config import CUDA, CheckConfig, Precision, failure
from loadtest.gpu.parity import max_abs_diff
from loadtest.population import Population, Sampler
from runtime.feeds import ScoringRequest
from runtime.loader import LoadedModel, open_model

WARMUP_CALLS = 2
MIN_CALLS = 5


@dataclass
class Cell:
    model: str
    precision: str
    provider: str  # what the session really runs on
    slate: int  # K
    users: int  # U per call
    history: int  # L
    candidates: int  # U·K per call
    binding: bool  # IOBinding, inputs and outputs on the device
    calls: int = 0
    candidates_per_s: float | None = None  # from the median call
    p50_ms: float | None = None
    p99_ms: float | None = None
    binding_max_abs_diff: float | None = None  # bound vs plain outputs
    error: str | None = None


def time_calls(call: Callable[[], object], repeats: int, budget_s: float) -> list[float]:
    """Seconds per call after the warm-up; stops at `repeats` calls or, past `MIN_CALLS`,
    once `budget_s` has passed."""
    for _ in range(WARMUP_CALLS):
        call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (
        len(times) < MIN_CALLS or time.perf_counter() - started < budget_s
    ):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return times


def _requests(sampler: Sampler, users: int, slate: int, history: int) -> list[ScoringRequest]:
    """`users` requests of `slate` candidates behind `history` real items each."""
    return [
        ScoringRequest(sampler.user(), sampler.candidates(history), sampler.candidates(slate))
        for _ in range(users)
    ]


class Binding:
    """One IOBinding of a session: inputs copied to the device once, outputs left there."""

    def __init__(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], device: str):
        self.session = session
        self.binding = session.io_binding()
        self.values = [
            ort.OrtValue.ortvalue_from_numpy(feeds[i.name], device, 0) for i in session.get_inputs()
        ]
        for meta, value in zip(session.get_inputs(), self.values, strict=True):
            self.binding.bind_ortvalue_input(meta.name, value)
        for output in session.get_outputs():
            self.binding.bind_output(output.name, device, 0)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def outputs(self) -> list[np.ndarray]:
        return [np.asarray(v) for v in self.binding.copy_outputs_to_cpu()]


def _timed(cell: Cell, call: Callable[[], object], config: CheckConfig) -> Cell:
    times = np.asarray(time_calls(call, config.repeats, config.cell_seconds))
    median = float(np.median(times))
    cell.calls = len(times)
    cell.candidates_per_s = cell.candidates / median
    cell.p50_ms = float(np.percentile(times, 50, method="inverted_cdf")) * 1e3
    cell.p99_ms = float(np.percentile(times, 99, method="inverted_cdf")) * 1e3
    return cell


def measure_cells(
    model: LoadedModel, precision: Precision, sampler: Sampler, config: CheckConfig
) -> list[Cell]:
    """Every (K, U, binding) cell of one opened model, smallest calls first."""
    session = model.session
    device = "cuda" if model.providers[0] == CUDA else "cpu"
    names = [o.name for o in session.get_outputs()]
    cells = []
    for slate in config.slates:
        for users in config.users:
            feeds = model.encode(_requests(sampler, users, slate, config.history))
            graph_feeds = {name: feeds[name] for name in model.input_names}
            base = Cell(
                model.name,
                precision,
                model.providers[0],
                slate,
                users,
                config.history,
                users * slate,
                binding=False,
            )
            cells += _measure_pair(base, session, graph_feeds, names, device, config)
    return cells


def _measure_pair(
    base: Cell,
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    names: list[str],
    device: str,
    config: CheckConfig,
) -> list[Cell]:
    """The plain and the bound cell of one feed set; an error (e.g. out of device memory)
    is recorded in the cell instead of ending the step."""
    plain, bound = base, Cell(**{**asdict(base), "binding": True})
    try:
        expected = session.run(names, feeds)
        _timed(plain, lambda: session.run(names, feeds), config)
    except Exception as exc:  # recorded per cell: the grid goes on
        plain.error = bound.error = failure(exc)
        return [plain, bound]
    try:
        binding = Binding(session, feeds, device)
        binding.run()
        bound.binding_max_abs_diff = max(
            max_abs_diff(np.asarray(a), b) for a, b in zip(expected, binding.outputs(), strict=True)
        )
        _timed(bound, binding.run, config)
    except Exception as exc:
        bound.error = failure(exc)
    return [plain, bound]


def measure(
    config: CheckConfig, dirs: dict[str, Path], world: Path, say: Say
) -> list[dict[str, Any]]:
    """Step 3: every model and precision on the device provider."""
    population = Population.load(world, config.history, seed=config.seed)
    rows: list[dict[str, Any]] = []
    for name, directory in dirs.items():
        for precision in config.precisions:
            say(f"raw ORT: {name} {precision}")
            try:
                model = open_model(directory, providers=config.providers, precision=precision)
            except Exception as exc:  # e.g. no fp16 variant: recorded, the others still run
                rows.append({"model": name, "precision": precision, "error": failure(exc)})
                continue
            rows += [
                asdict(c)
                for c in measure_cells(model, precision, population.sampler(config.seed), config)
            ]
            del model
            gc.collect()  # release the session's device memory before the next one
    return rows
