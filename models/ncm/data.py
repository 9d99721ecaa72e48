"""Slate sessions as tensors: the loader's DataFrame -> encoded sessions -> [B, S, K] batches.

Notation: B sessions per batch, S slates per session (padded to the longest in the batch),
K positions per slate (static per model: the longest training slate; longer slates are cut).

Two batch views of the same sessions (MODELS.md §3.1, §3.9):

* training: every valid position is a target and every click is history (the models shift the
  history themselves, so slate t only ever sees the clicks of slates < t);
* evaluation: the first ⌊0.8·S⌋ slates of a session are context; the rest are targets, and
  their clicks are zeroed in `hist_clicks`, so no target click is visible to any prediction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from runtime.features import Vocabulary

SLATE_COLUMNS = ("user_id", "session_id", "slate_index", "item_ids", "category_ids", "clicks")


@dataclass
class SlateBatch:
    """One batch of padded sessions. Padding (slate or position) has index 0 and mask False."""

    items: Tensor  # [B, S, K] int64
    cats: Tensor  # [B, S, K] int64
    mask: Tensor  # [B, S, K] bool, a real item was shown there
    clicks: Tensor  # [B, S, K] float32 labels, 0 on padding
    hist_clicks: Tensor  # [B, S, K] float32 clicks the model may see (0 on target slates at eval)
    target: Tensor  # [B, S, K] bool, positions scored by the loss / the metrics

    def to(self, device: torch.device | str) -> SlateBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.items.shape[0])


@dataclass
class SlateSessions:
    """Encoded sessions: one row per slate ([N, K]), sessions as contiguous row ranges."""

    items: np.ndarray  # [N, K] int64
    cats: np.ndarray  # [N, K] int64
    clicks: np.ndarray  # [N, K] float32
    lengths: np.ndarray  # [N] int64, shown positions per slate (≤ K)
    starts: np.ndarray  # [M] int64, first row of each session
    counts: np.ndarray  # [M] int64, slates per session

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def max_slate(self) -> int:
        return int(self.items.shape[1])


def fit_slate_vocabs(frame: pd.DataFrame) -> dict[str, Vocabulary]:
    """Item and category vocabularies from the training slates only."""
    return {
        "item": Vocabulary.fit(_flatten(frame["item_ids"])),
        "category": Vocabulary.fit(_flatten(frame["category_ids"])),
    }


def longest_slate(frame: pd.DataFrame) -> int:
    return int(frame["item_ids"].map(len).max())


def encode_sessions(
    frame: pd.DataFrame, vocabs: dict[str, Vocabulary], max_slate: int
) -> SlateSessions:
    """Sorts by (user, session, slate_index) and encodes ids; slates longer than K are cut."""
    frame = frame.sort_values(["user_id", "session_id", "slate_index"], kind="stable")
    lengths = frame["item_ids"].map(len).to_numpy(dtype=np.int64)
    items = _scatter(vocabs["item"].encode(_flatten(frame["item_ids"])), lengths, max_slate)
    cats = _scatter(vocabs["category"].encode(_flatten(frame["category_ids"])), lengths, max_slate)
    flat_clicks = (np.asarray(_flatten(frame["clicks"]), dtype=np.float64) > 0).astype(np.float32)
    clicks = _scatter(flat_clicks, lengths, max_slate)
    starts, counts = _session_ranges(frame)
    return SlateSessions(items, cats, clicks, np.minimum(lengths, max_slate), starts, counts)


def context_lengths(counts: np.ndarray) -> np.ndarray:
    """⌊0.8·S⌋ context slates per session (integer arithmetic, so 0.8·5 is exactly 4)."""
    return (counts * 4) // 5


def make_batch(sessions: SlateSessions, index: np.ndarray, evaluation: bool) -> SlateBatch:
    """Pads the chosen sessions to [B, S, K]; `evaluation` selects the last-20% protocol."""
    counts = sessions.counts[index]  # [B]
    slate_pos = np.arange(int(counts.max()))  # [S]
    valid_slate = slate_pos[None, :] < counts[:, None]  # [B, S]
    rows = np.where(valid_slate, sessions.starts[index][:, None] + slate_pos[None, :], 0)
    position = np.arange(sessions.max_slate)  # [K]
    mask = valid_slate[..., None] & (position < sessions.lengths[rows][..., None])  # [B, S, K]
    clicks = sessions.clicks[rows] * mask  # [B, S, K]
    if evaluation:
        target_slate = slate_pos[None, :] >= context_lengths(counts)[:, None]  # [B, S]
        target = mask & target_slate[..., None]
        hist_clicks = clicks * ~target_slate[..., None]
    else:
        target, hist_clicks = mask, clicks
    return SlateBatch(
        items=torch.from_numpy(sessions.items[rows] * mask),
        cats=torch.from_numpy(sessions.cats[rows] * mask),
        mask=torch.from_numpy(mask),
        clicks=torch.from_numpy(clicks.astype(np.float32)),
        hist_clicks=torch.from_numpy(hist_clicks.astype(np.float32)),
        target=torch.from_numpy(target),
    )


def iter_batches(
    sessions: SlateSessions,
    batch_size: int,
    evaluation: bool,
    seed: int | None = None,
    limit: int | None = None,
) -> Iterator[SlateBatch]:
    """Batches in session order, or shuffled by `seed`; `limit` keeps the first sessions."""
    order = np.arange(len(sessions))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(order)
    order = order[:limit]
    for begin in range(0, len(order), batch_size):
        yield make_batch(sessions, order[begin : begin + batch_size], evaluation)


def _flatten(column: pd.Series) -> list[str]:
    return [token for row in column for token in row]


def _scatter(flat: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Ragged rows (concatenated, `lengths` each) -> [N, width], zero-padded, cut at width."""
    row = np.repeat(np.arange(lengths.shape[0]), lengths)
    col = np.arange(flat.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = col < width
    out = np.zeros((lengths.shape[0], width), dtype=flat.dtype)
    out[row[keep], col[keep]] = flat[keep]
    return out


def _session_ranges(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """First row and slate count of each (user, session) run in the sorted frame."""
    key = frame["user_id"].astype(str) + "\x1f" + frame["session_id"].astype(str)
    new = np.ones(len(frame), dtype=bool)
    new[1:] = key.to_numpy()[1:] != key.to_numpy()[:-1]
    starts = np.flatnonzero(new).astype(np.int64)
    counts = np.diff(np.append(starts, len(frame))).astype(np.int64)
    return starts, counts
