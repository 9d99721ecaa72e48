"""PyTorch -> ONNX for the serving graphs (torch; never imported by the service).

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`, opset 17. Measured on
torch 2.13 for all eleven models (docs/export.md): both it and the torch.export-based
`dynamo=True` path (opset 18) reproduce eager PyTorch to ≤ 6e-8 on the parity shapes, but the
TorchScript path exports a model in 0.05-1.5 s against 2-12 s, which matters for a test suite
on two shared cores, and prunes inputs a model ignores. It is deprecated upstream, so
`exporter="dynamo"` stays selectable (`ctr export --exporter dynamo`) and the same parity gate
decides whether its file is kept.

What a serving graph computes (every graph returns probabilities, never logits):
* behaviour models: `SlateScoringGraph` on the ragged signature (`runtime.feeds`): the user
  side runs once per user inside the graph; by default its outputs are gathered per candidate
  with `cand_user_index` (`model.forward_slates` + sigmoid), and the serving layouts
  (`exporters.layouts`) lay the per-candidate work out so that it runs in cache. Output
  `scores` [N] is pCTR; a multi-task model (`tasks=("ctr", "cvr")`, `models.nets.multitask`)
  adds `conversion_scores` [N] (pCVR) and `ctcvr_scores` [N] (pCTR·pCVR, formed in the graph
  so every client multiplies the same float32 numbers). A conversion-only model is an
  offline baseline and is not exported.
* slate models (NCM family): see `exporters.slate_export`.

Models are exported in `eval()` (Dice uses its running statistics) and, where a model offers
`materialized()` (FAT's hypernetwork), from that constant-weight copy, so the graph holds no
TopK over parameters.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import onnx
import torch
from torch import Tensor, nn

from models.nets.base import BehaviorModel
from models.nets.multitask import CTR, CVR
from runtime.feeds import BEHAVIOR_INPUTS, CONVERSION_SCORES, CTCVR_SCORES, SCORES

OPSET = 17
DYNAMO_OPSET = 18  # the torch.export-based exporter's lowest supported opset
Exporter = Literal["torchscript", "dynamo"]
_ONNX_TYPES: dict[int, str] = {
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class GraphSpec:
    """Names and dynamic axes of one exported signature."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


SCORE_OUTPUTS: dict[tuple[str, ...], tuple[str, ...]] = {
    (CTR,): (SCORES,),
    (CTR, CVR): (SCORES, CONVERSION_SCORES, CTCVR_SCORES),
}


def behavior_graph(tasks: tuple[str, ...] = (CTR,)) -> GraphSpec:
    """The slate-shared signature; its outputs depend on the model's tasks."""
    if tasks not in SCORE_OUTPUTS:
        raise ValueError(
            f"a model with tasks {','.join(tasks)} is not exported: only click models (ctr) "
            "and multi-task models (ctr,cvr) serve; a conversion-only model is a baseline"
        )
    outputs = SCORE_OUTPUTS[tasks]
    return GraphSpec(
        inputs=BEHAVIOR_INPUTS,
        outputs=outputs,
        dynamic_axes={
            "user": {0: "U"},
            "hist_items": {0: "U", 1: "L"},
            "hist_cats": {0: "U", 1: "L"},
            "context": {0: "U"},
            "cand_items": {0: "N"},
            "cand_cats": {0: "N"},
            "cand_user_index": {0: "N"},
            **{name: {0: "N"} for name in outputs},
        },
    )


def task_probabilities(logits: Tensor, tasks: tuple[str, ...]) -> tuple[Tensor, ...]:
    """Logits [N, T] -> the graph's outputs: (pCTR,) or (pCTR, pCVR, pCTR·pCVR), each [N]."""
    probs = torch.sigmoid(logits)
    if tasks == (CTR, CVR):
        return probs[:, 0], probs[:, 1], probs[:, 0] * probs[:, 1]
    return (probs[:, 0],)


class SlateInputs(NamedTuple):
    """The slate-shared feeds (`runtime.feeds.BEHAVIOR_INPUTS`), as one value."""

    user: Tensor  # [U]
    hist_items: Tensor  # [U, L]
    hist_cats: Tensor  # [U, L]
    context: Tensor  # [U, C]
    cand_items: Tensor  # [N]
    cand_cats: Tensor  # [N]
    cand_user_index: Tensor  # [N]


class SlateScoringGraph(nn.Module):
    """The behaviour models' serving graph: ragged slates in, probabilities [N] out (one
    tensor per output of `behavior_graph(model.tasks)`). `logits` is the model's own
    `forward_slates`; the serving layouts (`exporters.layouts`) lay it out otherwise."""

    def __init__(self, model: BehaviorModel, per_user: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tasks = model.tasks
        # One user per call (U = 1; `exporters.layouts.onnx_graph.per_user_loop` loops over
        # users around such a graph): user-side tensors broadcast, never gathered.
        self.per_user = per_user
        self.eval()

    def for_candidates(self, user_side: Tensor, idx: Tensor) -> Tensor:
        """A user-side tensor [U, ...] row-aligned with the candidates: gathered [N, ...], or
        for one user per call left as it is ([1, ...], broadcast by the ops that read it)."""
        return user_side if self.per_user else user_side.index_select(0, idx)

    def forward(
        self,
        user: Tensor,
        hist_items: Tensor,
        hist_cats: Tensor,
        context: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user_index: Tensor,
    ) -> tuple[Tensor, ...]:
        # Named parameters, not *inputs: torch.export (the dynamo exporter) keys its dynamic
        # shapes by them.
        x = SlateInputs(
            user, hist_items, hist_cats, context, cand_items, cand_cats, cand_user_index
        )
        return task_probabilities(self.logits(x), self.tasks)

    def logits(self, x: SlateInputs) -> Tensor:
        """-> logits [N, T]."""
        return self.model.forward_slates(*x)


def serving_copy(model: nn.Module) -> nn.Module:
    """The module to export: eval mode, hypernetwork weights materialised where it has any."""
    model = model.eval()
    materialize = getattr(model, "materialized", None)
    if callable(materialize) and not getattr(model, "is_materialized", False):
        model = materialize()
    return model.eval().requires_grad_(False)


def example_behavior_inputs(num_context: int, one_user: bool = False) -> tuple[Tensor, ...]:
    """Tracing inputs: U=3, L=5, N=7, all distinct and > 1 so no dynamic axis is specialised
    (`one_user`: U=1, every candidate of user 0, for a `per_user` serving module).

    Ids are OOV (1) and PAD (0), the only indices every table has; the values do not shape
    the trace (no data-dependent control flow), the parity check covers real ids.
    """
    hist = torch.ones(3, 5, dtype=torch.long)
    hist[0, 3:] = 0  # one padded row so the mask path is traced with data
    if one_user:
        zeros = torch.zeros(7, dtype=torch.long)
        return (torch.ones(1, dtype=torch.long), hist[:1], hist[:1].clone(),
                torch.ones(1, num_context, dtype=torch.long), torch.ones(7, dtype=torch.long),
                torch.ones(7, dtype=torch.long), zeros)  # fmt: skip
    return (
        torch.ones(3, dtype=torch.long),  # user [U]
        hist,  # hist_items [U, L]
        hist.clone(),  # hist_cats [U, L]
        torch.ones(3, num_context, dtype=torch.long),  # context [U, C]
        torch.ones(7, dtype=torch.long),  # cand_items [N]
        torch.ones(7, dtype=torch.long),  # cand_cats [N]
        torch.tensor([0, 0, 0, 1, 1, 2, 2]),  # cand_user_index [N]
    )


def _dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, Any]]:
    """dynamic_axes -> torch.export Dims, one Dim per axis name (shared names stay equal)."""
    dims = {
        name: torch.export.Dim(name)
        for axes in spec.dynamic_axes.values()
        for name in axes.values()
    }
    return {
        name: {axis: dims[label] for axis, label in spec.dynamic_axes.get(name, {}).items()}
        for name in spec.inputs
    }


def export_graph(
    module: nn.Module,
    example: tuple[Tensor, ...],
    path: Path,
    spec: GraphSpec,
    exporter: Exporter = "torchscript",
    opset: int = OPSET,
    custom_opsets: dict[str, int] | None = None,
) -> int:
    """Writes one self-contained .onnx file (weights inline) and checks it; returns the opset.

    `custom_opsets` declares the domains of custom-op placeholder nodes (TorchScript only;
    `onnx.checker` accepts such nodes, it cannot infer their shapes)."""
    path = Path(path)
    # The exporter restores the module's *own* mode afterwards, recursively: a wrapper left in
    # training mode would switch the wrapped model (Dice!) to batch statistics after export.
    module.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # Shape checks inside nn.GRU and static sizes (√d_h) raise TracerWarnings that do not
        # depend on data; data-dependent control flow is caught by the multi-shape parity
        # check that every export must pass instead.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                module,
                example,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic_axes,
                do_constant_folding=True,
                custom_opsets=custom_opsets,
            )
        elif exporter == "dynamo":
            opset = max(opset, DYNAMO_OPSET)
            torch.onnx.export(
                module,
                example,
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_shapes=_dynamic_shapes(spec),
                external_data=False,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r}: torchscript or dynamo")
    onnx.checker.check_model(str(path), full_check=True)
    return opset


def describe_graph(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, dtypes and shapes (axis names for dynamic axes) read from the file."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def entry(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim]
        return {
            "name": value.name,
            "dtype": _ONNX_TYPES.get(int(tensor.elem_type), str(tensor.elem_type)),
            "shape": shape,
        }

    return {"inputs": [entry(v) for v in graph.input], "outputs": [entry(v) for v in graph.output]}
