"""DIN's serving layouts: the activation unit's first layer split by linearity, so the
[N, L, 4D] concatenation [h, t, h−t, h⊙t] is never written.

    W1 [h; t; h−t; h⊙t] + b1 = (W_h + W_d) h + (W_t − W_d) t + W_p (h⊙t) + b1
                             = [diag(t) W_pᵀ + (W_h + W_d)ᵀ ; ((W_t − W_d) t + b1)ᵀ]ᵀ [h; 1]

* `DINSplit` (layout `batched`, and inside a chunk Loop `cpu-loop`): one batched MatMul
  [N, 80, D+1] @ [N, D+1, L] per call (K = 37 instead of 144), the per-candidate right matrix
  built directly in that layout (no transposed operand), Dice channels first as
  BatchNormalization → Sigmoid → BatchNormalization(scale 1−α, bias α) → Mul (four passes
  instead of seven).
* `DINFused` (layout `cpu-fused`): the activation unit and the weighted history sum are one
  node, `slatectr::DinAttentionPool` (runtime/ortops/src/din_attention_impl.h): per user
  UT = H (W_h + W_d)ᵀ over its real rows only, per candidate (W_t − W_d) t + b1 and
  diag(t) W_pᵀ, then register-blocked GEMMs, Dice, 80 → 40 → 1, and Σ_l s_l m_l h_l.

Everything around the activation unit (embeddings, history sum, output MLP) is the model's
own code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporters.layouts.placeholder import placeholder
from exporters.onnx_export import SlateInputs, SlateScoringGraph
from models.nets.baselines import DIN, _history
from models.nets.layers import Dice

OP = "DinAttentionPool"


class _BatchNorm(torch.autograd.Function):
    """ONNX BatchNormalization (inference) on axis 1 of any rank: the exporter's own
    batch_norm refuses inputs whose channel count it cannot infer."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float
    ) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        normed = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
        return normed * scale.view(shape) + bias.view(shape)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, bias: Any, mean: Any, var: Any, eps: float) -> Any:
        out = g.op("BatchNormalization", x, scale, bias, mean, var, epsilon_f=eps)
        out.setType(x.type())
        return out


def dice_channels_first(x: Tensor, dice: Dice) -> Tensor:
    """Dice in eval on x [N, C, ...]: x·(α + (1−α)·σ((x − μ)/√(var + ε)))."""
    one = torch.ones_like(dice.running_var)
    zero = torch.zeros_like(one)
    z = _BatchNorm.apply(x, one, zero, dice.running_mean, dice.running_var, dice.eps)
    gate = _BatchNorm.apply(torch.sigmoid(z), 1 - dice.alpha, dice.alpha, zero, one, 0.0)
    return x * gate


def _units(model: DIN) -> list[nn.Module]:
    """The activation unit's layers: Linear, then (Dice, Linear) per hidden layer."""
    return list(model.attention.mlp.net)


def _readout(model: DIN, x: SlateInputs, t: Tensor, hist: Tensor, interest: Tensor) -> Tensor:
    """The model's output MLP on [t, Σh, t⊙Σh, interest, context] -> logits [N, T]."""
    idx = x.cand_user_index
    total = hist.sum(dim=1).index_select(0, idx)  # [N, D]
    ctx = model.context(x.context).index_select(0, idx)  # [N, C·d]
    z = model.norm(torch.cat([t, total, t * total, interest, ctx], dim=-1))
    return model._task_logits(z, model.mlp(z))


class DINSplit(SlateScoringGraph):
    """DIN with the split first layer and channels-first Dice (standard ONNX ops)."""

    model: DIN

    def _right(self, t: Tensor) -> Tensor:
        """Per-candidate right matrices [N, 80, D+1] (module docstring), built directly."""
        l1 = _units(self.model)[0]
        assert isinstance(l1, nn.Linear)
        d = t.shape[1]
        w = l1.weight  # [80, 4D]
        w_h, w_t, w_d, w_p = w[:, :d], w[:, d : 2 * d], w[:, 2 * d : 3 * d], w[:, 3 * d :]
        mat = t[:, None, :] * w_p[None] + (w_h + w_d)[None]  # [N, 80, D]
        row = F.linear(t, w_t - w_d, l1.bias)  # [N, 80]
        return torch.cat([mat, row[:, :, None]], dim=2)  # [N, 80, D+1]

    def logits(self, x: SlateInputs) -> Tensor:
        m, idx = self.model, x.cand_user_index
        hist, mask = _history(m.embed, x.hist_items, x.hist_cats)  # [U, L, D], [U, L]
        t = m.embed(x.cand_items, x.cand_cats)  # [N, D]
        h_aug = torch.cat([hist, torch.ones_like(hist[:, :, :1])], dim=-1)  # [U, L, D+1]
        left = self.for_candidates(h_aug.transpose(1, 2), idx)  # [N|1, D+1, L]
        z = self._right(t) @ left  # [N, 80, L]: the first layer, channels first
        for layer in _units(m)[1:]:  # Dice, Linear, ... down to one unit
            if isinstance(layer, Dice):
                z = dice_channels_first(z, layer)
            else:
                assert isinstance(layer, nn.Linear)
                z = torch.matmul(layer.weight, z) + layer.bias[:, None]  # [N, C', L]
        weights = z[:, 0] * self.for_candidates(mask, idx)  # [N, L]
        interest = (weights[:, None, :] @ self.for_candidates(hist, idx))[:, 0]  # [N, D]
        return _readout(m, x, t, hist, interest)


def dice_params(dice: Dice) -> Tensor:
    """[3, C]: μ, 1/√(var + ε), α (constants in the graph)."""
    return torch.stack([dice.running_mean, torch.rsqrt(dice.running_var + dice.eps), dice.alpha])


def _dice(x: Tensor, params: Tensor) -> Tensor:
    mean, inv, alpha = params
    p = torch.sigmoid((x - mean) * inv)
    return alpha * (1 - p) * x + p * x


def reference_pool(hist: Tensor, mask: Tensor, t: Tensor, idx: Tensor, *w: Tensor) -> Tensor:
    """The placeholder's meaning: the activation unit on per-candidate copies of the history
    (what `ActivationUnit` computes, from the weights the node receives) -> [N, D]."""
    w1, b1, dice1, w2, b2, dice2, w3, b3 = w
    h, m = hist.index_select(0, idx), mask.index_select(0, idx)  # [N, L, D], [N, L]
    tt = t.unsqueeze(1).expand_as(h)  # [N, L, D]
    x = torch.cat([h, tt, h - tt, h * tt], dim=-1)  # [N, L, 4D]
    e2 = _dice(F.linear(_dice(F.linear(x, w1, b1), dice1), w2, b2), dice2)  # [N, L, 40]
    s = (e2 @ w3 + b3) * m  # [N, L]
    return (s.unsqueeze(-1) * h).sum(dim=1)


_din_pool = placeholder(OP, reference_pool, like=2)  # [N, D] float, like t


class DINFused(SlateScoringGraph):
    """DIN with its activation unit and weighted history sum as one custom-op node (the
    kernel covers the paper's unit: two hidden layers with Dice)."""

    model: DIN

    def __init__(self, model: DIN) -> None:
        if not self.supports(model):
            raise ValueError("the fused DIN kernel needs an activation unit of two hidden layers")
        super().__init__(model)

    @staticmethod
    def supports(model: DIN) -> bool:
        return len(_units(model)) == 5  # Linear, Dice, Linear, Dice, Linear

    def logits(self, x: SlateInputs) -> Tensor:
        m = self.model
        l1, d1, l2, d2, l3 = _units(m)
        assert isinstance(l1, nn.Linear) and isinstance(l2, nn.Linear)
        assert isinstance(l3, nn.Linear) and isinstance(d1, Dice) and isinstance(d2, Dice)
        hist, mask = _history(m.embed, x.hist_items, x.hist_cats)  # [U, L, D], [U, L]
        t = m.embed(x.cand_items, x.cand_cats)  # [N, D]
        weights = (l1.weight, l1.bias, dice_params(d1), l2.weight, l2.bias, dice_params(d2))
        interest = _din_pool(hist, mask, t, x.cand_user_index, *weights, l3.weight[0], l3.bias)
        return _readout(m, x, t, hist, interest)


__all__ = ["DINFused", "DINSplit"]
