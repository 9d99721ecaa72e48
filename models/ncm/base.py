"""The contract every slate click model implements, and the pieces they share.

A slate model scores whole sessions: `forward(items, cats, mask, hist_clicks, noise)` with
[B, S, K] inputs returns click logits [B, S, K] (MODELS.md §4.3). `hist_clicks` are the
observed clicks the model may use; every model only lets slate t see the clicks of slates < t
(the NCM readout also sees the positions above it within slate t, but at inference only through
its own predictions). `noise` (uniform(0, 1), [B, S, K]) drives the sampling readout of NCM and
is ignored by the other models, so that every model exports with the same inputs.

Training goes through `forward_train(batch, epoch)`, which may use the batch's labels (teacher
forcing) and return auxiliary losses (AdvNCM); the task adds BCE over the target positions.
Models own no loss or optimizer, and no Python control flow depends on tensor values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from models.ncm.data import SlateBatch
from models.ncm.state import causal_user_state
from models.nets.base import TrainOutput
from runtime.features import OOV


@dataclass
class SlateConfig:
    dim: int = 32  # E: item embedding size and GRU hidden size (K lives in the feature spec)
    max_positions: int = 32  # rows of the position table; later positions share the last row


class SlateEmbedding(nn.Module):
    """e_k = item embedding + category embedding + position-k embedding, [.., K] -> [.., K, E].

    PAD (0) and OOV (1) rows start at zero, so an item unseen in training falls back to its
    category (the authors map unseen items to a zero vector, §3.2).

    [proposal] The position embedding is ours: the authors' embeddings carry no position, which
    leaves logistic regression, SCOT and the slate-wise attention of Transformer+GRU blind to
    position bias (the GRUs see position through their recurrence). With it every model can
    learn the examination curve, and what separates them is what they do with the slate.
    """

    def __init__(self, n_items: int, n_categories: int, dim: int, max_positions: int) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items, dim, padding_idx=0)
        self.categories = nn.Embedding(n_categories, dim, padding_idx=0)
        self.positions = nn.Embedding(max_positions, dim)
        for table in (self.items, self.categories, self.positions):
            nn.init.normal_(table.weight, std=0.1)
        with torch.no_grad():
            for table in (self.items, self.categories):
                table.weight[: OOV + 1].zero_()

    def forward(self, items: Tensor, cats: Tensor) -> Tensor:
        k = items.shape[-1]
        position = torch.arange(k, device=items.device).clamp_max(self.positions.num_embeddings - 1)
        out: Tensor = self.items(items) + self.categories(cats) + self.positions(position)
        return out


class SlateModel(nn.Module):
    """Base class: embedding, causal user state, and the F1 threshold buffer.

    `click_threshold` is the probability threshold that maximises F1 on training predictions
    (MODELS.md §3.9); the task fits it, and it travels with the weights.
    """

    config_class: ClassVar[type[Any]] = SlateConfig
    click_threshold: Tensor  # buffer, a probability in (0, 1)

    def __init__(self, sizes: dict[str, int], config: Any = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.config_class()
        cfg = self.config
        self.embed = SlateEmbedding(sizes["item"], sizes["category"], cfg.dim, cfg.max_positions)
        self.register_buffer("click_threshold", torch.tensor(0.5))

    def forward(
        self,
        items: Tensor,
        cats: Tensor,
        mask: Tensor,
        hist_clicks: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        """[B, S, K] ids, mask, observed clicks (and noise) -> logits [B, S, K]."""
        raise NotImplementedError

    def forward_train(self, batch: SlateBatch, epoch: int) -> TrainOutput:
        """Training form; the default is the inference forward on the batch's history."""
        return TrainOutput(self(batch.items, batch.cats, batch.mask, batch.hist_clicks))

    def inputs(
        self, items: Tensor, cats: Tensor, mask: Tensor, hist_clicks: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> item embeddings e [B, S, K, E] (0 on padding), user state u [B, S, E], and the
        clicks on real items [B, S, K]."""
        real = mask.to(hist_clicks.dtype)
        clicks = hist_clicks * real  # padding never counts as a click
        emb = self.embed(items, cats) * real.unsqueeze(-1)
        return emb, causal_user_state(emb, clicks), clicks
