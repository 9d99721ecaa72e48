"""Session-wise models of MODELS.md §3.7-3.8: SCOT (`scot`) and Transformer+GRU (`ncm-tgru`).

Decisions:

* SCOT is written as masked full attention (§4.3, "SCOT export"): keys are all session items,
  and a query in slate t may attend to the key of slate t′ only if that key was clicked and
  t′ < t, plus an always-visible zero token. This is the clicked-only gather of §3.7 with
  static shapes; the current and later slates' clicks are never visible.
* [proposal] Both models add a residual (attention output + query token) before the head.
  Without it a SCOT query whose user has no earlier click attends only to the zero token, so
  every item of the slate gets the same logit; the residual keeps [e ; u_t] in reach of the head.
* [proposal, §3.8] Transformer+GRU feeds the slate's clicks into the session state:
  h_{t+1} = GRUCell([mean_k features_t ; click-weighted mean of e_t ; click rate_t], h_t),
  h₀ = u₀ = 0. The loop over S is unrolled in Python; `step` is the per-slate step that an
  export with dynamic S would call from the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.ncm.base import SlateConfig, SlateModel
from models.nets.layers import masked_mean


@dataclass
class AttentionConfig(SlateConfig):
    heads: int = 2  # heads of the 2E-wide attention


class SCOT(SlateModel):
    """Session-wise clicked-only transformer over the tokens [e ; u_t]."""

    config_class = AttentionConfig

    def __init__(self, sizes: dict[str, int], config: AttentionConfig | None = None) -> None:
        super().__init__(sizes, config)
        width = 2 * self.config.dim
        self.attention = nn.MultiheadAttention(width, self.config.heads, batch_first=True)
        self.head = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1)
        )

    def forward(
        self,
        items: Tensor,
        cats: Tensor,
        mask: Tensor,
        hist_clicks: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        emb, user, clicks = self.inputs(items, cats, mask, hist_clicks)
        b, s, k, e = emb.shape
        tokens = torch.cat([emb, user.unsqueeze(2).expand_as(emb)], -1).reshape(b, s * k, 2 * e)
        keys = torch.cat([tokens.new_zeros(b, 1, 2 * e), tokens], dim=1)  # [B, 1+SK, 2E]
        blocked = self._blocked(clicks.reshape(b, s * k), s, k)  # [B, SK, 1+SK]
        attended, _ = self.attention(
            tokens,
            keys,
            keys,
            attn_mask=blocked.repeat_interleave(self.config.heads, 0),
            need_weights=False,
        )
        logits: Tensor = self.head(attended + tokens).reshape(b, s, k)
        return logits

    @staticmethod
    def _blocked(clicks: Tensor, s: int, k: int) -> Tensor:
        """clicks [B, SK] -> True where a query may NOT attend a key, [B, SK, 1+SK]."""
        slate_of = torch.arange(s, device=clicks.device).repeat_interleave(k)  # [SK]
        earlier = slate_of.unsqueeze(0) < slate_of.unsqueeze(1)  # [SK query, SK key]
        allowed = earlier.unsqueeze(0) & (clicks > 0.5).unsqueeze(1)  # [B, SK, SK]
        zero_token = torch.ones_like(allowed[:, :, :1])  # always visible: no empty softmax
        return ~torch.cat([zero_token, allowed], dim=2)


class TransformerGRU(SlateModel):
    """Two-stage model: slate-wise attention over [e_k ; h_t], then a GRUCell across slates."""

    config_class = AttentionConfig

    def __init__(self, sizes: dict[str, int], config: AttentionConfig | None = None) -> None:
        super().__init__(sizes, config)
        dim = self.config.dim
        self.attention = nn.MultiheadAttention(2 * dim, self.config.heads, batch_first=True)
        self.out = nn.Linear(2 * dim, 1)
        self.cell = nn.GRUCell(3 * dim + 1, dim)

    def forward(
        self,
        items: Tensor,
        cats: Tensor,
        mask: Tensor,
        hist_clicks: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        emb, _, clicks = self.inputs(items, cats, mask, hist_clicks)
        hidden = emb.new_zeros(emb.shape[0], emb.shape[3])  # h₀ = u₀ = 0, [B, E]
        logits = []
        for t in range(emb.shape[1]):
            slate_logits, hidden = self.step(emb[:, t], mask[:, t], clicks[:, t], hidden)
            logits.append(slate_logits)
        return torch.stack(logits, dim=1)  # [B, S, K]

    def step(
        self, emb: Tensor, mask: Tensor, clicks: Tensor, hidden: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One slate: emb [B,K,E], mask/clicks [B,K], h_t [B,E] -> logits [B,K], h_{t+1}."""
        b, k, e = emb.shape
        tokens = torch.cat([emb, hidden.unsqueeze(1).expand(b, k, e)], dim=-1)  # [B, K, 2E]
        keys = torch.cat([tokens.new_zeros(b, 1, 2 * e), tokens], dim=1)  # [B, 1+K, 2E]
        ignore = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)  # [B, 1+K]
        attended, _ = self.attention(
            tokens, keys, keys, key_padding_mask=ignore, need_weights=False
        )
        features = attended + tokens  # [B, K, 2E]
        logits = self.out(features).squeeze(-1)
        click_count = clicks.sum(-1, keepdim=True)  # [B, 1]
        clicked_mean = (emb * clicks.unsqueeze(-1)).sum(1) / click_count.clamp_min(1.0)  # [B, E]
        shown = mask.to(emb.dtype).sum(-1, keepdim=True)
        summary = torch.cat(
            [masked_mean(features, mask), clicked_mean, click_count / shown.clamp_min(1.0)], -1
        )
        new_hidden = self.cell(summary, hidden)
        shown_any = (shown > 0).to(emb.dtype)  # a padded slate leaves the state alone
        return logits, shown_any * new_hidden + (1 - shown_any) * hidden
