"""SARN: Similitude Attentive Relation Network (Deng et al., IJCNN 2020), MODELS.md §1 and §4.1.

Faithful to the paper and to the official TF1 code (`JianqiaoAirport/SARN_CTR`,
`script/model.py`); where the two differ the code wins, and every [proposal] decision is
recorded in the `SARN` docstring.

Shapes: U users (or B pairwise rows), N candidates, L history slots, E = `embedding_dim`,
D = 2E (item ⊕ category), H = `attention_hidden`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import BehaviorModel, TrainOutput, UserState
from models.batch import BehaviorBatch
from models.features import PAD
from models.layers import AffineNorm, Dice, masked_mean


@dataclass
class SARNConfig:
    embedding_dim: int = 18  # per id; item ⊕ category gives D = 36 (paper + code)
    relation_width: int = 36  # W_φ, W_ψ output width (code: matrix_width)
    attention_hidden: int = 36  # hidden units of the per-pair gate MLP
    hidden_dims: tuple[int, ...] = (50, 10)  # output MLP before the 2-way layer
    regression_hidden: int = 10  # MLP_reg hidden units
    norm_eps: float = 1e-10  # added to ‖ReLU(Wx)‖ (code), not a clamp
    dice_momentum: float = 0.01  # running statistics used in eval (layers.Dice)
    positional_loss: bool = True  # relative-position regression on every G_ij
    auxiliary_loss: bool = True  # DIEN-style click/no-click auxiliary loss
    positional_weight: float = 2.0  # see the SARN docstring: matches the code's ratio
    auxiliary_weight: float = 2.0


class SARNState(NamedTuple):
    """The user side, computed once per user and shared by all of that user's candidates."""

    x: Tensor  # [U, L, D] history embeddings, padded rows exactly 0
    mask: Tensor  # [U, L] float, 1 = real history slot
    cube: Tensor  # [U, L, L, D] relations G_ij = R_ij·x_i + x_j
    gate_pre: Tensor  # [U, L, L, H] W1_G·G_ij + b1, the user part of the gate's first layer
    mean: Tensor  # [U, D] mean over real slots (0 for an empty history)
    max: Tensor  # [U, D] max over slots, floored at 0 (padding rows are 0 in the code)
    context: Tensor  # [U, C·E] context-field embeddings (width 0 without context fields)


def _normalized_relu(proj: nn.Linear, x: Tensor, eps: float) -> Tensor:
    """ReLU(Wx) / (‖ReLU(Wx)‖ + eps) as in the code. An all-zero projection (every padded
    slot) must give exactly 0 even where eps vanishes: onnxscript's optimizer (dynamo export)
    folds `+ 1e-10` away and fp16 flushes it to 0, and 0/0 would be NaN. So zero norms add 1."""
    h = F.relu(proj(x))  # [U, L, W]
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)  # [U, L, 1]
    return h / (norm + eps + (norm == 0).to(h.dtype))


class RelationalModule(nn.Module):
    """g(x_i, x_j) = R(x_i, x_j)·x_i + x_j with R the cosine of two ReLU projections (eq. 6-9).

    A padded slot has x = 0, hence ReLU(W·0) = 0, R = 0 and G_ij = 0 for a padded j.
    """

    def __init__(self, dim: int, width: int, eps: float) -> None:
        super().__init__()
        self.phi = nn.Linear(dim, width, bias=False)
        self.psi = nn.Linear(dim, width, bias=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        phi = _normalized_relu(self.phi, x, self.eps)  # [U, L, W]
        psi = _normalized_relu(self.psi, x, self.eps)  # [U, L, W]
        relation = phi @ psi.transpose(1, 2)  # [U, L(i), L(j)] in [0, 1]
        # Broadcasting instead of tiling: [U,L,L,1]·[U,L,1,D] + [U,1,L,D] -> [U, L, L, D].
        return relation.unsqueeze(-1) * x.unsqueeze(2) + x.unsqueeze(1)


class TargetGate(nn.Module):
    """a_ij = σ(w2ᵀ ReLU(W1 [t; G_ij] + b1) + b2): one sigmoid gate per pair, no softmax.

    W1 is one 2D→H layer as in the code; it is applied in two parts so that W1_G·G + b1 is
    computed once per user (`user_part`) and a candidate only adds W1_t·t.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.hidden = nn.Linear(2 * dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def user_part(self, cube: Tensor) -> Tensor:
        return F.linear(cube, self.hidden.weight[:, self.dim :], self.hidden.bias)  # [U,L,L,H]

    def forward(self, user_part: Tensor, target: Tensor) -> Tensor:
        target_part = F.linear(target, self.hidden.weight[:, : self.dim])  # [N, H]
        h = F.relu(user_part + target_part[:, None, None, :])  # [N, L, L, H]
        return torch.sigmoid(self.out(h))  # [N, L, L, 1]


class OutputHead(nn.Module):
    """AffineNorm → Linear(bias) → Dice → [Linear(no bias) → Dice]… → Linear(no bias) → 2."""

    def __init__(self, in_dim: int, hidden_dims: tuple[int, ...], dice_momentum: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [AffineNorm(in_dim)]
        width = in_dim
        for k, h in enumerate(hidden_dims):
            layers += [nn.Linear(width, h, bias=k == 0), Dice(h, momentum=dice_momentum)]
            width = h
        layers.append(nn.Linear(width, 2, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        two = self.net(z)  # [N, 2]; softmax[:, 0] is the click probability
        return two[:, 0] - two[:, 1]  # σ(l0 − l1) = softmax[:, 0]


class PositionalRegression(nn.Module):
    """L_reg = mean over all (b, i, j) of m_i·(MLP_reg(G_ij) − sign(j−i)·√(|j−i|/L))²."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, cube: Tensor, mask: Tensor) -> Tensor:
        length = cube.shape[1]
        pos = torch.arange(length, device=cube.device, dtype=cube.dtype)
        offset = pos[None, :] - pos[:, None]  # [L(i), L(j)] = j − i
        target = offset.sign() * (offset.abs() / max(length, 1)).sqrt()
        pred = self.mlp(cube).squeeze(-1)  # [B, L, L]
        return ((pred - target).square() * mask[:, :, None]).mean()


class InterestAuxiliary(nn.Module):
    """DIEN-style auxiliary loss on the relations flowing into each slot (code:
    `auxiliary_loss_neg`): H_j = (L/seq_len)·mean_i G_ij, shuffled along j with one
    permutation per batch, classifies the clicked x_t against a sampled negative."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            AffineNorm(2 * dim),
            nn.Linear(2 * dim, 2 * dim),
            nn.Sigmoid(),
            nn.Linear(2 * dim, dim),
            nn.Sigmoid(),
            nn.Linear(dim, 2),
        )

    def forward(self, cube: Tensor, x: Tensor, negatives: Tensor, mask: Tensor) -> Tensor:
        length = cube.shape[1]
        seq_len = mask.sum(dim=1).clamp_min(1.0)  # [B]; empty rows are masked out below
        # Mean over all L sources as in the code: a padded source i adds x_j (R = 0).
        h = cube.mean(dim=1) * (length / seq_len)[:, None, None]  # [B, L, D]
        h = h[:, torch.randperm(length, device=cube.device)]  # one shuffle per batch
        click = F.log_softmax(self.net(torch.cat([h, x], dim=-1)), dim=-1)[..., 0]  # [B, L]
        no_click = F.log_softmax(self.net(torch.cat([h, negatives], dim=-1)), dim=-1)[..., 1]
        return (-(click + no_click) * mask).mean()


def _glorot_init(module: nn.Module) -> None:
    """TF1 defaults: Glorot-uniform kernels and embedding tables, zero biases."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.xavier_uniform_(module.weight)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class SARN(BehaviorModel):
    """SARN over item ⊕ category embeddings, with optional context fields.

    Context fields: one E-wide table per `sizes` key starting with `context_`, in the order
    those keys appear in `sizes`; `context[:, c]` is field c in that order. Their embeddings
    are appended to the output features z (the paper feeds c to the output module; the code
    has no context). `sizes["user"]` is accepted but unused: the code's user table takes no
    part in the forward pass, and an unused table would receive no gradient.

    Decisions ([proposal], MODELS.md §1.6):
    * CTR-loss scale: the trainer's mean BCE-with-logits is the full 2-class NLL, while the
      code optimises ½·NLL + L_reg + L_aux. The auxiliary weights default to 2.0 so the
      total is exactly 2× the code's, same ratio; with Adam the step is the same up to eps.
      Returned aux losses are already weighted; the trainer just adds them.
    * Dice: batch statistics while training (faithful), running statistics in eval, so a
      served score never depends on its batch (layers.Dice).
    * The TF1 BatchNorms (output head, AuxNet) are `AffineNorm`: never-updated moving stats.
    * Init: Glorot-uniform for every kernel and embedding table, zero biases (TF defaults);
      Dice α = 0; AffineNorm γ = 1, β = 0.
    * Dims: E = 18 per id, D = 36, relation width 36, gate hidden 36, head (50, 10, 2).
    * Max-pooling floor: in the code, masked cells and padded rows are 0 and take part in
      the max, so u and max(X) are floored at 0 for every row that has padding; a row with
      no padding (the longest of its batch) was not. We floor every row at 0, which matches
      the code for padded rows and makes a score independent of the batch's padded length.
    * Auxiliary log-probabilities use log_softmax instead of log(softmax + 1e-8).
    * Training losses kept as in the code, so they (not the scores) depend on the padded
      length L: L_reg averages over all B·L·L cells, and H_j averages over all L sources.
    * Zero ReLU projections normalise to exactly 0 whatever eps becomes (`_normalized_relu`).
    * L ≥ 1 is required (an empty history is a row of PAD, not a zero-width tensor).

    The score is invariant to permuting the real history: mean/max pool over slots, and
    permuting slots permutes the cells (i, j) of R and G, whose max over all cells is
    unchanged. Order enters only the training signal through the positional loss.
    """

    config_class = SARNConfig
    needs_negatives: ClassVar[bool] = True  # the auxiliary loss reads batch.neg_hist_*

    def __init__(self, sizes: dict[str, int], config: SARNConfig | None = None) -> None:
        super().__init__()
        cfg = config or SARNConfig()
        self.config = cfg
        emb, dim = cfg.embedding_dim, 2 * cfg.embedding_dim
        self.item_embedding = nn.Embedding(sizes["item"], emb)
        self.category_embedding = nn.Embedding(sizes["category"], emb)
        self.context_fields = [k for k in sizes if k.startswith("context_")]
        self.context_embeddings = nn.ModuleList(
            nn.Embedding(sizes[k], emb) for k in self.context_fields
        )
        self.relational = RelationalModule(dim, cfg.relation_width, cfg.norm_eps)
        self.gate = TargetGate(dim, cfg.attention_hidden)
        z_dim = 5 * dim + emb * len(self.context_fields)  # [t; u; t⊙mean; max; mean; c]
        self.head = OutputHead(z_dim, cfg.hidden_dims, cfg.dice_momentum)
        self.positional = (
            PositionalRegression(dim, cfg.regression_hidden) if cfg.positional_loss else None
        )
        self.auxiliary = InterestAuxiliary(dim) if cfg.auxiliary_loss else None
        self.apply(_glorot_init)

    def _embed(self, items: Tensor, cats: Tensor) -> Tensor:
        """[...], [...] -> [..., D]."""
        return torch.cat([self.item_embedding(items), self.category_embedding(cats)], dim=-1)

    def _embed_context(self, context: Tensor) -> Tensor:
        """[U, C] -> [U, C·E]; width 0 when the model has no context fields."""
        if not self.context_embeddings:  # static structure, not a tensor value
            return context.new_zeros(context.shape[0], 0, dtype=torch.float32)
        parts = [table(context[:, c]) for c, table in enumerate(self.context_embeddings)]
        return torch.cat(parts, dim=-1)

    def encode_user(
        self, user: Tensor, hist_items: Tensor, hist_cats: Tensor, context: Tensor
    ) -> SARNState:
        mask = (hist_items != PAD).to(torch.float32)  # [U, L]
        x = self._embed(hist_items, hist_cats) * mask.unsqueeze(-1)  # [U, L, D]
        cube = self.relational(x)  # [U, L, L, D]
        return SARNState(
            x=x,
            mask=mask,
            cube=cube,
            gate_pre=self.gate.user_part(cube),  # [U, L, L, H]
            mean=masked_mean(x, mask),  # [U, D]
            max=x.amax(dim=1).clamp_min(0.0),  # [U, D]
            context=self._embed_context(context),  # [U, C·E]
        )

    def score_candidates(self, state: UserState, items: Tensor, cats: Tensor) -> Tensor:
        s = SARNState(*state)
        t = self._embed(items, cats)  # [N, D]
        gate = self.gate(s.gate_pre, t)  # [N, L, L, 1]
        cells = gate * s.cube * s.mask[:, :, None, None]  # [N, L, L, D], padded sources 0
        u = cells.amax(dim=(1, 2)).clamp_min(0.0)  # [N, D] attentive max-pooling
        z = torch.cat([t, u, t * s.mean, s.max, s.mean, s.context], dim=-1)  # [N, z_dim]
        return self.head(z)

    def forward_train(self, batch: BehaviorBatch) -> TrainOutput:
        state = self.encode_user(batch.user, batch.hist_items, batch.hist_cats, batch.context)
        logits = self.score_candidates(state, batch.items, batch.cats)
        losses: dict[str, Tensor] = {}
        if self.positional is not None:
            reg = self.positional(state.cube, state.mask)
            losses["positional"] = self.config.positional_weight * reg
        negatives = self._negatives(batch, state.mask)
        if self.auxiliary is not None and negatives is not None:
            aux = self.auxiliary(state.cube, state.x, negatives, state.mask)
            losses["auxiliary"] = self.config.auxiliary_weight * aux
        return TrainOutput(logits, losses)

    def _negatives(self, batch: BehaviorBatch, mask: Tensor) -> Tensor | None:
        """[B, L, D] masked embeddings of the sampled negatives, or None when absent."""
        if batch.neg_hist_items is None or batch.neg_hist_cats is None:
            return None
        return self._embed(batch.neg_hist_items, batch.neg_hist_cats) * mask.unsqueeze(-1)


__all__ = ["SARN", "SARNConfig", "SARNState"]
