"""Serving layouts: the graphs a model directory holds, one computation in several forms.

A layout is a way to lay the same weights out for a runtime. Every graph has the signature of
`runtime.feeds` (ragged slates, `cand_user_index`), is checked by the same parity gate, and is
listed in the manifest's `graphs` in order of preference (docs/export.md, "Serving layouts"):

| layout | what | providers | needs |
|---|---|---|---|
| `cpu-fused` | the per-candidate core as one C kernel (SARN, DIN) | CPU | custom-op library |
| `cpu-loop` | standard ONNX; a Loop over users reads their tensors in place (all 3) | CPU | – |
| `batched` | standard ONNX, no Loop, split first layers (SARN, DIN, FAT) | CUDA, CPU | – |
| `slate-shared` | the model's `forward_slates` (GRU, Wide&Deep; bench reference) | CUDA, CPU | – |

`model.onnx` is always the last entry, pure ONNX and Loop-free, so every machine can serve it;
it is also the file the fp16 variant converts (a GPU variant of the GPU layout).
Export-time only (torch); the loader (`runtime.loader`) reads the manifest and needs none of it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from torch import nn

from exporters.layouts import din, fat, sarn
from exporters.layouts.onnx_graph import per_user_loop
from exporters.onnx_export import (
    Exporter,
    SlateScoringGraph,
    behavior_graph,
    example_behavior_inputs,
    export_graph,
    serving_copy,
)
from models.nets.base import BehaviorModel
from models.nets.baselines import DIN
from models.nets.fat import FAT
from models.nets.sarn import SARN
from runtime.ortops import DOMAIN, DOMAIN_VERSION
from runtime.repository import MODEL_FILE

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
FUSED, LOOP, BATCHED, SLATE_SHARED = "cpu-fused", "cpu-loop", "batched", "slate-shared"
SLATE = "slate"  # the NCM family's session graph (exporters/slate_export.py): one layout
PROVIDERS = {
    FUSED: (CPU,),
    LOOP: (CPU,),
    BATCHED: (CUDA, CPU),
    SLATE_SHARED: (CUDA, CPU),
    SLATE: (CUDA, CPU),
}


@dataclass
class GraphFile:
    """One written graph and the eager module that its parity is checked against."""

    layout: str
    file: str
    module: nn.Module
    needs_ops: bool = False  # the `slatectr` custom-op library (runtime.ortops)

    @property
    def providers(self) -> tuple[str, ...]:
        return PROVIDERS[self.layout]

    def requires(self) -> dict[str, object]:
        """The manifest's `requires` of this graph (what a process must have to open it)."""
        if not self.needs_ops:
            return {}
        return {"custom_op_domain": DOMAIN, "custom_op_version": DOMAIN_VERSION}


def file_for(layout: str) -> str:
    """model.onnx for the portable layouts, model.<layout>.onnx for the CPU-only ones."""
    return MODEL_FILE if PROVIDERS[layout][0] == CUDA else f"model.{layout}.onnx"


def has_fused_layout(model: nn.Module) -> bool:
    """Whether the model has a `cpu-fused` graph (when the custom-op library is built)."""
    return isinstance(model, SARN) or (isinstance(model, DIN) and din.DINFused.supports(model))


def slate_shared(model: BehaviorModel) -> nn.Module:
    """The slate-shared graph's module: the model's `forward_slates` + sigmoid; for SARN the
    form exported before the serving layouts (cube expanded per user, gathered per candidate),
    which beats its eager `forward_slates` in ONNX Runtime."""
    if isinstance(model, SARN):
        return sarn.SARNSlateShared(model)
    return SlateScoringGraph(model)


def _export(
    module: nn.Module,
    path: Path,
    num_context: int,
    exporter: Exporter = "torchscript",
    placeholder: bool = False,
) -> onnx.ModelProto:
    """Writes `module` with the behaviour signature and returns the written graph.
    `placeholder`: the module holds a custom-op node (its domain is declared); a `per_user`
    module is traced with one user."""
    spec = behavior_graph(module.tasks)  # type: ignore[arg-type]
    example = example_behavior_inputs(num_context, one_user=getattr(module, "per_user", False))
    opsets = {DOMAIN: DOMAIN_VERSION} if placeholder else None
    export_graph(module, example, path, spec, exporter, custom_opsets=opsets)
    return onnx.load(str(path))


def _save(model: onnx.ModelProto, directory: Path, layout: str) -> str:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(directory / file_for(layout)))
    return file_for(layout)


def _sarn(model: SARN, directory: Path, num_context: int, fused: bool) -> list[GraphFile]:
    module = sarn.SARNServing(model)
    with tempfile.TemporaryDirectory() as tmp:
        placeholder = _export(module, Path(tmp) / "placeholder.onnx", num_context, placeholder=True)
    graphs = []
    if fused:
        graphs.append(GraphFile(FUSED, _save(placeholder, directory, FUSED), module, True))
    for layout, build in ((LOOP, sarn.build_loop), (BATCHED, sarn.build_batched)):
        graph = sarn.standard_form(placeholder, build)
        graphs.append(GraphFile(layout, _save(graph, directory, layout), module))
    return graphs


def _per_user_loop(
    batched: SlateScoringGraph, one_user: SlateScoringGraph, directory: Path, num_context: int
) -> GraphFile:
    """`cpu-loop` of a split layout: the one-user graph inside a Loop over users (parity
    against the batched module: the same math for any number of users)."""
    with tempfile.TemporaryDirectory() as tmp:
        graph = per_user_loop(_export(one_user, Path(tmp) / "one_user.onnx", num_context))
    return GraphFile(LOOP, _save(graph, directory, LOOP), batched)


def _din(model: DIN, directory: Path, num_context: int, fused: bool) -> list[GraphFile]:
    graphs = []
    if fused and din.DINFused.supports(model):
        module = din.DINFused(model)
        _export(module, directory / file_for(FUSED), num_context, placeholder=True)
        graphs.append(GraphFile(FUSED, file_for(FUSED), module, True))
    split = din.DINSplit(model)
    graphs.append(_per_user_loop(split, din.DINSplit(model, per_user=True), directory, num_context))
    graphs += _single(split, BATCHED, directory, num_context)
    return graphs


def _fat(model: FAT, directory: Path, num_context: int) -> list[GraphFile]:
    split = fat.FATSplit(model)
    one_user = fat.FATSplit(model, per_user=True)
    graphs = [_per_user_loop(split, one_user, directory, num_context)]
    return graphs + _single(split, BATCHED, directory, num_context)


def _single(module: nn.Module, layout: str, directory: Path, num_context: int) -> list[GraphFile]:
    _export(module, directory / file_for(layout), num_context)
    return [GraphFile(layout, file_for(layout), module)]


def export_layouts(
    model: BehaviorModel,
    directory: Path,
    num_context: int,
    exporter: Exporter = "torchscript",
    fused: bool = True,
) -> list[GraphFile]:
    """Writes every layout of `model` into `directory`, in order of preference; `model.onnx`
    is always among them. `fused=False` leaves out the custom-op graphs (no library to check
    their parity with). The dynamo exporter writes the slate-shared graph only: the serving
    layouts rely on TorchScript `symbolic` functions for their placeholder nodes."""
    served: BehaviorModel = serving_copy(model)  # type: ignore[assignment]
    if exporter != "torchscript":
        module = slate_shared(served)
        _export(module, directory / MODEL_FILE, num_context, exporter)
        return [GraphFile(SLATE_SHARED, MODEL_FILE, module)]
    if isinstance(served, SARN):
        return _sarn(served, directory, num_context, fused)
    if isinstance(served, DIN):
        return _din(served, directory, num_context, fused)
    if isinstance(served, FAT) and fat.FATSplit.supports(served):
        return _fat(served, directory, num_context)
    return _single(SlateScoringGraph(served), SLATE_SHARED, directory, num_context)


__all__ = [
    "BATCHED",
    "FUSED",
    "LOOP",
    "SLATE",
    "SLATE_SHARED",
    "GraphFile",
    "export_layouts",
    "has_fused_layout",
    "slate_shared",
]
