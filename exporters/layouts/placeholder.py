"""Placeholder nodes: the per-candidate core of a serving module as ONE custom-domain node.

In eager PyTorch the node computes `reference(*inputs)` (the model's own math on per-candidate
copies, so the module is checked against the model); the TorchScript exporter writes one
`slatectr::<op>` node with the same inputs, which the graph keeps (`cpu-fused`, the C kernel
of runtime/ortops) or replaces by standard ONNX (`exporters.layouts.onnx_graph.replace_node`).
The reference may read only the tensors it is given: module parameters touched inside an
autograd Function's forward break the tracer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from runtime.ortops import DOMAIN


def placeholder(op: str, reference: Callable[..., Tensor], like: int) -> Callable[..., Tensor]:
    """A function of tensors -> [N, D] float: eager `reference`, exported `DOMAIN::op`
    (its output typed like input `like`, with two unknown dims)."""

    class Node(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *args: Tensor) -> Tensor:
            return reference(*args)

        @staticmethod
        def symbolic(g: Any, *args: Any) -> Any:
            out = g.op(f"{DOMAIN}::{op}", *args)
            out.setType(args[like].type().with_sizes([None, None]))
            return out

    Node.__name__ = op

    def apply(*args: Tensor) -> Tensor:
        out: Tensor = Node.apply(*args)
        return out

    return apply
