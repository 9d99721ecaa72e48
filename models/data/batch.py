"""Tensor batches that the models consume. Shapes: B rows, L history slots, C context fields."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class BehaviorBatch:
    """One batch of behaviour samples (history, target, label), already mapped to indices.

    Histories are oldest first and padded with `features.PAD` (0) at the end, so the mask is
    `hist_items != PAD` and appending padding never changes a score.
    """

    user: Tensor  # [B] int64
    hist_items: Tensor  # [B, L] int64
    hist_cats: Tensor  # [B, L] int64
    items: Tensor  # [B] int64, the target item
    cats: Tensor  # [B] int64, the target's category
    context: Tensor  # [B, C] int64 (C may be 0)
    label: Tensor  # [B] float32 in {0, 1}
    neg_hist_items: Tensor | None = None  # [B, L] one sampled negative per history slot (aux loss)
    neg_hist_cats: Tensor | None = None  # [B, L]
    conversion: Tensor | None = None  # [B] float32, optional multi-task label

    def to(self, device: torch.device | str) -> BehaviorBatch:
        moved = {
            f.name: (v.to(device) if isinstance(v, Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return replace(self, **moved)

    def __len__(self) -> int:
        return int(self.items.shape[0])
