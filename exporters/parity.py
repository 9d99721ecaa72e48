"""ONNX Runtime vs PyTorch on the same feeds: the gate every export must pass (torch).

For every case (`exporters.cases`) the requests are encoded once by the service's encoder;
the ONNX session and the eager serving module (the exact module that was traced) score the
same arrays, and the largest absolute difference of the probabilities (every output of the
graph: pCTR, and pCVR and pCTCVR for a multi-task model) is recorded. For
behaviour models the ONNX scores are also compared with the model's *pairwise* training form
(`forward`, each candidate with its own copy of the history), which checks that the
slate-shared signature serves the scores the model was validated with.

fp32 tolerance: 1e-5 (issue 4). A report that exceeds it raises `ParityError`, so nothing is
published.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from exporters.cases import Cases
from exporters.onnx_export import task_probabilities
from models.data.batch import BehaviorBatch
from models.nets.base import BehaviorModel
from runtime.feeds import ScoringRequest

FP32_TOLERANCE = 1e-5
Encoder = Callable[[Sequence[ScoringRequest]], dict[str, np.ndarray]]
Flatten = Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]


class ParityError(Exception):
    """The exported graph does not reproduce PyTorch within tolerance."""


@dataclass
class CaseResult:
    name: str
    requests: int
    candidates: int
    max_abs_diff: float  # ONNX vs the eager serving module
    pairwise_max_abs_diff: float | None = None  # ONNX vs the pairwise training form


@dataclass
class ParityReport:
    tolerance: float
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        diffs = [c.max_abs_diff for c in self.cases]
        diffs += [
            c.pairwise_max_abs_diff for c in self.cases if c.pairwise_max_abs_diff is not None
        ]
        return max(diffs, default=0.0)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "cases": [asdict(c) for c in self.cases],
        }

    def raise_if_failed(self) -> None:
        if self.passed:
            return
        worst = max(self.cases, key=lambda c: max(c.max_abs_diff, c.pairwise_max_abs_diff or 0.0))
        raise ParityError(
            f"ONNX Runtime differs from PyTorch by {self.max_abs_diff:.3g} > {self.tolerance:g} "
            f"(worst case: {worst.name!r}); the model was not published"
        )


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ParityError(f"ONNX output shape {a.shape} differs from PyTorch's {b.shape}")
    if a.size == 0:
        return 0.0
    # NaN anywhere is a failure, never a silent pass (max() would skip it).
    return float(
        np.nan_to_num(np.abs(a.astype(np.float64) - b.astype(np.float64)), nan=np.inf).max()
    )


def _stack(outputs: Sequence[Any]) -> np.ndarray:
    """One output -> itself; several [N] outputs -> [N, O] in graph order."""
    arrays = [np.asarray(o) for o in outputs]
    return arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)


def run_session(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Every output of the graph (see `_stack`)."""
    names = [i.name for i in session.get_inputs()]
    return _stack(session.run(None, {n: feeds[n] for n in names}))


def run_eager(
    module: nn.Module, inputs: Sequence[str], feeds: dict[str, np.ndarray], device: str = "cpu"
) -> np.ndarray:
    """The traced module's outputs, in the same layout as `run_session`; the feeds are moved to
    `device`, where the module must be (`ctr bench gpu` compares on CUDA)."""
    with torch.no_grad():
        out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in inputs))
    return _stack([t.cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))])


def pairwise_scores(model: BehaviorModel, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The training form: the history tiled to one row per candidate, its logits turned into
    the graph's outputs (sigmoid; pCTR·pCVR for a multi-task model)."""
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    row = t["cand_user_index"]
    batch = BehaviorBatch(
        user=t["user"][row],
        hist_items=t["hist_items"][row],
        hist_cats=t["hist_cats"][row],
        items=t["cand_items"],
        cats=t["cand_cats"],
        context=t["context"][row],
        label=torch.zeros(row.shape[0]),
    )
    with torch.no_grad():
        return _stack([t.numpy() for t in task_probabilities(model(batch), model.tasks)])


def check_parity(
    session: ort.InferenceSession,
    module: nn.Module,
    inputs: Sequence[str],
    cases: Cases,
    encode: Encoder,
    flatten: Flatten | None = None,
    pairwise: BehaviorModel | None = None,
    tolerance: float = FP32_TOLERANCE,
) -> ParityReport:
    """Scores every case with both runtimes; see the module docstring."""
    report = ParityReport(tolerance)
    for name, requests in cases.items():
        feeds = encode(requests)
        onnx_out, eager_out = run_session(session, feeds), run_eager(module, inputs, feeds)
        if flatten is not None:  # compare the real candidates only
            onnx_out, eager_out = flatten(onnx_out, feeds), flatten(eager_out, feeds)
        diff = _max_diff(onnx_out, eager_out)
        result = CaseResult(name, len(requests), int(onnx_out.shape[0]), diff)
        if pairwise is not None:
            result.pairwise_max_abs_diff = _max_diff(onnx_out, pairwise_scores(pairwise, feeds))
        report.cases.append(result)
    return report
