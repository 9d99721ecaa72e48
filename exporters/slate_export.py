"""PyTorch -> ONNX for the slate click models (NCM family); serving contract in
`runtime.slate_feeds` and docs/export.md.

The graph is the model's own `forward` on a [B, S, K] session with S and K static: NCM's
readout is unrolled over K at trace time (a fixed GRUCell chain), Transformer+GRU over S, and
SCOT is already masked full attention with static shapes (MODELS.md §4.3). Only B is dynamic.
The graph returns the probabilities of the last slate, [B, K].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from exporters.onnx_export import Exporter, GraphSpec, export_graph, serving_copy
from runtime.slate_feeds import SLATE_INPUTS, SlateContract

SLATE_GRAPH = GraphSpec(
    inputs=SLATE_INPUTS,
    outputs=("scores",),
    dynamic_axes={name: {0: "B"} for name in (*SLATE_INPUTS, "scores")},
)


class SlateClickGraph(nn.Module):
    """A slate model's serving graph: a session in, P(click) of its last slate [B, K] out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(
        self, items: Tensor, cats: Tensor, mask: Tensor, hist_clicks: Tensor, noise: Tensor
    ) -> Tensor:
        logits = self.model(items, cats, mask, hist_clicks, noise)  # [B, S, K]
        return torch.sigmoid(logits[:, -1, :])  # [B, K]


def example_slate_inputs(contract: SlateContract) -> tuple[Tensor, ...]:
    """Tracing inputs with B=3 (> 1, so B stays dynamic) and a mix of real and padded slots."""
    gen = torch.Generator().manual_seed(0)
    shape = (3, contract.slates, contract.slate_size)
    mask = torch.rand(shape, generator=gen) < 0.8
    mask[:, -1, 0] = True  # at least one candidate per row
    items = mask.long()  # OOV (1) where shown, PAD (0) elsewhere: indices every table has
    clicks = (torch.rand(shape, generator=gen) < 0.5).float() * mask
    clicks[:, -1] = 0.0
    return items, items.clone(), mask, clicks, torch.rand(shape, generator=gen)


def export_slate(
    model: nn.Module, path: Path, contract: SlateContract, exporter: Exporter = "torchscript"
) -> tuple[nn.Module, int]:
    """Exports a slate model's serving graph; returns (the traced module, opset)."""
    graph = SlateClickGraph(serving_copy(model))
    opset = export_graph(graph, example_slate_inputs(contract), path, SLATE_GRAPH, exporter)
    return graph, opset
