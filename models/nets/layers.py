"""Small building blocks shared by several models."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dice(nn.Module):
    """Dice activation (DIN/DIEN): alpha·(1−p)·x + p·x with p = σ((x − μ) / (σ + eps)).

    [proposal, MODELS.md §1.6 #7] The DIEN code uses the current batch's statistics at train
    *and* test time, so a score depends on the rest of its batch (and B = 1 gives p = 0.5).
    We keep batch statistics while training (faithful) and track running statistics with
    momentum, like BatchNorm; in eval mode the running statistics are used, so a served score
    never depends on its batch and the export holds constants.

    Works on [B, D] and on [..., D] (statistics over every axis but the last).
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-9) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            flat = x.reshape(-1, x.shape[-1])
            mean = flat.mean(dim=0)
            var = flat.var(dim=0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        return self.alpha * (1 - p) * x + p * x


class AffineNorm(nn.Module):
    """γ·x/√(1+ε) + β: what SARN's TF1 BatchNorm computes, since its moving statistics are
    never updated (MODELS.md §1.2 item 4). Batch-independent by construction."""

    def __init__(self, dim: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = float(1.0 / (1.0 + eps) ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * self.scale + self.bias


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over axis 1 of [B, L, D] where mask [B, L] is 1 for real rows; empty rows give 0."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def last_slots(x: Tensor, mask: Tensor, count: int) -> Tensor:
    """The last `count` real rows of x [B, L, D] (padding at the end) -> [B, count, D], oldest
    of them first; rows a short history lacks are 0."""
    length = mask.sum(dim=1, keepdim=True).long()  # [B, 1]
    slot = length - count + torch.arange(count, device=x.device)  # [B, count]
    present = (slot >= 0).unsqueeze(-1).to(x.dtype)  # [B, count, 1]
    index = slot.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x.gather(1, index) * present
