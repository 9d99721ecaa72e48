"""Slate-wise baselines of MODELS.md §3.3: logistic regression and the slate-wise GRU.

Both see the session only through the causal user state u_t; the session axis is folded into
the batch. Neither reads any click inside the slate being scored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.ncm.base import SlateModel


class SlateLogReg(SlateModel):
    """`ncm-lr`: logit = Linear([e_k ; u_t]) per item (§3.3, "Logistic regression", NN emb)."""

    def __init__(self, sizes: dict[str, int], config: object = None) -> None:
        super().__init__(sizes, config)
        self.linear = nn.Linear(2 * self.config.dim, 1)

    def forward(
        self,
        items: Tensor,
        cats: Tensor,
        mask: Tensor,
        hist_clicks: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        emb, user, _ = self.inputs(items, cats, mask, hist_clicks)  # [B,S,K,E], [B,S,E]
        tokens = torch.cat([emb, user.unsqueeze(2).expand_as(emb)], dim=-1)  # [B, S, K, 2E]
        logits: Tensor = self.linear(tokens).squeeze(-1)
        return logits


class SlateGRU(SlateModel):
    """`ncm-gru`: GRU(E, E) over the K items of a slate, h₀ = u_t, Linear(E→1) per position.

    No readout: position k sees the items above it but never a click of its own slate.
    Padding sits at the end of a slate, so it cannot reach a real position through the GRU.
    """

    def __init__(self, sizes: dict[str, int], config: object = None) -> None:
        super().__init__(sizes, config)
        dim = self.config.dim
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, 1)

    def forward(
        self,
        items: Tensor,
        cats: Tensor,
        mask: Tensor,
        hist_clicks: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        emb, user, _ = self.inputs(items, cats, mask, hist_clicks)
        b, s, k, e = emb.shape
        hidden, _ = self.gru(emb.reshape(b * s, k, e), user.reshape(1, b * s, e))  # [BS, K, E]
        logits: Tensor = self.head(hidden).reshape(b, s, k)
        return logits
