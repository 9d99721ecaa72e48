"""The fp16 variant of an exported graph (`ctr export --fp16`), for GPU serving.

Conversion: `onnxruntime.transformers.float16.convert_float_to_float16` with
`keep_io_types=True` (the feeds and `scores` stay as in fp32, so the loader is unchanged)
and these ops kept in fp32 besides ORT's default block list: `Sigmoid` (the output
probability and SARN's gates: near 0 and 1 fp16 loses the resolution that calibration and
LogLoss see), `ReduceL2`/`Div` (SARN's normalisation divides by ‖h‖ + 1e-10, an epsilon
below fp16's range), `CumSum`/`ReduceSum` (counts and sums over histories), `Softmax`.

Acceptance, recorded in the manifest beside the numbers:
* max |p_fp16 − p_fp32| ≤ 2e-3 over the parity cases (fp16 has ~3 decimal digits; 2e-3 on a
  probability is below what a CTR ranking or calibration check can see);
* |AUC_fp16 − AUC_fp32| ≤ 1e-3 on the validation data (`--data`), where it is measured.
The check runs on the CUDA execution provider when it is usable, otherwise on the CPU EP
(which runs fp16 graphs through its fp16 kernels and casts); the manifest says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from exporters.cases import Cases
from exporters.parity import Encoder, Flatten, run_session
from models.training.metrics import auc
from runtime.feeds import ScoringRequest

FP16_FILE = "model_fp16.onnx"
FP16_TOLERANCE = 2e-3
FP16_AUC_TOLERANCE = 1e-3
FP32_OPS = ["Sigmoid", "ReduceL2", "Div", "CumSum", "ReduceSum", "Softmax"]
# ORT 1.31's CPU EP segfaults while creating an ORT_ENABLE_ALL session for the fp16 slate-GRU
# graph (ENABLE_EXTENDED loads it); the extra level only adds CPU layout transforms, so the
# fp16 variant records EXTENDED for itself (the loader merges these over the fp32 options).
SESSION_OVERRIDES = {"graph_optimization_level": "ORT_ENABLE_EXTENDED"}


class Fp16Error(Exception):
    """The fp16 variant is outside its stated tolerance."""


@dataclass
class Fp16Report:
    provider: str
    max_abs_diff: float
    auc_fp32: float | None
    auc_fp16: float | None
    n_auc: int
    # A multi-task graph on data with conversions: pCTCVR's AUC against click ∧ conversion.
    ctcvr_auc_fp32: float | None = None
    ctcvr_auc_fp16: float | None = None

    @property
    def auc_diff(self) -> float | None:
        return _abs_diff(self.auc_fp32, self.auc_fp16)

    @property
    def ctcvr_auc_diff(self) -> float | None:
        return _abs_diff(self.ctcvr_auc_fp32, self.ctcvr_auc_fp16)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": FP16_FILE,
            "provider": self.provider,
            "max_abs_diff_vs_fp32": self.max_abs_diff,
            "tolerance": FP16_TOLERANCE,
            "valid_auc_fp32": self.auc_fp32,
            "valid_auc_fp16": self.auc_fp16,
            "valid_auc_abs_diff": self.auc_diff,
            "auc_tolerance": FP16_AUC_TOLERANCE,
            "valid_n": self.n_auc,
            **self._ctcvr_json(),
            "fp32_ops": FP32_OPS,
            "session_options": SESSION_OVERRIDES,
        }

    def _ctcvr_json(self) -> dict[str, float | None]:
        if self.ctcvr_auc_fp32 is None:
            return {}
        return {
            "valid_ctcvr_auc_fp32": self.ctcvr_auc_fp32,
            "valid_ctcvr_auc_fp16": self.ctcvr_auc_fp16,
            "valid_ctcvr_auc_abs_diff": self.ctcvr_auc_diff,
        }

    def raise_if_failed(self) -> None:
        if self.max_abs_diff > FP16_TOLERANCE:
            raise Fp16Error(f"fp16 differs from fp32 by {self.max_abs_diff:.3g} > {FP16_TOLERANCE}")
        for label, diff in (("", self.auc_diff), ("CTCVR ", self.ctcvr_auc_diff)):
            if diff is not None and not diff <= FP16_AUC_TOLERANCE:
                raise Fp16Error(f"fp16 changes the validation {label}AUC by {diff:.3g}")


def _abs_diff(fp32: float | None, fp16: float | None) -> float | None:
    return None if fp32 is None or fp16 is None else abs(fp16 - fp32)


def convert(src: Path, dst: Path) -> None:
    model = convert_float_to_float16(
        onnx.load(str(src)), keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
    )
    _drop_duplicate_casts(model.graph)  # a value read by two blocked ops gets two equal Casts
    _sort_topologically(model.graph)  # the converter appends its Cast nodes out of order
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))


def _drop_duplicate_casts(graph: onnx.GraphProto) -> None:
    seen: set[tuple[str, ...]] = set()
    kept = []
    for node in graph.node:
        key = (node.op_type, *node.input, "->", *node.output)
        if node.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _outer_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, including those its subgraphs (If/Loop bodies) take from outside."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
            inner |= {t.name for t in graph.initializer}
            names |= {n for sub in graph.node for n in _outer_inputs(sub)} - inner
    return names


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Kahn's algorithm over value names; stable (keeps the original order where it can)."""
    nodes = list(graph.node)
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    waiting: dict[str, list[int]] = {}
    missing = []
    for index, node in enumerate(nodes):
        needs = _outer_inputs(node) - ready
        missing.append(len(needs))
        for name in needs:
            waiting.setdefault(name, []).append(index)
    queue = [i for i, count in enumerate(missing) if count == 0]
    ordered = []
    while queue:
        index = queue.pop(0)
        ordered.append(nodes[index])
        for name in nodes[index].output:
            for consumer in waiting.pop(name, []):
                missing[consumer] -= 1
                if missing[consumer] == 0:
                    queue.append(consumer)
    if len(ordered) != len(nodes):
        raise ValueError("the fp16 graph has a cycle or an undefined input")
    del graph.node[:]
    graph.node.extend(ordered)


def _session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    cuda = "CUDAExecutionProvider"
    providers = [cuda, "CPUExecutionProvider"] if cuda in ort.get_available_providers() else None
    ort.set_default_logger_severity(4)  # a GPU build without CUDA libraries falls back loudly
    try:
        return ort.InferenceSession(
            str(path), options, providers=providers or ["CPUExecutionProvider"]
        )
    finally:
        ort.set_default_logger_severity(2)


def _scores(
    session: ort.InferenceSession,
    requests: Sequence[ScoringRequest],
    encode: Encoder,
    flatten: Flatten | None,
    batch: int = 256,
) -> np.ndarray:
    parts = []
    for start in range(0, len(requests), batch):
        feeds = encode(requests[start : start + batch])
        out = run_session(session, feeds)
        parts.append(flatten(out, feeds) if flatten is not None else out)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _click_column(scores: np.ndarray) -> np.ndarray:
    """pCTR: the whole array, or its first column for a multi-task graph's [N, 3]."""
    return scores if scores.ndim == 1 else scores[:, 0]


def _label_aucs(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float | None]:
    """(pCTR AUC vs clicks, pCTCVR AUC vs click ∧ conversion or None). `labels` is [N] clicks
    or [N, 2] (click, click ∧ conversion); pCTCVR is a multi-task graph's last column."""
    clicks = labels if labels.ndim == 1 else labels[:, 0]
    click_auc = auc(clicks, _click_column(scores))
    if labels.ndim == 1 or scores.ndim == 1:
        return click_auc, None
    return click_auc, auc(labels[:, 1], scores[:, -1])


def validate(
    fp32: Path,
    fp16: Path,
    options: ort.SessionOptions,
    cases: Cases,
    encode: Encoder,
    flatten: Flatten | None,
    labelled: tuple[list[ScoringRequest], np.ndarray] | None,
) -> Fp16Report:
    """fp16 vs fp32 ONNX on the parity cases and (if given) the labelled validation requests."""
    s32, s16 = _session(fp32, options), _session(fp16, options)
    worst = 0.0
    for requests in cases.values():
        a, b = _scores(s32, requests, encode, flatten), _scores(s16, requests, encode, flatten)
        worst = max(worst, float(np.nan_to_num(np.abs(a - b), nan=np.inf).max(initial=0.0)))
    if labelled is None:
        return Fp16Report(s16.get_providers()[0], worst, None, None, 0)
    requests, labels = labelled
    auc32, ctcvr32 = _label_aucs(labels, _scores(s32, requests, encode, flatten))
    auc16, ctcvr16 = _label_aucs(labels, _scores(s16, requests, encode, flatten))
    return Fp16Report(s16.get_providers()[0], worst, auc32, auc16, len(labels), ctcvr32, ctcvr16)
