"""FAT's serving layout (`batched`, for CPU and GPU alike): split target attention and a
field-major transformer, same weights and same math as `FAT.score_candidates`.

Target attention: the score MLP's first layer (A = 32 units over [h, t, h−t, h⊙t]) is split
as in DIN (exporters/layouts/din.py): one batched MatMul [N, A, d+1] @ [N, d+1, L] (K = 65
instead of 4d = 256), the right matrix built directly as [N, A, d+1]; no [N, L, 4d]
concatenation is written.

Field transformer, tokens kept field-major [F, N, d]: every field-specific linear map is one
MatMul([F, N, a], W[F, a, b]) with no transposes in or out. The F×F attention of each
candidate is q_i ⊙ k_j [F, F, N, d] summed per head by a MatMul with a 0/1 [d, H] matrix,
a softmax over j written out (ORT's Softmax on a non-last axis transposes internally), and
spread back with the transposed 0/1 matrix: no N·H tiny MatMuls.

Layer 1's tokens of the user and context fields depend on the user alone, so their
LayerNorm and Q/K/V projections run once per user and are gathered per candidate; only the
history, item and category tokens are projected per candidate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporters.onnx_export import SlateInputs, SlateScoringGraph
from models.nets.fat import FAT, MASK_FILL, FATBlock
from models.nets.hypernet import FieldWeights
from runtime.features import PAD


class FATSplit(SlateScoringGraph):
    """A materialised FAT (`FAT.materialized()`) in the serving layout above."""

    model: FAT
    head_sum: Tensor

    def __init__(self, model: FAT, per_user: bool = False) -> None:
        if not self.supports(model):
            raise ValueError(
                "FATSplit covers a materialised FAT with target-attention pooling, "
                "recent_tokens=0, history_recency=0 and residual='single'"
            )
        super().__init__(model, per_user)
        cfg = model.config
        head_sum = torch.repeat_interleave(torch.eye(cfg.heads), cfg.d // cfg.heads, 0)
        self.register_buffer("head_sum", head_sum, persistent=False)  # [d, H] 0/1

    @staticmethod
    def supports(model: FAT) -> bool:
        """Whether this layout computes `model` (other FAT options keep the slate-shared graph)."""
        cfg = model.config
        plain = cfg.recent_tokens == 0 and cfg.history_recency == 0 and cfg.residual == "single"
        return plain and model.is_materialized and model.target_pool is not None

    def _pool(self, q: Tensor, hist: Tensor, mask: Tensor, idx: Tensor) -> Tensor:
        """Target attention of q [N, d] over its user's hist [U, L, d] -> [N, d]."""
        assert self.model.target_pool is not None
        s1, s2 = self.model.target_pool.score[0], self.model.target_pool.score[2]
        assert isinstance(s1, nn.Linear) and isinstance(s2, nn.Linear)
        d = q.shape[1]
        w = s1.weight  # [A, 4d]
        w_h, w_t, w_d, w_p = w[:, :d], w[:, d : 2 * d], w[:, 2 * d : 3 * d], w[:, 3 * d :]
        mat = q[:, None, :] * w_p[None] + (w_h + w_d)[None]  # [N, A, d]
        row = F.linear(q, w_t - w_d, s1.bias)  # [N, A]
        right = torch.cat([mat, row[:, :, None]], dim=2)  # [N, A, d+1]
        h_aug = torch.cat([hist, torch.ones_like(hist[:, :, :1])], dim=-1)  # [U, L, d+1]
        z = right @ self.for_candidates(h_aug.transpose(1, 2), idx)  # [N, A, L]
        logits = (torch.matmul(s2.weight, F.silu(z)) + s2.bias[:, None])[:, 0]  # [N, L]
        m = self.for_candidates(mask, idx)  # [N|1, L]
        weights = logits.masked_fill(m == 0, MASK_FILL).softmax(dim=-1) * m
        return (weights[:, None, :] @ self.for_candidates(hist, idx))[:, 0]  # [N, d]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, pair: Tensor) -> Tensor:
        """Field attention, q/k/v [F, N, d] -> mixed [F, N, d] (heads concatenated)."""
        fields, n, d = q.shape
        heads = self.head_sum.shape[1]
        qk = q.reshape(fields, 1, n, d) * k.reshape(1, fields, n, d)  # [F(i), F(j), N, d]
        scores = torch.matmul(qk, self.head_sum / math.sqrt(d // heads))  # [F, F, N, H]
        scores = scores * pair[:, :, None, None]
        e = (scores - scores.amax(dim=1, keepdim=True)).exp()  # softmax over j, written out
        probs = e / e.sum(dim=1, keepdim=True)
        spread = torch.matmul(probs, self.head_sum.t())  # [F, F, N, d]
        return (spread * v.reshape(1, fields, n, d)).sum(1)  # [F, N, d]

    def _ffn(self, z: Tensor, mixed: Tensor, block: FATBlock, w: FieldWeights) -> Tensor:
        x = block.norm_ffn(mixed)  # [F, N, d]
        return z + torch.matmul(F.silu(torch.matmul(x, w.ffn1)), w.ffn2)

    def _qkv(self, h: Tensor, w: FieldWeights, fields: slice) -> tuple[Tensor, ...]:
        """Field-specific Q, K, V of h [F', N, d] for the fields `fields` of the model."""
        return tuple(torch.matmul(h, p[fields]) for p in (w.q, w.k, w.v))

    def _layers(self) -> list[tuple[FATBlock, FieldWeights]]:
        """(block, its materialised field weights) per layer, in order."""
        m = self.model
        pairs = zip(m.blocks, m.field_weights, strict=True)
        return [(block, weights(m.meta)) for block, weights in pairs]  # type: ignore[misc]

    def _first_block(
        self,
        user_tokens: Tensor,
        cand_tokens: Tensor,
        idx: Tensor,
        layer: tuple[FATBlock, FieldWeights],
    ) -> Tensor:
        """Layer 1 with the user fields' LN + Q/K/V once per user ([F_u, U, d], gathered)."""
        block, w = layer
        f_u = user_tokens.shape[0]
        bias = block.field_bias[:, None, :]  # [F, 1, d]
        h_user = block.norm_attention(user_tokens) + bias[:f_u]  # [F_u, U, d]
        h_cand = block.norm_attention(cand_tokens) + bias[f_u:]  # [F_c, N, d]
        user_qkv = self._qkv(h_user, w, slice(None, f_u))  # [F_u, U, d] each
        cand_qkv = self._qkv(h_cand, w, slice(f_u, None))  # [F_c, N, d] each
        q, k, v = (
            torch.cat([u.index_select(1, idx), c], dim=0)
            for u, c in zip(user_qkv, cand_qkv, strict=True)
        )  # [F, N, d] each
        z = torch.cat([user_tokens.index_select(1, idx), cand_tokens], dim=0)  # [F, N, d]
        return self._ffn(z, self._attend(q, k, v, block.attention.pair), block, w)

    def _block(self, z: Tensor, block: FATBlock, w: FieldWeights) -> Tensor:
        h = block.norm_attention(z) + block.field_bias[:, None, :]  # [F, N, d]
        q, k, v = self._qkv(h, w, slice(None))
        return self._ffn(z, self._attend(q, k, v, block.attention.pair), block, w)

    def logits(self, x: SlateInputs) -> Tensor:
        m, idx = self.model, x.cand_user_index
        mask = (x.hist_items != PAD).to(m.history_projection.weight.dtype)  # [U, L]
        hist = m._project_history(x.hist_items, x.hist_cats)  # [U, L, d]
        # [U, d] each, in field order; no user token with `user_token=False` (FAT's docstring)
        users = [m.user_embedding(x.user)] if m.config.user_token else []
        users += [emb(x.context[:, c]) for c, emb in enumerate(m.context_embeddings)]
        pooled = self._pool(m._project_history(x.cand_items, x.cand_cats), hist, mask, idx)
        cands = [pooled, m.item_embedding(x.cand_items), m.category_embedding(x.cand_cats)]
        first, *rest = self._layers()
        user_tokens = torch.stack(users) if users else hist[:, :0].transpose(0, 1)  # [F_u, U, d]
        z = self._first_block(user_tokens, torch.stack(cands), idx, first)  # [F, N, d]
        for block, weights in rest:
            z = self._block(z, block, weights)
        out = m.output_projection(z.sum(dim=0))  # [N, d]
        return m._task_logits(out, m.tower(out))


__all__ = ["FATSplit"]
