"""`ctr bench export`: what one scoring call costs per candidate, for every form a behaviour
model can be served in (CPU, random weights: speed does not depend on them).

Forms, all on the same feeds of one cell (U users × K candidates, histories of L items):
* every serving layout the export writes (`exporters.layouts`: `cpu-fused`, `cpu-loop`,
  `batched`; GRU and Wide&Deep have only `slate-shared`), the custom-op graph only where the
  library is built;
* `slate-shared (ref)`: the graph exported before the serving layouts (the model's
  `forward_slates`; SARN's cube expanded per user and gathered per candidate), the reference
  every speed-up is a ratio to;
* `pairwise`: the naive export of the training `forward`, each candidate with its own copy of
  the history (repeated beforehand, for free);
* `eager`: the slate-shared module in PyTorch, `torch.no_grad`, same thread count.

Timing: one warm-up call per form, then `repeats` rounds in which every form is called once,
in turn (interleaved, so a burst of load on a shared box hits every form alike). Each call is
timed twice: the calling thread's CPU time (`time.thread_time`: ORT runs with one intra-op
thread and torch with one thread, so all compute is on that thread, and other processes'
load does not count) and wall time. Reported: medians, µs per candidate, candidates per
second, and each form's ratio to the reference from the same run. Every cell first checks
that all forms agree with the reference (max |Δp| ≤ 1e-5).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from exporters.layouts import SLATE_SHARED, export_layouts, slate_shared
from exporters.onnx_export import (
    GraphSpec,
    behavior_graph,
    example_behavior_inputs,
    export_graph,
    serving_copy,
)
from exporters.parity import run_eager, run_session
from models.data.batch import BehaviorBatch
from models.nets.base import BehaviorModel
from models.overrides import with_overrides
from models.registry import BEHAVIOR_MODELS, model_class
from runtime.feeds import BEHAVIOR_INPUTS
from runtime.loader import register_ops, session_options
from runtime.ortops import library_path

PAIRWISE_INPUTS = ("user", "hist_items", "hist_cats", "context", "items", "cats")
PAIRWISE_GRAPH = GraphSpec(
    inputs=PAIRWISE_INPUTS,
    outputs=("scores",),
    dynamic_axes={
        **{name: {0: "B"} for name in PAIRWISE_INPUTS},
        "hist_items": {0: "B", 1: "L"},
        "hist_cats": {0: "B", 1: "L"},
        "scores": {0: "B"},
    },
)
AGREEMENT = 1e-5
REFERENCE = "slate-shared (ref)"


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["sarn", "din", "fat", "gru", "wdl"])
    users: list[int] = field(default_factory=lambda: [1])
    slates: list[int] = field(default_factory=lambda: [100, 500])  # K
    histories: list[int] = field(default_factory=lambda: [30, 50])  # L
    repeats: int = 15
    threads: int = 1
    items: int = 10_000  # vocabulary sizes of the random models
    categories: int = 200
    seed: int = 0
    pairwise: bool = True  # the pairwise form (slowest at large K·L)
    eager: bool = True
    # NAME=VALUE config fields: each model is timed with its defaults, then with these set
    overrides: list[str] = field(default_factory=list)


@dataclass
class BenchRow:
    model: str
    users: int
    slate: int  # K
    history: int  # L
    form: str
    cpu_ms: float  # median thread CPU time of one call
    wall_ms: float  # median wall time of one call
    cpu_ratio: float  # reference cpu_ms / this form's (× faster than today's graph)
    wall_ratio: float
    max_abs_diff: float  # vs the reference, on the timed feeds

    @property
    def candidates(self) -> int:
        return self.users * self.slate

    @property
    def us_per_candidate(self) -> float:
        return 1000 * self.cpu_ms / self.candidates

    @property
    def candidates_per_s(self) -> float:
        return 1000 * self.candidates / self.cpu_ms

    def to_json(self) -> dict[str, Any]:
        extra = {
            "us_per_candidate": self.us_per_candidate,
            "candidates_per_s": self.candidates_per_s,
        }
        return {**asdict(self), "candidates": self.candidates, **extra}


class PairwiseGraph(nn.Module):
    """The naive serving graph: the training form, one history copy per candidate."""

    def __init__(self, model: BehaviorModel) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(
        self,
        user: Tensor,
        hist_items: Tensor,
        hist_cats: Tensor,
        context: Tensor,
        items: Tensor,
        cats: Tensor,
    ) -> Tensor:
        batch = BehaviorBatch(user, hist_items, hist_cats, items, cats, context, items.float())
        return torch.sigmoid(self.model(batch)[:, 0])  # [B] pCTR


def _feeds(
    config: BenchConfig, users: int, slate: int, history: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    n = users * slate
    return {
        "user": rng.integers(2, 1000, users),  # [U]
        "hist_items": rng.integers(2, config.items, (users, history)),  # [U, L]
        "hist_cats": rng.integers(2, config.categories, (users, history)),  # [U, L]
        "context": np.zeros((users, 0), dtype=np.int64),  # [U, 0]
        "cand_items": rng.integers(2, config.items, n),  # [N]
        "cand_cats": rng.integers(2, config.categories, n),  # [N]
        "cand_user_index": np.repeat(np.arange(users), slate),  # [N]
    }


def _pairwise_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row = feeds["cand_user_index"]
    return {
        "user": feeds["user"][row],
        "hist_items": feeds["hist_items"][row],
        "hist_cats": feeds["hist_cats"][row],
        "context": feeds["context"][row],
        "items": feeds["cand_items"],
        "cats": feeds["cand_cats"],
    }


def _session(path: Path, threads: int, fused: bool = False) -> ort.InferenceSession:
    options = session_options(None, threads)
    if fused and (why := register_ops(options)) is not None:
        raise RuntimeError(why)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


Call = Callable[[dict[str, np.ndarray]], np.ndarray]


def _onnx_call(session: ort.InferenceSession) -> Call:
    return lambda feeds: run_session(session, feeds)


def _forms(
    name: str, assignments: list[str], config: BenchConfig, directory: Path
) -> dict[str, Call]:
    """Form name -> a call on the slate-shared feeds, ready to time, for model `name` with
    its config fields set by `assignments` (NAME=VALUE); its graphs go to `directory`."""
    torch.manual_seed(config.seed)
    sizes = {"item": config.items, "category": config.categories, "user": 1000}
    cls = model_class(name)
    built = cls(sizes, with_overrides(cls.config_class(), assignments))
    model: BehaviorModel = serving_copy(built)  # type: ignore[assignment]
    directory.mkdir()
    graphs = export_layouts(model, directory, 0, fused=library_path() is not None)
    forms: dict[str, Call] = {}
    for g in graphs:
        if g.layout != SLATE_SHARED:  # GRU/Wide&Deep: their one layout is the reference
            forms[g.layout] = _onnx_call(_session(directory / g.file, config.threads, g.needs_ops))
    reference = slate_shared(model)
    example = example_behavior_inputs(0)
    export_graph(reference, example, directory / "ref.onnx", behavior_graph(model.tasks))
    forms[REFERENCE] = _onnx_call(_session(directory / "ref.onnx", config.threads))
    if config.pairwise:
        pair_example = _pairwise_feeds(_feeds(config, 2, 3, 4, np.random.default_rng(0)))
        pair_inputs = tuple(torch.from_numpy(pair_example[n]) for n in PAIRWISE_INPUTS)
        export_graph(PairwiseGraph(model), pair_inputs, directory / "pair.onnx", PAIRWISE_GRAPH)
        pair = _session(directory / "pair.onnx", config.threads)
        forms["pairwise"] = lambda f: run_session(pair, _pairwise_feeds(f))
    if config.eager:
        forms["eager"] = lambda f: run_eager(reference, BEHAVIOR_INPUTS, f)
    return forms


def _timed(call: Callable[[], object]) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one call."""
    cpu, wall = time.thread_time(), time.perf_counter()
    call()
    return time.thread_time() - cpu, time.perf_counter() - wall


def _cell(
    name: str, forms: dict[str, Call], config: BenchConfig, users: int, slate: int, history: int
) -> list[BenchRow]:
    rng = np.random.default_rng(config.seed + 7 * users + slate + history)
    feeds = _feeds(config, users, slate, history, rng)
    ref = forms[REFERENCE](feeds)
    diffs = {}
    for form, call in forms.items():  # also the warm-up call
        out = call(feeds)
        diffs[form] = float(np.abs(out.reshape(ref.shape[0], -1)[:, 0] - ref.reshape(-1)).max())
        if diffs[form] > AGREEMENT:
            raise RuntimeError(f"{name}: {form} differs from the reference by {diffs[form]:.3g}")
    times: dict[str, list[tuple[float, float]]] = {form: [] for form in forms}
    for _ in range(config.repeats):
        for form, call in forms.items():
            times[form].append(_timed(lambda c=call: c(feeds)))  # type: ignore[misc]
    cpu = {f: 1000 * statistics.median(t[0] for t in ts) for f, ts in times.items()}
    wall = {f: 1000 * statistics.median(t[1] for t in ts) for f, ts in times.items()}
    ratio = {f: (cpu[REFERENCE] / cpu[f], wall[REFERENCE] / wall[f]) for f in forms}
    cell = (name, users, slate, history)
    return [BenchRow(*cell, f, cpu[f], wall[f], *ratio[f], diffs[f]) for f in forms]


def run_bench(config: BenchConfig) -> list[BenchRow]:
    unknown = [m for m in config.models if m not in BEHAVIOR_MODELS]
    if unknown:
        raise ValueError(f"not behaviour models: {unknown}; choose from {sorted(BEHAVIOR_MODELS)}")
    for name in config.models:  # a bad field fails before any timing
        with_overrides(model_class(name).config_class(), config.overrides)
    torch.set_num_threads(config.threads)
    rows = []
    variants = [[], config.overrides] if config.overrides else [[]]
    with tempfile.TemporaryDirectory() as tmp:
        for name in config.models:
            for assignments in variants:
                label = " ".join([name, *assignments])
                forms = _forms(name, assignments, config, Path(tmp) / label)
                for history in config.histories:
                    for slate in config.slates:
                        for users in config.users:
                            rows += _cell(label, forms, config, users, slate, history)
    return rows


def format_table(rows: list[BenchRow], config: BenchConfig) -> str:
    """Markdown table: µs per candidate and candidates/s from thread CPU time, wall time,
    and the speed-up over the reference graph (CPU time; wall time in brackets)."""
    lines = [
        f"{config.threads} thread(s), CPU, median of {config.repeats} interleaved calls",
        "",
        "| model | U×K | L | form | CPU ms/call | µs/cand | cand/s | wall ms/call "
        "| × ref (CPU) | × ref (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.users}×{r.slate} | {r.history} | {r.form} | {r.cpu_ms:.2f} "
            f"| {r.us_per_candidate:.1f} | {r.candidates_per_s:,.0f} | {r.wall_ms:.2f} "
            f"| {r.cpu_ratio:.2f} | {r.wall_ratio:.2f} |"
        )
    return "\n".join(lines)
