"""SARN's pairwise kernels: work on the relation cells (i, j) without the relation cube.

The cube G_ij = R_ij·x_i + x_j [N, L, L, D] is linear in the per-item vectors, so every
linear map of it is a map of [N, L, ·] tensors combined with R [N, L, L] (`pairwise`). The two
places that need every cell, an MLP's ReLU layer (the target gate, MLP_reg) and the attentive
max-pooling, are written as autograd Functions whose backward passes read the [N, L, L, K]
activations once through batched matmuls, or not at all: autograd's generic broadcast
backward makes several full-size temporaries per op, and that, not the forward, dominated a
SARN training step. Without gradients (eval, export) the same forward runs as plain ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def pairwise(relation: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """[N, L, L], [N, L, K], [N, L, K] -> [N, L(i), L(j), K]: R_ij·source_i + target_j.

    With source = W x and target = W x + b this is W G_ij + b (linearity), in one pass.
    """
    return torch.addcmul(target.unsqueeze(-3), relation.unsqueeze(-1), source.unsqueeze(-2))


def pairwise_channels_first(relation: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """`pairwise` laid out [N, K, L(i), L(j)]: per-channel planes of L·L contiguous cells,
    which ONNX Runtime broadcasts, contracts and reduces over far faster than [.., K]-last."""
    src, dst = source.transpose(1, 2), target.transpose(1, 2)  # [N, K, L]
    return torch.addcmul(dst.unsqueeze(2), relation.unsqueeze(1), src.unsqueeze(3))


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether to run the autograd Functions; an ONNX export always traces the plain ops."""
    if torch.onnx.is_in_onnx_export() or not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in tensors)


def _relu_dot_forward(
    relation: Tensor, source: Tensor, target: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """-> (w·ReLU(R_ij s_i + t_j) [N, L, L], the ReLU output [N, L, L, K])."""
    hidden = pairwise(relation, source, target).relu_()  # [N, L, L, K]
    return hidden @ weight, hidden


class _PairwiseReluDot(torch.autograd.Function):
    """Backward through the 0/1 activity pattern M_ijk = [hidden_ijk > 0]; with upstream g:
    ∂R_ij = g_ij Σ_k M_ijk w_k s_ik,  ∂s_ik = w_k A_ik with A_ik = Σ_j g_ij R_ij M_ijk,
    ∂t_jk = w_k C_jk with C_jk = Σ_i g_ij M_ijk,  ∂w_k = Σ_i s_ik A_ik + Σ_j t_jk C_jk
    (Σ_ij g_ij hidden_ijk, expanded by linearity of the active units)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, relation: Tensor, source: Tensor, target: Tensor, weight: Tensor
    ) -> Tensor:
        out, hidden = _relu_dot_forward(relation, source, target, weight)
        active = hidden.sign_()  # [N, L, L, K] M in {0, 1}, reusing the buffer
        ctx.save_for_backward(relation, source, target, weight, active)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        relation, source, target, weight, active = ctx.saved_tensors
        n, length, _, k = active.shape
        rows = active.view(n * length, length, k)  # batch (n, i): [L(j), K]
        ws = (source * weight).reshape(n * length, k, 1)
        grad_relation = torch.bmm(rows, ws).view(n, length, length) * grad  # [N, L, L]
        gr = (grad * relation).reshape(n * length, 1, length)
        a = torch.bmm(gr, rows).view(n, length, k)  # [N, L(i), K]
        c = (active * grad.unsqueeze(-1)).sum(dim=1)  # [N, L(j), K]
        grad_weight = (source * a).sum(dim=(0, 1)) + (target * c).sum(dim=(0, 1))  # [K]
        return grad_relation, a * weight, c * weight, grad_weight


def pairwise_relu_dot(relation: Tensor, source: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """[N, L, L], [N, L, K], [N, L, K], [K] -> [N, L, L]: w·ReLU(R_ij s_i + t_j)."""
    if _needs_grad(relation, source, target, weight):
        out: Tensor = _PairwiseReluDot.apply(relation, source, target, weight)
        return out
    return _relu_dot_forward(relation, source, target, weight)[0]


def _cells(weight: Tensor, relation: Tensor, x: Tensor) -> Tensor:
    """w_ij·(R_ij x_i + x_j) = (w·R)_ij x_i + w_ij x_j: [N, L, L], [N, L, L], [N, L, D] ->
    [N, L, L, D]."""
    cells = (weight * relation).unsqueeze(-1) * x.unsqueeze(2)  # [N, L, L, D]
    return cells.addcmul_(weight.unsqueeze(-1), x.unsqueeze(1))  # its own buffer: in place


class _PairwiseMaxPool(torch.autograd.Function):
    """Backward to the one winning cell per (n, d), located by index, so it costs O(N·D).

    amax's backward instead splits the gradient evenly between tied cells. Cells tie only
    between duplicate history items (same item and category: identical cells computed from
    identical inputs, so any split gives the same parameter gradient) or at exact zeros (cells
    of padded slots, whose parameter gradients vanish: masked weight, zero embedding, R's
    ReLU at 0). Parameter gradients therefore match amax's up to float rounding.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, weight: Tensor, relation: Tensor, x: Tensor) -> Tensor:
        pooled, index = _cells(weight, relation, x).flatten(1, 2).max(dim=1)  # [N, D] each
        ctx.save_for_backward(weight, relation, x, index)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        weight, relation, x, index = ctx.saved_tensors
        n, length, d = x.shape
        src, dst = index // length, index % length  # [N, D] winning i and j per channel
        x_src = x.gather(1, src.unsqueeze(1)).squeeze(1)  # [N, D] x_{i*, d}
        x_dst = x.gather(1, dst.unsqueeze(1)).squeeze(1)  # [N, D] x_{j*, d}
        w = weight.flatten(1).gather(1, index)  # [N, D]
        r = relation.flatten(1).gather(1, index)  # [N, D]
        flat = (n, length * length)
        grad_weight = grad.new_zeros(flat).scatter_add_(1, index, grad * (r * x_src + x_dst))
        grad_relation = grad.new_zeros(flat).scatter_add_(1, index, grad * w * x_src)
        grad_x = grad.new_zeros(n, length, d)
        grad_x.scatter_add_(1, src.unsqueeze(1), (grad * w * r).unsqueeze(1))
        grad_x.scatter_add_(1, dst.unsqueeze(1), (grad * w).unsqueeze(1))
        cube = (n, length, length)
        return grad_weight.view(cube), grad_relation.view(cube), grad_x


def pairwise_max_pool(weight: Tensor, relation: Tensor, x: Tensor) -> Tensor:
    """max_ij w_ij·(R_ij x_i + x_j): [N, L, L], [N, L, L], [N, L, D] -> [N, D]."""
    if _needs_grad(weight, relation, x):
        out: Tensor = _PairwiseMaxPool.apply(weight, relation, x)
        return out
    return _cells(weight, relation, x).amax(dim=(1, 2))


__all__ = ["pairwise", "pairwise_channels_first", "pairwise_max_pool", "pairwise_relu_dot"]
