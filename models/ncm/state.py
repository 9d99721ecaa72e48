"""The causal user state u_t of MODELS.md §3.2 and §4.3.

u_t is the mean embedding of the items clicked in slates strictly before t (0 when there are
none). [proposal, §3.2] Causal u_t everywhere: the authors' notebooks gather one u per session at
index `length−1` in training, which leaks later clicks into earlier slates; we do not.

The shift is a concatenation with a zero slate rather than "inclusive cumsum minus the slate",
so a click in slate t cannot move u_{≤t} even by float rounding. Uses CumSum (ONNX opset ≥ 11).
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_user_state(emb: Tensor, hist_clicks: Tensor) -> Tensor:
    """emb [B, S, K, E], hist_clicks [B, S, K] (0 on padding) -> u [B, S, E]."""
    weighted = (emb * hist_clicks.unsqueeze(-1)).sum(dim=2)  # [B, S, E]
    count = hist_clicks.sum(dim=2, keepdim=True)  # [B, S, 1]
    # Slate t sees the totals of slates 0..t-1: shift by one slate, then cumulate.
    before = torch.cat([torch.zeros_like(weighted[:, :1]), weighted[:, :-1]], dim=1).cumsum(1)
    seen = torch.cat([torch.zeros_like(count[:, :1]), count[:, :-1]], dim=1).cumsum(1)
    return before / seen.clamp_min(1.0)
