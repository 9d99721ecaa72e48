"""FAT: Field-Aware Transformer, v2/KDD version (MODELS.md §2, §4.2), for behaviour samples.

Every field is exactly one token; there is no positional encoding, the field id is the token's
identity. Tokens, in this fixed order (`FAT.field_names`):

    user | context_<name> ... | recent_1..R (optional) | history | item | category

* `user`, `context_*`, `item`, `category`: one embedding each (width d). The target item and
  category share their tables with the history (DIN convention).
* `history`: the history pooled to one token. `FATConfig.history_pooling` selects
  "mean" (masked mean of the projected item⊕category embeddings, computed once per user on the
  user side) or "target_attention" (DIN-style softmax attention of the projected target over
  the projected history; candidate side).
* `recent_i` (`FATConfig.recent_tokens = R > 0`): the last R real history items, each its own
  token and field; slots a short history lacks are zero vectors (their field bias still tells
  the model "missing"). The pooled token still covers the whole history.

Blocks (impl A, faithful; `residual="single"`): Z ← FFN(LN(Attn(LN(Z) + b))) + Z, with the
field-aware bias b_f ∈ R^d per layer (zero init), field-specific Q/K/V (no output projection)
and a field-specific SiLU FFN without biases, all composed per layer by the basis
hypernetwork (`models/nets/hypernet.py`). `residual="double"` is the pre-LN two-residual
fallback MODELS.md allows; it was not needed: the faithful form trained stably at the default
depth (loss falling every epoch, no NaN, in the pooling comparison below).
Readout: sum over fields → Linear(d, d) → ReLU → Linear(d, tower_hidden) → ReLU → Linear → logit.

Decisions ([proposal] items of MODELS.md settled here):

* w_{f_i,f_j}: one F×F scalar matrix per layer, multiplying the scaled q·k logits, **shared by
  all heads** (impl A), init N(0, 0.01) (std 0.01), so attention starts almost uniform.
* b_f is added after each block's first LN (impl A's equation), so every layer has its own
  F×d bias; MODELS.md §2.2 item 2 also reads as one bias at tokenisation, which this subsumes.
* Hypernetwork: separate banks per layer, φ_f shared across layers (see `models/nets/hypernet.py`).
* Width projection: the history is the only field whose width differs from d (item⊕category,
  2d); one Linear(2d, d) serves the pooled token, the recent-item tokens and the target query
  of target-attention pooling, so target and history meet in the same space.
* Default pooling "target_attention". Target attention costs a per-candidate pass over the
  history (O(L·d·attention_hidden)). The simulated-world figures once quoted here for it (and
  for `recent_tokens=5`) had no command behind them and are withdrawn; R defaults to 0. On
  MovieLens (below) mean pooling was *ahead* at equal epochs in a 2-epoch screen (valid AUC
  0.8536 / 0.8965 against 0.8525 / 0.8795, no user token, Adam 1e-3, seed 0) and costs about
  half the time per epoch. Run to its stop with 5 recent tokens (Adam 2e-3, ≤ 10 epochs, seed
  0), it matched target attention: valid 0.9364 against 0.9368, test 0.9384 against 0.9394.
  Equal within a seed's spread, so the default stays target attention (every serving layout
  and parity check was measured with it); `--set history_pooling=mean` halves training time.
* Defaults d=64, heads=4, layers=2, d_ff=128, M=16, k=32, K=3 (impl B's hypernetwork sizes,
  small enough for CPU training and serving); basis init N(0, 0.02) and φ init N(0, 0.1)
  follow impl A.
* Task towers (MODELS.md §2.2 item 7, "task tower(s)"): with `tasks=("ctr", "cvr")` a CVR
  tower of the same shape reads the same projected pooled tokens (ESMM: everything below the
  towers is shared; the loss is in `models.nets.multitask`).

On MovieLens-100k (issue 21; docs/models.md has the 3-seed table and the commands; the
ablations are single runs, seed 0, `ctr train` on `ctr data movielens --seed 0`, batch 256,
history 50, validation AUC per epoch from train_log.jsonl, test AUC of the kept epoch):

* User token (`user_token`). With a split by user every validation and test user is out of
  vocabulary, so the user token is the same untrained OOV row for all of them: it can carry
  nothing to test time, and DIN, GRU and SARN here do not read the user id for that reason.
  Measured (Adam 1e-3, 3 epochs): with the token, valid AUC 0.8533 / 0.8845 / 0.9081 by epoch,
  test 0.9139; without, 0.8525 / 0.8795 / 0.9131, test 0.9185. No sign that it helps; the
  MovieLens runs use `--set user_token=false`. The default stays True: a saved run's config
  has no `user_token` key, and False would change its field count.
* Learning rate. Adam 2e-3 (no user token) gave valid AUC 0.8603 / 0.9101 / 0.9225 after
  epochs 1-3 against 0.8525 / 0.8795 / 0.9131 at 1e-3: FAT learns slowly at the shared default
  of 1e-3 and was still improving when those runs stopped. The MovieLens table trains FAT,
  like the project's DIN and DeepCTR's peers, at 2e-3 (the default stays the project's 1e-3).
* Epochs. With Adam 2e-3, no user token and at most 5 epochs (patience 1), the first 3-seed
  runs picked epochs 5/5, 5/5 and 3/4 (test AUC 0.9273 ± 0.0018). Given the peers' budget
  (≤ 10 epochs, patience 2), seed 0 peaked at epoch 6 (valid 0.9275, then 0.9251, 0.9247: the
  first overfitting seen) with test 0.9295: +0.002, so the budget was part of the gap, but
  FAT without recent items levels off near 0.93, 0.007 below DeepCTR's DIEN at 6 epochs
  (0.9367) and 0.011 below it at 10 (0.9403).
* Regularisation, measured with that budget (seed 0; test AUC against 0.9295): dropout 0.1,
  0.9275; dropout 0.2, 0.9272; `embedding_l2=1e-4`, 0.9292; `weight_decay=1e-4`, 0.9182; lr
  4e-3 with `lr_decay=0.7`, 0.9292. None helps: regularisation is not what FAT lacked here,
  and all stay off by default.
* Depth and width: d=128, d_ff=256 tracked d=64 epoch for epoch (valid 0.8694 / 0.9153 /
  0.9247 / 0.9253 against 0.855 / 0.9078 / 0.9196 / 0.9239; stopped during epoch 5 to free a
  core): no sign that capacity is what it lacked either. With 5 recent tokens (seed 0, valid
  AUC of the kept epoch against 0.9368): d=128, d_ff=256 0.9363; 3 layers 0.9346; 1 layer
  (mean pooling) 0.9362; dropout 0.1 (mean pooling) 0.9363; `embedding_l2=1e-4` (mean
  pooling), which lifted SARN, 0.9350. None helps there either.
* Recent items (`recent_tokens`): what it lacked. One pooled history token carries no order, and
  the strongest peer here reads the sequence (DIEN: a GRU over it; SARN's score is order-free
  too, and gained as much from its own `recent_items`). With the last 5 items as their own
  tokens (`--set recent_tokens=5`, the same budget), FAT reaches test AUC **0.9387 ± 0.0012**
  over 3 seeds (0.9394, 0.9394, 0.9373), +0.009 over seed 0 without them at the same budget:
  the 3-seed MovieLens row. That is +0.002 over DIEN capped at 6 epochs but 0.0016 under DIEN
  with FAT's own budget (≤ 10 epochs: 0.9403 ± 0.0006), a little more than FAT's seed sd.
  R = 10 (seed 0) gave 0.9388, and a decaying rate (`lr_decay=0.7`, seed 0) 0.9401: the last
  few items carry the gain, and FAT stops on patience, not on its budget. (Of this data's
  ratings 75.8 % share their timestamp and ties are ordered by movie id, so "the last items"
  partly carry that order too; every sequence model here sees the same.) The default stays
  R = 0: the simulated-world rows, the export parity and the serving layouts were measured
  with it, and R = 5 adds 5 fields to every export; the MovieLens commands set it, as they set
  `user_token`.
* Auxiliary loss (`auxiliary_weight`, not in the paper; default 0, off): DIEN's next-click
  loss (`NextClickAuxiliary`), with the masked mean of the projected history before each slot
  as the state DIEN's GRU would give, against one sampled negative per slot (the sampler SARN's
  loss uses). Why: the two models ahead of FAT on MovieLens both train their item embeddings on
  the order of the history with such a loss (DIEN's, SARN's interest loss), FAT and DIN do not.
  With weight 1.0 (DIEN's) and R = 5 (same budget, 3 seeds) FAT learns faster (valid AUC
  0.9181 / 0.9323 / 0.9351 after epochs 1-3 on seed 0, against 0.8622 / 0.8933 / 0.9255) and
  peaks higher: valid 0.9378 ± 0.0011 against 0.9359 ± 0.0013, test **0.9414 ± 0.0007**
  against 0.9387 ± 0.0012, the MovieLens row now (DIEN: 0.9403 ± 0.0006). It costs a second
  projection of the sampled negatives and a small MLP per history slot, in training only
  (epochs took 67-139 s, three runs sharing two cores: no clean comparison with the row's
  48-55 s); serving is unchanged, the export leaves the module out. Default 0: the paper's
  model, as for R.
* Also measured and not kept (seed 0, R = 5, valid AUC of the kept epoch against 0.9368):
  a learned embedding of each history item's recency rank added before pooling
  (`history_recency=16`, so target attention can tell the order; zero-initialised, i.e.
  starting as the order-free model) 0.9347, test 0.9384; batch 128 instead of 256, 0.9354,
  test 0.9395. Neither helps on top of the recent tokens.

Inference: `FAT.materialized()` returns an eval-mode copy whose per-field weights are constant
buffers. Exporters must call it (after loading the checkpoint into a plain `FAT`) and export
the copy, so the ONNX graph has no TopK on parameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.data.batch import BehaviorBatch
from models.nets.base import BehaviorModel, TrainOutput, UserState
from models.nets.hypernet import BasisHypernetwork, FieldWeights, MaterializedWeights
from models.nets.layers import last_slots, masked_mean
from runtime.features import PAD

MASK_FILL = -1e9  # large negative instead of -inf: an all-masked row stays finite


@dataclass
class FATConfig:
    d: int = 64  # token width
    heads: int = 4
    layers: int = 2
    d_ff: int = 128
    num_bases: int = 16  # M, bases per parameter type per layer
    meta_dim: int = 32  # k, width of the field meta-embeddings φ_f
    top_k: int = 3  # K, bases composed per field (>= 2, see models/nets/hypernet.py)
    history_pooling: Literal["mean", "target_attention"] = "target_attention"  # measured better
    recent_tokens: int = 0  # R: last R history items as their own tokens
    history_recency: int = 0  # P: embed each history item's recency rank (0 = the latest), < P
    auxiliary_weight: float = 0.0  # > 0: DIEN's next-click auxiliary loss, with this weight
    attention_hidden: int = 32  # hidden width of the target-attention unit
    tower_hidden: int = 64
    residual: Literal["single", "double"] = "single"
    embedding_std: float = 0.05
    basis_std: float = 0.02
    meta_std: float = 0.1
    pair_std: float = 0.01
    tasks: tuple[str, ...] = ("ctr",)  # ("ctr", "cvr"): a second tower on the pooled tokens
    dropout: float = 0.0  # on the input tokens and on every attention / FFN branch (training)
    user_token: bool = True  # the user-id token; False: no user field (see the docstring)


def field_linear(x: Tensor, weight: Tensor) -> Tensor:
    """Field-specific linear map: x [B, F, a] with weight [F, a, b] -> [B, F, b].

    Batched matmul over the field axis, the einsum('bfa,fab->bfb') of MODELS.md §4.2 in the
    form every ONNX runtime has.
    """
    return torch.matmul(x.transpose(0, 1), weight).transpose(0, 1)


class FieldAttention(nn.Module):
    """Field-decomposed attention with cross-field modulation (§3.2); no output projection."""

    def __init__(self, fields: int, heads: int, pair_std: float) -> None:
        super().__init__()
        self.heads = heads
        self.pair = nn.Parameter(torch.randn(fields, fields) * pair_std)  # w_{f_i,f_j}

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, F, d] -> [B, H, F, d_h]

    def probs(self, h: Tensor, wq: Tensor, wk: Tensor) -> Tensor:
        """Attention weights α [B, H, F, F] (rows: querying field, columns: attended field)."""
        q, k = self._split(field_linear(h, wq)), self._split(field_linear(h, wk))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, F, F]
        return (scores * self.pair).softmax(dim=-1)

    def forward(self, h: Tensor, wq: Tensor, wk: Tensor, wv: Tensor) -> Tensor:
        """h [B, F, d] -> [B, F, d] (heads concatenated)."""
        mixed = self.probs(h, wq, wk) @ self._split(field_linear(h, wv))  # [B, H, F, d_h]
        return mixed.transpose(1, 2).flatten(2)


class FATBlock(nn.Module):
    """One layer; its field weights come from outside (hypernetwork or materialised)."""

    def __init__(
        self,
        fields: int,
        d: int,
        heads: int,
        residual: Literal["single", "double"],
        pair_std: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by heads={heads}")
        self.residual = residual
        self.norm_attention = nn.LayerNorm(d)
        self.norm_ffn = nn.LayerNorm(d)
        self.field_bias = nn.Parameter(torch.zeros(fields, d))  # b_f (§3.1), zero init
        self.attention = FieldAttention(fields, heads, pair_std)
        self.dropout = _dropout(dropout)

    def _ffn(self, x: Tensor, w: FieldWeights) -> Tensor:
        return field_linear(nn.functional.silu(field_linear(x, w.ffn1)), w.ffn2)  # §3.3

    def forward(self, z: Tensor, w: FieldWeights) -> Tensor:
        """z [B, F, d] -> [B, F, d]."""
        attended = self.attention(self.norm_attention(z) + self.field_bias, w.q, w.k, w.v)
        attended = self.dropout(attended)
        if self.residual == "single":  # impl A: Z + FFN(LN(Attn(LN(Z) + b)))
            return z + self.dropout(self._ffn(self.norm_ffn(attended), w))
        z = z + attended
        return z + self.dropout(self._ffn(self.norm_ffn(z), w))


class TargetAttentionPool(nn.Module):
    """DIN-style pooling: an MLP scores [h, t, h−t, h⊙t] per slot, masked softmax over slots."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(4 * d, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, target: Tensor, hist: Tensor, mask: Tensor) -> Tensor:
        """target [N, d], hist [N, L, d], mask [N, L] float (1 = real) -> [N, d]; empty -> 0."""
        t = target.unsqueeze(1).expand_as(hist)  # [N, L, d]
        logits = self.score(torch.cat([hist, t, hist - t, hist * t], dim=-1)).squeeze(-1)
        logits = logits.masked_fill(mask == 0, MASK_FILL)  # [N, L]
        weights = logits.softmax(dim=-1) * mask  # an all-padding row gets weight 0, not 1/L
        return (weights.unsqueeze(-1) * hist).sum(dim=1)


def recency_rank(mask: Tensor, ranks: int) -> Tensor:
    """mask [U, L] (1 = real) -> [U, L] long: how many real items follow each slot (0 for the
    latest), capped at `ranks` - 1; padding slots get 0 and are masked wherever hist is read."""
    after = mask.sum(dim=1, keepdim=True) - mask.cumsum(dim=1)  # real items after each slot
    return (after * mask).long().clamp_max(ranks - 1)


class NextClickAuxiliary(nn.Module):
    """DIEN's auxiliary loss (Zhou et al. 2019, §4.2) for a model with no sequence state: the
    state before slot t is the masked mean of the projected history before it, and an MLP on
    [state, x] tells the clicked x_t from a sampled negative n_t (BCE, every real slot that has
    a real slot before it)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(2 * d, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, hist: Tensor, negatives: Tensor, mask: Tensor) -> Tensor:
        """hist, negatives [B, L, d], mask [B, L] float (1 = real) -> scalar."""
        real = hist * mask.unsqueeze(-1)
        before = real.cumsum(dim=1) - real  # [B, L, d]: sum of the real slots before t
        count = mask.cumsum(dim=1) - mask  # [B, L]
        state = before / count.clamp_min(1.0).unsqueeze(-1)
        slots = mask * (count > 0).to(mask.dtype)
        clicked = self.score(torch.cat([state, hist], dim=-1)).squeeze(-1)  # [B, L]
        other = self.score(torch.cat([state, negatives], dim=-1)).squeeze(-1)
        loss = F.softplus(-clicked) + F.softplus(other)  # -log σ(clicked) - log(1 - σ(other))
        return (loss * slots).sum() / slots.sum().clamp_min(1.0)


def _tower(d: int, hidden: int) -> nn.Sequential:
    """ReLU → Linear(d, hidden) → ReLU → Linear(hidden, 1) → logits [N]."""
    return nn.Sequential(
        nn.ReLU(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Flatten(0)
    )


def _dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or Identity at p = 0, so a model without dropout draws no random numbers
    and trains exactly as before the option existed."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _embedding(size: int, d: int, std: float) -> nn.Embedding:
    table = nn.Embedding(size, d, padding_idx=PAD)
    with torch.no_grad():
        table.weight.normal_(0.0, std)
        table.weight[PAD].zero_()
    return table


class FAT(BehaviorModel):
    """Field-Aware Transformer over behaviour samples; see the module docstring.

    UserState: "mean" -> (user_tokens [U, F_u, d],) with the pooled history token last;
    "target_attention" -> (user_tokens [U, F_u, d], history [U, L, d], mask [U, L] float).
    """

    config_class = FATConfig

    def __init__(self, sizes: dict[str, int], config: FATConfig | None = None) -> None:
        super().__init__()
        cfg = config or FATConfig()
        self.config = cfg
        contexts = [name for name in sizes if name.startswith("context_")]
        recent = [f"recent_{i + 1}" for i in range(cfg.recent_tokens)]
        user = ["user"] if cfg.user_token else []
        self.field_names = [*user, *contexts, *recent, "history", "item", "category"]
        fields = len(self.field_names)
        d = cfg.d

        self.user_embedding = _embedding(sizes["user"], d, cfg.embedding_std)
        self.item_embedding = _embedding(sizes["item"], d, cfg.embedding_std)
        self.category_embedding = _embedding(sizes["category"], d, cfg.embedding_std)
        self.context_embeddings = nn.ModuleList(
            _embedding(sizes[name], d, cfg.embedding_std) for name in contexts
        )
        self.history_projection = nn.Linear(2 * d, d)  # item⊕category -> d
        self.recency_embedding = (
            nn.Embedding(cfg.history_recency, d) if cfg.history_recency else None
        )
        if self.recency_embedding is not None:  # zero: training starts from the order-free model
            nn.init.zeros_(self.recency_embedding.weight)
        self.auxiliary = (
            NextClickAuxiliary(d, cfg.attention_hidden) if cfg.auxiliary_weight > 0 else None
        )
        self.target_pool = (
            TargetAttentionPool(d, cfg.attention_hidden)
            if cfg.history_pooling == "target_attention"
            else None
        )

        self.meta = nn.Parameter(torch.randn(fields, cfg.meta_dim) * cfg.meta_std)  # φ_f
        self.field_weights = nn.ModuleList(
            BasisHypernetwork(d, cfg.d_ff, cfg.num_bases, cfg.meta_dim, cfg.top_k, cfg.basis_std)
            for _ in range(cfg.layers)
        )
        self.blocks = nn.ModuleList(
            FATBlock(fields, d, cfg.heads, cfg.residual, cfg.pair_std, cfg.dropout)
            for _ in range(cfg.layers)
        )
        self.token_dropout = _dropout(cfg.dropout)
        self.output_projection = nn.Linear(d, d)
        self.tower = _tower(d, cfg.tower_hidden)
        self._add_towers(cfg.tasks, lambda: _tower(d, cfg.tower_hidden))

    @classmethod
    def samples_negatives(cls, config: FATConfig) -> bool:
        return config.auxiliary_weight > 0

    def forward_train(self, batch: BehaviorBatch) -> TrainOutput:
        logits = self(batch)
        if self.auxiliary is None or batch.neg_hist_items is None or batch.neg_hist_cats is None:
            return TrainOutput(logits)
        mask = (batch.hist_items != PAD).to(logits.dtype)
        hist = self._project_history(batch.hist_items, batch.hist_cats)
        negatives = self._project_history(batch.neg_hist_items, batch.neg_hist_cats)
        aux = self.auxiliary(hist, negatives, mask)
        return TrainOutput(logits, {"auxiliary": self.config.auxiliary_weight * aux})

    # ----------------------------------------------------------------- user side
    def _project_history(self, items: Tensor, cats: Tensor) -> Tensor:
        """[...] item and category ids -> projected item⊕category [..., d]."""
        both = torch.cat([self.item_embedding(items), self.category_embedding(cats)], dim=-1)
        return self.history_projection(both)

    def encode_user(
        self, user: Tensor, hist_items: Tensor, hist_cats: Tensor, context: Tensor
    ) -> UserState:
        mask = (hist_items != PAD).to(self.history_projection.weight.dtype)  # [U, L]
        hist = self._project_history(hist_items, hist_cats)  # [U, L, d]
        if self.recency_embedding is not None:
            hist = hist + self.recency_embedding(recency_rank(mask, self.config.history_recency))
        tokens = [self.user_embedding(user).unsqueeze(1)] if self.config.user_token else []
        tokens += [emb(context[:, c]).unsqueeze(1) for c, emb in enumerate(self.context_embeddings)]
        if self.config.recent_tokens:
            tokens.append(last_slots(hist, mask, self.config.recent_tokens))  # [U, R, d]
        if self.target_pool is None:
            tokens.append(masked_mean(hist, mask).unsqueeze(1))
            return (torch.cat(tokens, dim=1),)
        # no user token, context or recent items: a [U, 0, d] block keeps the state's shape
        user_tokens = torch.cat(tokens, dim=1) if tokens else hist[:, :0]
        return user_tokens, hist, mask

    # ------------------------------------------------------------ candidate side
    def score_candidates(self, state: UserState, items: Tensor, cats: Tensor) -> Tensor:
        user_tokens = state[0]  # [N, F_u, d]
        targets = [self.item_embedding(items).unsqueeze(1), self.category_embedding(cats)[:, None]]
        if self.target_pool is not None:
            _, hist, mask = state
            query = self._project_history(items, cats)  # [N, d]
            targets.insert(0, self.target_pool(query, hist, mask).unsqueeze(1))
        z = torch.cat([user_tokens, *targets], dim=1)  # [N, F, d]
        return self.transform(z)

    def transform(self, z: Tensor) -> Tensor:
        """Tokens [N, F, d] (in `field_names` order) -> logits [N, T]."""
        z = self.token_dropout(z)
        for weights, block in zip(self.field_weights, self.blocks, strict=True):
            z = block(z, weights(self.meta))
        pooled = self.output_projection(z.sum(dim=1))  # [N, d], what every tower reads
        return self._task_logits(pooled, self.tower(pooled))

    # ----------------------------------------------------------------- inference
    @property
    def is_materialized(self) -> bool:
        return all(isinstance(w, MaterializedWeights) for w in self.field_weights)

    def materialized(self) -> FAT:
        """An eval-mode, gradient-free copy whose per-field weights are constant buffers.

        Equal outputs to `self` (the same composed tensors, computed once); its forward runs no
        router or TopK, so its ONNX export holds only matmul/softmax/LN. `self` is unchanged.
        """
        frozen = copy.deepcopy(self).eval().requires_grad_(False)
        with torch.no_grad():
            frozen.field_weights = nn.ModuleList(
                MaterializedWeights(w(frozen.meta)) for w in frozen.field_weights
            )
        return frozen
