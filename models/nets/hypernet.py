"""FAT's basis-composed hypernetwork (MODELS.md §2.2 item 6) and its materialised form.

For every parameter type Φ ∈ {Q, K, V, FFN₁, FFN₂} a `BasisBank` holds M shared bases B_{m,Φ}
with the shape of W_Φ and a bias-free linear router g_Φ: R^k → R^M. Field f's weight is
W_Φ^{(f)} = Σ_{m ∈ TopK(g_Φ(φ_f))} softmax(kept scores)_m · B_{m,Φ}, with φ_f ∈ R^k the field's
meta-embedding.

Decisions:

* [proposal, settled] One `BasisHypernetwork` (five banks and five routers) per layer, while the
  meta-embeddings φ_f are owned by the model and shared by all layers (impl B's layout; impl A
  shares a single hypernetwork, hence identical weights, across layers).
* Gradients follow top-K routing, MoE-style, with no straight-through estimator. A basis that
  no field selects receives an exactly zero gradient, and so does the router row that scores
  it; a field's unselected scores do not enter the softmax. With `top_k = 1` the softmax over
  one score is the constant 1, so routers and φ would receive no gradient at all: `top_k >= 2`
  is required.
* No load-balancing loss (none is known from the paper; MODELS.md §4.2 only suggests one if
  routing collapses).

The routing depends only on parameters, never on data, so after training every W_Φ^{(f)} is a
constant. `MaterializedWeights` holds those constants as buffers and has the same call signature
as `BasisHypernetwork`, so a model swaps one for the other (`FAT.materialized()`) and its
exported graph contains no TopK.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class FieldWeights(NamedTuple):
    """One layer's field-specific weights, leading axis F (one slice per field)."""

    q: Tensor  # [F, d, d]
    k: Tensor  # [F, d, d]
    v: Tensor  # [F, d, d]
    ffn1: Tensor  # [F, d, d_ff]
    ffn2: Tensor  # [F, d_ff, d]


class BasisBank(nn.Module):
    """M bases of one parameter type plus its router; composes one weight per field."""

    def __init__(
        self, shape: tuple[int, ...], num_bases: int, meta_dim: int, top_k: int, std: float
    ) -> None:
        super().__init__()
        if not 2 <= top_k <= num_bases:
            raise ValueError(f"need 2 <= top_k <= num_bases, got top_k={top_k}, M={num_bases}")
        self.top_k = top_k
        self.bases = nn.Parameter(torch.randn(num_bases, *shape) * std)  # [M, *shape], impl A
        self.router = nn.Linear(meta_dim, num_bases, bias=False)  # g_Φ

    def routing(self, meta: Tensor) -> tuple[Tensor, Tensor]:
        """φ [F, k] -> (mixing weights α [F, K], selected basis indices [F, K])."""
        kept, index = self.router(meta).topk(self.top_k, dim=-1)  # [F, K], [F, K]
        return kept.softmax(dim=-1), index

    def forward(self, meta: Tensor) -> Tensor:
        """φ [F, k] -> W^{(f)} [F, *shape]."""
        alpha, index = self.routing(meta)
        chosen = self.bases[index]  # [F, K, *shape]
        alpha = alpha.reshape(*alpha.shape, *([1] * (chosen.dim() - 2)))  # [F, K, 1, ...]
        return (alpha * chosen).sum(dim=1)

    def selected(self, meta: Tensor) -> Tensor:
        """bool [M]: the bases that at least one field routes to (the ones a gradient reaches)."""
        _, index = self.routing(meta)
        hit = torch.zeros(self.bases.shape[0], dtype=torch.bool, device=index.device)
        return hit.index_fill(0, index.flatten(), True)


class BasisHypernetwork(nn.Module):
    """One layer's five banks: φ [F, k] -> `FieldWeights`."""

    def __init__(
        self, d: int, d_ff: int, num_bases: int, meta_dim: int, top_k: int, std: float
    ) -> None:
        super().__init__()
        shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "ffn1": (d, d_ff), "ffn2": (d_ff, d)}
        self.banks = nn.ModuleDict(
            {name: BasisBank(s, num_bases, meta_dim, top_k, std) for name, s in shapes.items()}
        )

    def forward(self, meta: Tensor) -> FieldWeights:
        return FieldWeights(**{name: bank(meta) for name, bank in self.banks.items()})


class MaterializedWeights(nn.Module):
    """A layer's field weights frozen as buffers; same call signature as `BasisHypernetwork`."""

    def __init__(self, weights: FieldWeights) -> None:
        super().__init__()
        for name, value in weights._asdict().items():
            self.register_buffer(name, value.detach().clone())

    def forward(self, meta: Tensor) -> FieldWeights:
        """Ignores φ: the weights are constants (what makes the exported graph TopK-free)."""
        del meta
        return FieldWeights(*(getattr(self, name) for name in FieldWeights._fields))
