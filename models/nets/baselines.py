"""Baseline behaviour CTR models of the SARN paper's Table II: DIN, GRU and Wide&Deep.

All three follow the `BehaviorModel` contract and share SARN's input representation: an item is
its item embedding ⊕ its category embedding (18 + 18 = 36, `D` below). Histories are oldest
first, PAD-padded at the end; every model masks padded slots, so appending padding never changes
a score and an empty history is legal.

Decisions recorded here ([proposal] where MODELS.md leaves it open):

* The user-id embedding is not used by DIN and GRU, as in the SARN/DIEN code: with the paper's
  split by user every test user is out of vocabulary. Wide&Deep keeps it (its deep part is
  "user/context embeddings + pooled history" by definition).
* Context fields (`context_<name>` vocabularies, in the order of `sizes`, which is the order of
  the feature spec's `context_fields`) enter every model's MLP as one embedding per field.
* DIN follows the DIEN code's `Model_DIN` feature set minus the user id:
  [t, Σh, t⊙Σh, attention(h, t)] → affine BN → 200 Dice → 80 Dice → 1; its activation unit is
  DIN's [h, t, h−t, h⊙t] → 80 Dice → 40 Dice → 1 with weights masked but *not* softmaxed
  (the DIN paper keeps the intensity of interest).
* GRU's hidden size equals D so that h_last ⊙ t is defined.
* Wide&Deep's wide part is a linear model on the target item, the target category and the
  hashed cross (target category × history category), summed over the history so that each
  history category counts as often as it occurs.
* A two-column softmax (the DIEN code) equals one logit z0 − z1, so every model returns [B].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from models.nets.base import BehaviorModel, UserState
from models.nets.layers import AffineNorm, Dice, masked_mean
from runtime.features import PAD

_CROSS_PRIME = 1_000_003  # multiplier of the (target, history) category hash


def _embedding(size: int, dim: int) -> nn.Embedding:
    """Glorot-uniform table (the TF defaults of the DIEN/SARN code) whose PAD row stays 0."""
    table = nn.Embedding(size, dim, padding_idx=PAD)
    nn.init.xavier_uniform_(table.weight)
    with torch.no_grad():
        table.weight[PAD].zero_()
    return table


class ItemEmbedding(nn.Module):
    """(item, category) ids [...] -> item ⊕ category embedding [..., 2·dim]."""

    def __init__(self, sizes: dict[str, int], dim: int) -> None:
        super().__init__()
        self.item = _embedding(sizes["item"], dim)
        self.category = _embedding(sizes["category"], dim)
        self.dim = 2 * dim

    def forward(self, items: Tensor, cats: Tensor) -> Tensor:
        return torch.cat([self.item(items), self.category(cats)], dim=-1)


class ContextEmbedding(nn.Module):
    """context ids [B, C] -> concatenated field embeddings [B, C·dim] (C may be 0)."""

    def __init__(self, sizes: dict[str, int], dim: int) -> None:
        super().__init__()
        names = [n for n in sizes if n.startswith("context_")]
        self.fields = nn.ModuleList(_embedding(sizes[n], dim) for n in names)
        self.dim = dim * len(names)

    def forward(self, context: Tensor) -> Tensor:
        parts = [table(context[:, i]) for i, table in enumerate(self.fields)]
        return torch.cat(parts, dim=-1) if parts else context.new_zeros(context.shape[0], 0).float()


class MLP(nn.Module):
    """in_dim -> hidden (Linear + Dice or ReLU each) -> 1 logit."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], dice: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), Dice(width) if dice else nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def _history(embed: ItemEmbedding, hist_items: Tensor, hist_cats: Tensor) -> tuple[Tensor, Tensor]:
    """-> history embeddings [U, L, D] with padded rows exactly 0, mask [U, L] float."""
    mask = (hist_items != PAD).float()
    return embed(hist_items, hist_cats) * mask.unsqueeze(-1), mask


# ---------------------------------------------------------------------------------------------
@dataclass
class DINConfig:
    embed_dim: int = 18  # per id; an item is item ⊕ category = 2·embed_dim
    context_dim: int = 18  # per context field
    attention_hidden: tuple[int, ...] = (80, 40)
    mlp_hidden: tuple[int, ...] = (200, 80)
    tasks: tuple[str, ...] = ("ctr",)  # ("ctr", "cvr"): a second MLP on the same features


class ActivationUnit(nn.Module):
    """DIN's local activation unit: h [N, L, D], t [N, D], mask [N, L] -> weights [N, L]."""

    def __init__(self, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.mlp = MLP(4 * dim, hidden, dice=True)

    def forward(self, h: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        t = t.unsqueeze(1).expand_as(h)  # [N, L, D]
        weights = self.mlp(torch.cat([h, t, h - t, h * t], dim=-1))  # [N, L]
        return weights * mask  # no softmax: DIN keeps the intensity of interest


class DIN(BehaviorModel):
    """Deep Interest Network (Zhou et al., KDD 2018): target attention over the history."""

    config_class = DINConfig

    def __init__(self, sizes: dict[str, int], config: DINConfig | None = None) -> None:
        super().__init__()
        self.config = config or DINConfig()
        self.embed = ItemEmbedding(sizes, self.config.embed_dim)
        self.context = ContextEmbedding(sizes, self.config.context_dim)
        d = self.embed.dim
        self.attention = ActivationUnit(d, self.config.attention_hidden)
        in_dim = 4 * d + self.context.dim
        self.norm = AffineNorm(in_dim)
        self.mlp = MLP(in_dim, self.config.mlp_hidden, dice=True)
        self._add_towers(self.config.tasks, lambda: MLP(in_dim, self.config.mlp_hidden, True))

    def encode_user(
        self, user: Tensor, hist_items: Tensor, hist_cats: Tensor, context: Tensor
    ) -> UserState:
        hist, mask = _history(self.embed, hist_items, hist_cats)  # [U, L, D], [U, L]
        return hist, mask, self.context(context)

    def score_candidates(self, state: UserState, items: Tensor, cats: Tensor) -> Tensor:
        hist, mask, ctx = state
        t = self.embed(items, cats)  # [N, D]
        weights = self.attention(hist, t, mask)  # [N, L]
        interest = (weights.unsqueeze(-1) * hist).sum(dim=1)  # [N, D]
        total = hist.sum(dim=1)  # [N, D], padded rows are 0
        z = self.norm(torch.cat([t, total, t * total, interest, ctx], dim=-1))  # [N, 4D + C·d]
        return self._task_logits(z, self.mlp(z))


# ---------------------------------------------------------------------------------------------
@dataclass
class GRUCTRConfig:
    embed_dim: int = 18  # per id; the GRU's hidden size is 2·embed_dim
    context_dim: int = 18
    mlp_hidden: tuple[int, ...] = (200, 80)
    tasks: tuple[str, ...] = ("ctr",)  # ("ctr", "cvr"): a second MLP on the same features


class GRUCTR(BehaviorModel):
    """GRU baseline: the GRU's state after the last real click summarises the user."""

    config_class = GRUCTRConfig

    def __init__(self, sizes: dict[str, int], config: GRUCTRConfig | None = None) -> None:
        super().__init__()
        self.config = config or GRUCTRConfig()
        self.embed = ItemEmbedding(sizes, self.config.embed_dim)
        self.context = ContextEmbedding(sizes, self.config.context_dim)
        d = self.embed.dim
        self.gru = nn.GRU(d, d, batch_first=True)
        in_dim = 3 * d + self.context.dim
        self.norm = AffineNorm(in_dim)
        self.mlp = MLP(in_dim, self.config.mlp_hidden, dice=True)
        self._add_towers(self.config.tasks, lambda: MLP(in_dim, self.config.mlp_hidden, True))

    def encode_user(
        self, user: Tensor, hist_items: Tensor, hist_cats: Tensor, context: Tensor
    ) -> UserState:
        hist, mask = _history(self.embed, hist_items, hist_cats)  # [U, L, D], [U, L]
        out, _ = self.gru(hist)  # [U, L, D]
        # PAD sits at the end, so the state at position length−1 never saw padding.
        lengths = mask.sum(dim=1).long()  # [U]
        last = (lengths - 1).clamp_min(0).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        h_last = out.gather(1, last).squeeze(1)  # [U, D]
        h_last = h_last * (lengths > 0).float().unsqueeze(-1)  # empty history -> 0
        return h_last, self.context(context)

    def score_candidates(self, state: UserState, items: Tensor, cats: Tensor) -> Tensor:
        h_last, ctx = state
        t = self.embed(items, cats)  # [N, D]
        z = self.norm(torch.cat([h_last, t, h_last * t, ctx], dim=-1))  # [N, 3D + C·d]
        return self._task_logits(z, self.mlp(z))


# ---------------------------------------------------------------------------------------------
@dataclass
class WideDeepConfig:
    embed_dim: int = 18  # per id, as in the other models
    user_dim: int = 18
    context_dim: int = 18
    mlp_hidden: tuple[int, ...] = (200, 80)
    cross_buckets: int = 100_003  # hashed (target category × history category) weights
    tasks: tuple[str, ...] = ("ctr",)  # single-task only: the wide part has no second tower


class WideDeep(BehaviorModel):
    """Wide & Deep (Cheng et al., 2016): a linear model on crossed ids + an MLP on embeddings."""

    config_class = WideDeepConfig
    supports_multitask: ClassVar[bool] = False

    def __init__(self, sizes: dict[str, int], config: WideDeepConfig | None = None) -> None:
        super().__init__()
        self.config = config or WideDeepConfig()
        self.embed = ItemEmbedding(sizes, self.config.embed_dim)
        self.user = _embedding(sizes["user"], self.config.user_dim)
        self.context = ContextEmbedding(sizes, self.config.context_dim)
        in_dim = 2 * self.embed.dim + self.config.user_dim + self.context.dim
        self.deep = MLP(in_dim, self.config.mlp_hidden, dice=False)
        # Wide weights start at 0: the model starts as the deep part alone.
        self.wide_item = nn.Embedding(sizes["item"], 1)
        self.wide_cat = nn.Embedding(sizes["category"], 1)
        self.wide_cross = nn.Embedding(self.config.cross_buckets, 1)
        for table in (self.wide_item, self.wide_cat, self.wide_cross):
            nn.init.zeros_(table.weight)
        self._add_towers(self.config.tasks, None)

    def encode_user(
        self, user: Tensor, hist_items: Tensor, hist_cats: Tensor, context: Tensor
    ) -> UserState:
        hist, mask = _history(self.embed, hist_items, hist_cats)  # [U, L, D], [U, L]
        profile = torch.cat([self.user(user), self.context(context)], dim=-1)  # [U, du + C·d]
        return masked_mean(hist, mask), hist_cats, mask, profile

    def score_candidates(self, state: UserState, items: Tensor, cats: Tensor) -> Tensor:
        pooled, hist_cats, mask, profile = state
        t = self.embed(items, cats)  # [N, D]
        deep = self.deep(torch.cat([t, pooled, profile], dim=-1))  # [N]
        return (deep + self._wide(items, cats, hist_cats, mask)).unsqueeze(-1)  # [N, 1]

    def _wide(self, items: Tensor, cats: Tensor, hist_cats: Tensor, mask: Tensor) -> Tensor:
        """Linear part: item + category + Σ_history cross(target category, history category)."""
        cross = (cats.unsqueeze(1) * _CROSS_PRIME + hist_cats) % self.config.cross_buckets
        crossed = (self.wide_cross(cross).squeeze(-1) * mask).sum(dim=1)  # [N]
        return self.wide_item(items).squeeze(-1) + self.wide_cat(cats).squeeze(-1) + crossed
