"""SARN written out literally (MODELS.md §1.2, the official TF1 code), for tests/test_sarn.py.

Materialised relation cube, the gate on the concatenation [t; G_ij], MLP_reg on every G_ij, H
from the cube: no linearity shortcuts, no custom backward passes. It takes a model only for its
parameters and its unchanged modules (embedding tables, the output head, the MLPs applied
literally), so both compute with the same weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from models.data.batch import BehaviorBatch
from models.nets.sarn import SARN


class Literal(NamedTuple):
    logits: torch.Tensor
    positional: torch.Tensor  # weighted, as in TrainOutput.aux_losses
    auxiliary: torch.Tensor


def literal_sarn(model: SARN, batch: BehaviorBatch, perm: torch.Tensor) -> Literal:
    """Logits and the weighted auxiliary losses; `perm` is L_aux's shuffle along j."""
    cfg = model.config
    mask = (batch.hist_items != 0).float()  # [B, L]
    length = batch.hist_items.shape[1]

    def embed(items: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.item_embedding(items), model.category_embedding(cats)], -1)

    x = embed(batch.hist_items, batch.hist_cats) * mask[..., None]  # [B, L, D]
    t = embed(batch.items, batch.cats)  # [B, D]

    def normalized(w: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ w.T)
        return h / (h.norm(dim=-1, keepdim=True) + 1e-10)  # the code's formula; 0/1e-10 = 0

    phi, psi = normalized(model.relational.phi.weight), normalized(model.relational.psi.weight)
    relation = phi @ psi.transpose(1, 2)  # [B, L(i), L(j)]
    cube = relation[..., None] * x[:, :, None, :] + x[:, None, :, :]  # [B, L, L, D]
    # Gate: one 2D -> H layer on [t; G_ij], ReLU, H -> 1, sigmoid.
    joined = torch.cat([t[:, None, None, :].expand(-1, length, length, -1), cube], dim=-1)
    gate = torch.sigmoid(model.gate.out(torch.relu(model.gate.hidden(joined))))  # [B,L,L,1]
    cells = gate * cube * mask[:, :, None, None]
    u = cells.reshape(len(t), length * length, -1).amax(dim=1).clamp_min(0.0)
    seq_len = mask.sum(1, keepdim=True).clamp_min(1.0)  # [B, 1]
    mean = x.sum(1) / seq_len
    mx = x.amax(1).clamp_min(0.0)
    fields = [table(batch.context[:, c]) for c, table in enumerate(model.context_embeddings)]
    ctx = torch.cat(fields, dim=-1) if fields else t[:, :0]
    logits = model.head(torch.cat([t, u, t * mean, mx, mean, ctx], dim=-1)).unsqueeze(-1)  # [B, 1]
    # Positional regression: MLP_reg on every cell against sign(j−i)·√(|j−i|/L).
    assert model.positional is not None and model.auxiliary is not None
    pos = torch.arange(length, dtype=torch.float32)
    offset = pos[None, :] - pos[:, None]
    target = offset.sign() * (offset.abs() / length).sqrt()
    pred = model.positional.mlp(cube).squeeze(-1)  # [B, L, L]
    positional = ((pred - target) ** 2 * mask[:, :, None]).mean() * cfg.positional_weight
    # Auxiliary loss: H_j = (L/seq_len)·mean_i G_ij, shuffled along j.
    h = (cube.mean(dim=1) * length / seq_len[:, :, None])[:, perm]
    assert batch.neg_hist_items is not None and batch.neg_hist_cats is not None
    neg = embed(batch.neg_hist_items, batch.neg_hist_cats) * mask[..., None]
    net = model.auxiliary.net
    click = torch.log_softmax(net(torch.cat([h, x], -1)), -1)[..., 0]
    no_click = torch.log_softmax(net(torch.cat([h, neg], -1)), -1)[..., 1]
    auxiliary = (-(click + no_click) * mask).mean() * cfg.auxiliary_weight
    return Literal(logits, positional, auxiliary)
