"""`ctr bench export`: candidates/s of three ways to score slates of a behaviour model (CPU).

* slate-shared ONNX: the exported serving graph (`exporters.onnx_export`), user side once per
  user, ragged `cand_user_index` layout;
* pairwise ONNX: the naive export of the training `forward`, each candidate with its own copy
  of the history (the history repeated K times before the call). Built here only, for this
  comparison; it is not a product path;
* PyTorch eager: the slate-shared module, `torch.no_grad`, same thread count.

Every cell first checks that the three forms agree (max abs diff ≤ 1e-5) on its inputs, then
times `repeats` calls after one warm-up call and keeps the fastest (least disturbed by other
processes on a shared box). Only the call itself is timed: feeds are built beforehand, so the
pairwise column does not pay for repeating the history in numpy (a conservative speed-up).
Weights are random (default configs, vocabulary sizes below): speed does not depend on them.
"""

from __future__ import annotations

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

from exporters.onnx_export import GraphSpec, export_behavior, export_graph
from exporters.parity import run_eager, run_session
from models.data.batch import BehaviorBatch
from models.nets.base import BehaviorModel
from models.registry import BEHAVIOR_MODELS, model_class
from runtime.features import DEFAULT_HISTORY_LEN
from runtime.feeds import BEHAVIOR_INPUTS
from runtime.loader import session_options

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


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["sarn", "fat"])
    users: list[int] = field(default_factory=lambda: [1, 8, 32])
    slate: int = 100  # K
    history: int = DEFAULT_HISTORY_LEN  # L
    repeats: int = 5
    threads: int = 1
    items: int = 10_000  # vocabulary sizes of the random models
    categories: int = 200
    seed: int = 0


@dataclass
class BenchRow:
    model: str
    users: int
    candidates: int
    shared_cps: float
    pairwise_cps: float
    eager_cps: float
    max_abs_diff: float

    @property
    def speedup(self) -> float:
        return self.shared_cps / self.pairwise_cps

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "speedup_vs_pairwise": self.speedup}


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


def _feeds(config: BenchConfig, users: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = users * config.slate
    return {
        "user": rng.integers(2, 1000, users),  # [U]
        "hist_items": rng.integers(2, config.items, (users, config.history)),  # [U, L]
        "hist_cats": rng.integers(2, config.categories, (users, config.history)),  # [U, L]
        "context": np.zeros((users, 0), dtype=np.int64),  # [U, 0]
        "cand_items": rng.integers(2, config.items, n),  # [N]
        "cand_cats": rng.integers(2, config.categories, n),  # [N]
        "cand_user_index": np.repeat(np.arange(users), config.slate),  # [N]
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


def _best_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: allocations, first-shape work
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), session_options(None, threads), providers=["CPUExecutionProvider"]
    )


@dataclass
class _Forms:
    """The three ways to score one model, ready to call."""

    shared: ort.InferenceSession
    pairwise: ort.InferenceSession
    eager: nn.Module


def _build_forms(name: str, config: BenchConfig, workdir: Path) -> _Forms:
    torch.manual_seed(config.seed)
    sizes = {"item": config.items, "category": config.categories, "user": 1000}
    model = model_class(name)(sizes).eval()
    shared_graph, _ = export_behavior(model, workdir / f"{name}_shared.onnx", num_context=0)
    example = _pairwise_feeds(_feeds(config, 2, np.random.default_rng(0)))
    export_graph(
        PairwiseGraph(shared_graph.model),  # type: ignore[arg-type]
        tuple(torch.from_numpy(example[n]) for n in PAIRWISE_INPUTS),
        workdir / f"{name}_pair.onnx",
        PAIRWISE_GRAPH,
    )
    return _Forms(
        _session(workdir / f"{name}_shared.onnx", config.threads),
        _session(workdir / f"{name}_pair.onnx", config.threads),
        shared_graph,
    )


def _bench_cell(name: str, forms: _Forms, config: BenchConfig, users: int) -> BenchRow:
    feeds = _feeds(config, users, np.random.default_rng(config.seed + users))
    pair_feeds = _pairwise_feeds(feeds)
    calls: dict[str, Callable[[], np.ndarray]] = {
        "shared": lambda: run_session(forms.shared, feeds),
        "pairwise": lambda: run_session(forms.pairwise, pair_feeds),
        "eager": lambda: run_eager(forms.eager, BEHAVIOR_INPUTS, feeds),
    }
    ref = calls["shared"]()
    diff = max(float(np.abs(calls[form]() - ref).max()) for form in ("pairwise", "eager"))
    if diff > AGREEMENT:
        raise RuntimeError(f"{name}: the three forms disagree by {diff:.3g}")
    n = users * config.slate
    rate = {form: n / _best_seconds(call, config.repeats) for form, call in calls.items()}
    return BenchRow(name, users, n, rate["shared"], rate["pairwise"], rate["eager"], diff)


def run_bench(config: BenchConfig) -> list[BenchRow]:
    unknown = [m for m in config.models if m not in BEHAVIOR_MODELS]
    if unknown:
        raise ValueError(f"not behaviour models: {unknown}; choose from {sorted(BEHAVIOR_MODELS)}")
    torch.set_num_threads(config.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in config.models:
            forms = _build_forms(name, config, Path(tmp))
            rows += [_bench_cell(name, forms, config, users) for users in config.users]
        return rows


def format_table(rows: list[BenchRow], config: BenchConfig) -> str:
    """Markdown table, candidates/s (higher is better)."""
    lines = [
        f"K={config.slate} candidates per user, L={config.history} history, "
        f"{config.threads} thread(s), CPU, best of {config.repeats}",
        "",
        "| model | users/call | candidates/call | slate-shared ONNX | pairwise ONNX "
        "| PyTorch eager | shared / pairwise |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.users} | {r.candidates} | {r.shared_cps:,.0f} | "
            f"{r.pairwise_cps:,.0f} | {r.eager_cps:,.0f} | {r.speedup:.2f}× |"
        )
    return "\n".join(lines)
