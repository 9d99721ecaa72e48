"""SARN: Similitude Attentive Relation Network (Deng et al., IJCNN 2020), MODELS.md §1 and §4.1.

Faithful to the paper and to the official TF1 code (`JianqiaoAirport/SARN_CTR`,
`script/model.py`); where the two differ the code wins, and every [proposal] decision is
recorded in the `SARN` docstring.

Shapes: U users (or B pairwise rows), N candidates, L history slots, E = `embedding_dim`,
D = 2E (item ⊕ category), H = `attention_hidden`.

Computation order (same values as the literal formulas up to float rounding; tests/test_sarn.py
checks them against a literal implementation): the relation cube G_ij = R_ij·x_i + x_j
[.., L, L, D] is never built for training. Every linear map of it comes from per-item
projections, W G_ij = R_ij·(W x_i) + (W x_j) (`sarn_ops.pairwise`): the gate's and MLP_reg's
first layers are formed from [.., L, H] tensors and R, and the auxiliary loss' mean_i G_ij =
(Rᵀ X)_j / L + x_j needs no cube at all. The cells that must be visited one by one (ReLU
layers, the attentive max-pooling) run in `sarn_ops` kernels with cheap backward passes.
The serving graphs lay the same computation out for ONNX Runtime (exporters/layouts/sarn.py):
the model's own forward stays one computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.data.batch import BehaviorBatch
from models.nets.base import BehaviorModel, TrainOutput, UserState
from models.nets.layers import AffineNorm, Dice, last_slots, masked_mean
from models.nets.sarn_ops import pairwise_channels_first, pairwise_max_pool, pairwise_relu_dot
from runtime.features import PAD


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
    recent_items: int = 0  # R: the last R history items (and t⊙each) join z; see SARN
    tasks: tuple[str, ...] = ("ctr",)  # ("ctr", "cvr"): a second OutputHead on z (multitask)


class SARNState(NamedTuple):
    """The user side, computed once per user and shared by all of that user's candidates.

    Only [U, L, L] and [U, L, ·] tensors: `score_candidates` forms each relation cell from R
    and X (`sarn_ops`), so nothing of size L·L·D is stored per user (the serving layouts,
    exporters/layouts/sarn.py, decide how the cells are visited in ONNX Runtime).
    """

    x: Tensor  # [U, L, D] history embeddings, padded rows exactly 0
    mask: Tensor  # [U, L] float, 1 = real history slot
    relation: Tensor  # [U, L(i), L(j)] R_ij = φ(x_i)·ψ(x_j); 0 where i or j is padded
    gate_proj: Tensor  # [U, L, H] W1_G·x_i, the gate's first layer on history items alone
    mean: Tensor  # [U, D] mean over real slots (0 for an empty history)
    max: Tensor  # [U, D] max over slots, floored at 0 (padding rows are 0 in the code)
    context: Tensor  # [U, C·E] context-field embeddings (width 0 without context fields)
    recent: Tensor  # [U, R, D] the last R real history items, oldest first (R = 0: width 0)


def _normalized_relu(proj: nn.Linear, x: Tensor, eps: float) -> Tensor:
    """ReLU(Wx) / (‖ReLU(Wx)‖ + eps) as in the code. An all-zero projection (every padded
    slot) must give exactly 0 even where eps vanishes: onnxscript's optimizer (dynamo export)
    folds `+ 1e-10` away and fp16 flushes it to 0, and 0/0 would be NaN. So zero norms add 1."""
    h = F.relu(proj(x))  # [U, L, W]
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)  # [U, L, 1]
    return h / (norm + eps + (norm == 0).to(h.dtype))


class RelationalModule(nn.Module):
    """R(x_i, x_j) of the relation g = R·x_i + x_j: the cosine of two ReLU projections
    (eq. 6-9).

    A padded slot has x = 0, hence ReLU(W·0) = 0 and R = 0 in its row and column, so
    G_ij = 0 for a padded j. The cube G itself is never built (module docstring).
    """

    def __init__(self, dim: int, width: int, eps: float) -> None:
        super().__init__()
        self.phi = nn.Linear(dim, width, bias=False)
        self.psi = nn.Linear(dim, width, bias=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        phi = _normalized_relu(self.phi, x, self.eps)  # [U, L, W]
        psi = _normalized_relu(self.psi, x, self.eps)  # [U, L, W]
        return phi @ psi.transpose(1, 2)  # [U, L(i), L(j)] in [0, 1]


class TargetGate(nn.Module):
    """a_ij = σ(w2ᵀ ReLU(W1 [t; G_ij] + b1) + b2): one sigmoid gate per pair, no softmax.

    W1 is one 2D→H layer as in the code, applied in parts: W1 [t; G_ij] + b1 =
    R_ij·(W1_G x_i) + (W1_G x_j + b1) + W1_t t, where W1_G x (`project`) is per user.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.hidden = nn.Linear(2 * dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def project(self, x: Tensor) -> Tensor:
        return F.linear(x, self.hidden.weight[:, self.dim :])  # [U, L, H]

    def _target_part(self, target: Tensor) -> Tensor:
        return F.linear(target, self.hidden.weight[:, : self.dim])  # [N, H]

    def forward(self, relation: Tensor, proj: Tensor, target: Tensor) -> Tensor:
        """[N, L, L], [N, L, H], [N, D] -> gates [N, L, L]."""
        shift = proj + (self._target_part(target) + self.hidden.bias)[:, None, :]  # [N, L, H]
        logit = pairwise_relu_dot(relation, proj, shift, self.out.weight[0])  # [N, L, L]
        return torch.sigmoid(logit + self.out.bias)

    def user_part(self, relation: Tensor, proj: Tensor) -> Tensor:
        """[U, L, L], [U, L, H] -> W1_G G_ij + b1 per user, channels first [U, H, L, L]."""
        return pairwise_channels_first(relation, proj, proj + self.hidden.bias)

    def from_user_part(self, user_part: Tensor, target: Tensor) -> Tensor:
        """[N, H, L, L] gathered `user_part`, [N, D] -> gates [N, L, L]."""
        n, h, length, _ = user_part.shape
        hidden = F.relu(user_part + self._target_part(target)[:, :, None, None])  # [N, H, L, L]
        logit = self.out.weight.view(1, 1, h) @ hidden.flatten(2)  # [N, 1, L·L]
        return torch.sigmoid(logit + self.out.bias).view(n, length, length)


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

    def forward(self, relation: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        """[B, L, L], [B, L, D], [B, L] -> scalar."""
        length = x.shape[1]
        pos = torch.arange(length, device=x.device, dtype=x.dtype)
        offset = pos[None, :] - pos[:, None]  # [L(i), L(j)] = j − i
        target = offset.sign() * (offset.abs() / max(length, 1)).sqrt()
        first, out = self.mlp[0], self.mlp[2]
        assert isinstance(first, nn.Linear) and isinstance(out, nn.Linear)
        proj = F.linear(x, first.weight)  # [B, L, K]
        # [B, L, L] = MLP_reg(G_ij)
        pred = pairwise_relu_dot(relation, proj, proj + first.bias, out.weight[0]) + out.bias
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

    def forward(self, relation: Tensor, x: Tensor, negatives: Tensor, mask: Tensor) -> Tensor:
        """[B, L, L], [B, L, D], [B, L, D], [B, L] -> scalar."""
        length = x.shape[1]
        seq_len = mask.sum(dim=1).clamp_min(1.0)  # [B]; empty rows are masked out below
        # mean_i G_ij over all L sources as in the code (a padded source i adds x_j, R = 0):
        # (1/L)·Σ_i R_ij x_i + x_j = (Rᵀ X)_j / L + x_j.
        into = relation.transpose(1, 2) @ x / length + x  # [B, L, D]
        h = into * (length / seq_len)[:, None, None]  # [B, L, D]
        h = h[:, torch.randperm(length, device=x.device)]  # one shuffle per batch
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
    * Multi-task (`tasks=("ctr", "cvr")`, not in the paper): a second OutputHead of the same
      shape reads the same z; the positional and auxiliary losses stay as they are (they
      shape the shared relation module, which both towers read).
    * Training losses kept as in the code, so they (not the scores) depend on the padded
      length L: L_reg averages over all B·L·L cells, and H_j averages over all L sources.
    * Zero ReLU projections normalise to exactly 0 whatever eps becomes (`_normalized_relu`).
    * L ≥ 1 is required (an empty history is a row of PAD, not a zero-width tensor).
    * Max-pooling gradient: all of it goes to one winning cell per channel, where TF's
      reduce_max (and amax) split it between tied cells; the parameter gradients are the
      same up to rounding (`sarn_ops._PairwiseMaxPool` says why), the forward is unchanged.

    * Recent items (`recent_items = R`, not in the paper; default 0): the last R real
      history items, oldest first, and their products with the target join z ([R·D] each;
      missing slots of a short history are 0). Why: with R = 0 the score is invariant to
      permuting the real history (mean/max pool over slots, and permuting slots permutes the
      cells (i, j) of R and G, whose max over all cells is unchanged); order enters only the
      training signal through the positional loss. On MovieLens-100k, where the last items
      carry the session (docs/models.md), SARN with lr decay had levelled off at 0.9355 ±
      0.0010 test AUC (3 seeds) without them; with R = 5 (the value FAT's ablation chose for
      `recent_tokens`, not tuned on SARN) the same runs reach 0.9452 ± 0.0009 (R = 10: the
      same test AUC, validation 0.0002 lower, so 5 is the documented value; adding
      `embedding_l2=1e-4`, validation 0.0005 higher and test 0.9460 ± 0.0016; with it and
      DIEN's budget of ≤ 10 epochs, 0.9475 ± 0.0004, the MovieLens row). Serving cost:
      two [N, R·D] blocks in the output MLP's first layer, nothing per pair; the cpu-fused
      graph costs 1.5–2 µs more per candidate (`ctr bench export --set recent_items=5`).
      Default 0: the paper's model, which every simulated-world row in docs/models.md used.
    """

    config_class = SARNConfig

    @classmethod
    def samples_negatives(cls, config: SARNConfig) -> bool:
        return True  # the auxiliary (interest) loss reads batch.neg_hist_*

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
        # [t; u; t⊙mean; max; mean; c; recent; t⊙recent]
        z_dim = 5 * dim + emb * len(self.context_fields) + 2 * cfg.recent_items * dim
        self.head = OutputHead(z_dim, cfg.hidden_dims, cfg.dice_momentum)
        self._add_towers(cfg.tasks, lambda: OutputHead(z_dim, cfg.hidden_dims, cfg.dice_momentum))
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
        return SARNState(
            x=x,
            mask=mask,
            relation=self.relational(x),  # [U, L, L]
            gate_proj=self.gate.project(x),  # [U, L, H]
            mean=masked_mean(x, mask),  # [U, D]
            max=x.amax(dim=1).clamp_min(0.0),  # [U, D]
            context=self._embed_context(context),  # [U, C·E]
            recent=last_slots(x, mask, self.config.recent_items),  # [U, R, D]
        )

    def score_candidates(self, state: UserState, items: Tensor, cats: Tensor) -> Tensor:
        s = SARNState(*state)
        t = self._embed(items, cats)  # [N, D]
        gate = self.gate(s.relation, s.gate_proj, t)  # [N, L, L]
        weight = gate * s.mask[:, :, None]  # [N, L, L] a_ij·m_i, padded sources 0
        u = pairwise_max_pool(weight, s.relation, s.x).clamp_min(0.0)  # [N, D]
        return self._output(t, u, s.mean, s.max, s.context, s.recent)

    def output_for(self, state: SARNState, idx: Tensor, t: Tensor, u: Tensor) -> Tensor:
        """The output module for N candidates [N, D] of the U users in `state`, by idx [N]."""
        per_user = (state.mean, state.max, state.context, state.recent)
        return self._output(t, u, *(v.index_select(0, idx) for v in per_user))

    def _output(
        self, t: Tensor, u: Tensor, mean: Tensor, mx: Tensor, ctx: Tensor, recent: Tensor
    ) -> Tensor:
        """t, u, mean, mx [N, D], ctx [N, C·E], recent [N, R, D] -> logits [N, T]."""
        parts = [t, u, t * mean, mx, mean, ctx]
        if self.config.recent_items:  # static structure: R = 0 exports the paper's graph
            parts += [recent.flatten(1), (t.unsqueeze(1) * recent).flatten(1)]
        z = torch.cat(parts, dim=-1)  # [N, z_dim]
        return self._task_logits(z, self.head(z))  # [N, T]

    def forward_train(self, batch: BehaviorBatch) -> TrainOutput:
        state = self.encode_user(batch.user, batch.hist_items, batch.hist_cats, batch.context)
        logits = self.score_candidates(state, batch.items, batch.cats)
        losses: dict[str, Tensor] = {}
        if self.positional is not None:
            reg = self.positional(state.relation, state.x, state.mask)
            losses["positional"] = self.config.positional_weight * reg
        negatives = self._negatives(batch, state.mask)
        if self.auxiliary is not None and negatives is not None:
            aux = self.auxiliary(state.relation, state.x, negatives, state.mask)
            losses["auxiliary"] = self.config.auxiliary_weight * aux
        return TrainOutput(logits, losses)

    def _negatives(self, batch: BehaviorBatch, mask: Tensor) -> Tensor | None:
        """[B, L, D] masked embeddings of the sampled negatives, or None when absent."""
        if batch.neg_hist_items is None or batch.neg_hist_cats is None:
            return None
        return self._embed(batch.neg_hist_items, batch.neg_hist_cats) * mask.unsqueeze(-1)


__all__ = ["SARN", "SARNConfig", "SARNState"]
