"""Behaviour samples -> integer arrays -> `BehaviorBatch`es (torch is used only for batches).

The flow is `load_behavior` (models.data.schema) -> `fit_vocabularies` on the training split only ->
`encode_behavior` for every split -> `iterate_batches`, optionally with a `NegativeSampler` for
the auxiliary losses that need one negative item per history slot (DIEN/SARN).

Histories are oldest first, truncated to their LAST `history_len` items and padded with PAD (0) at
the end, so a row's real length is `(hist_items != PAD).sum()`. `context_fields` are the field
names without the `context_` prefix: field `device` is column `context_device` and vocabulary
`context_device`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from itertools import chain
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.data.batch import BehaviorBatch
from runtime.features import OOV, PAD, Vocabulary

CONTEXT_PREFIX = "context_"


def fit_vocabularies(train: pd.DataFrame, context_fields: Sequence[str]) -> dict[str, Vocabulary]:
    """Vocabularies `item` (targets + history), `category`, `user`, `context_<name>`.

    Pass the training split only: ids first seen in validation or at serving time must map to
    OOV exactly as they will in production.
    """
    vocabs = {
        "item": _fit(chain(train["item_id"], _flat(train["hist_item_ids"]))),
        "category": _fit(chain(train["category_id"], _flat(train["hist_category_ids"]))),
        "user": _fit(train["user_id"]),
    }
    for name in context_fields:
        column = _context_column(train, name)
        vocabs[column] = _fit(train[column])
    return vocabs


@dataclass
class BehaviorArrays:
    """An encoded behaviour split; row i of every array is sample i."""

    user: np.ndarray  # [n] int64
    hist_items: np.ndarray  # [n, L] int64, oldest first, PAD at the end
    hist_cats: np.ndarray  # [n, L] int64
    items: np.ndarray  # [n] int64
    cats: np.ndarray  # [n] int64
    context: np.ndarray  # [n, C] int64
    label: np.ndarray  # [n] float32
    conversion: np.ndarray | None = None  # [n] float32

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def take(self, index: np.ndarray) -> BehaviorArrays:
        """The rows `index` (any integer index array or boolean mask), in that order."""
        taken: dict[str, Any] = {f.name: _take(getattr(self, f.name), index) for f in fields(self)}
        return replace(self, **taken)


def encode_behavior(
    df: pd.DataFrame, vocabs: dict[str, Vocabulary], history_len: int, context_fields: Sequence[str]
) -> BehaviorArrays:
    """Maps a loaded behaviour frame to indices with trained vocabularies (unknown -> OOV)."""
    if history_len < 1:
        raise ValueError(f"history_len must be at least 1, got {history_len}")
    context = [
        _encode(vocabs[col], df[col])
        for col in (_context_column(df, name) for name in context_fields)
    ]
    return BehaviorArrays(
        user=_encode(vocabs["user"], df["user_id"]),
        hist_items=_encode_histories(df["hist_item_ids"], vocabs["item"], history_len),
        hist_cats=_encode_histories(df["hist_category_ids"], vocabs["category"], history_len),
        items=_encode(vocabs["item"], df["item_id"]),
        cats=_encode(vocabs["category"], df["category_id"]),
        context=np.stack(context, axis=1) if context else np.zeros((len(df), 0), np.int64),
        label=df["label"].to_numpy(dtype=np.float32),
        conversion=(
            df["conversion"].to_numpy(dtype=np.float32) if "conversion" in df.columns else None
        ),
    )


class NegativeSampler:
    """One negative item per history slot, for the auxiliary losses of DIEN/SARN.

    As in DIEN's `data_iterator.py`, the draw is weighted by how often an item occurs (there:
    one entry per review in `reviews-info`; here: every occurrence of an item among the positive
    targets and the history slots of the training arrays), a draw equal to the positive in the
    same slot is drawn again, and the category of a drawn item is the one it has in the training
    data. PAD slots stay PAD. Seeded: the same seed and calls give the same negatives.
    """

    def __init__(self, arrays: BehaviorArrays, seed: int = 0) -> None:
        positives = arrays.label > 0.5
        items = np.concatenate([arrays.items[positives], arrays.hist_items.ravel()])
        cats = np.concatenate([arrays.cats[positives], arrays.hist_cats.ravel()])
        real = items > OOV  # PAD is padding; OOV is no particular item
        items, cats = items[real], cats[real]
        self.pool, counts = np.unique(items, return_counts=True)
        if self.pool.size < 2:
            raise ValueError("negative sampling needs at least 2 distinct items in training")
        self.cumulative = np.cumsum(counts, dtype=np.float64)
        self.category = np.zeros(int(self.pool[-1]) + 1, dtype=np.int64)  # item -> its category
        self.category[items] = cats
        self.rng = np.random.default_rng(seed)

    def sample(self, hist_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """hist_items [B, L] -> (neg_items [B, L], neg_cats [B, L]), PAD where history is PAD."""
        neg = self._draw(hist_items.shape)
        collide = neg == hist_items
        while collide.any():  # at least 2 items in the pool, so this ends
            neg[collide] = self._draw(int(collide.sum()))
            collide = neg == hist_items
        neg[hist_items == PAD] = PAD
        return neg, self.category[neg]

    def _draw(self, shape: int | tuple[int, ...]) -> np.ndarray:
        total = self.cumulative[-1]
        picks = np.searchsorted(self.cumulative, self.rng.random(shape) * total, side="right")
        return self.pool[np.minimum(picks, self.pool.size - 1)]


def iterate_batches(
    arrays: BehaviorArrays,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    sampler: NegativeSampler | None = None,
    trim: bool = True,
) -> Iterator[BehaviorBatch]:
    """Yields batches in an order that depends only on `seed` (when shuffling).

    `trim` cuts a batch's history width L to its longest real history (at least one column):
    histories are padded at the end, so only PAD columns are dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = len(arrays)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield _make_batch(arrays.take(order[start : start + batch_size]), sampler, trim)


def _make_batch(rows: BehaviorArrays, sampler: NegativeSampler | None, trim: bool) -> BehaviorBatch:
    hist_items, hist_cats = rows.hist_items, rows.hist_cats
    if trim:
        width = max(1, int((hist_items != PAD).sum(axis=1).max(initial=0)))
        hist_items, hist_cats = hist_items[:, :width], hist_cats[:, :width]
    negatives = sampler.sample(hist_items) if sampler is not None else None
    return BehaviorBatch(
        user=_tensor(rows.user),  # [B]
        hist_items=_tensor(hist_items),  # [B, L]
        hist_cats=_tensor(hist_cats),  # [B, L]
        items=_tensor(rows.items),  # [B]
        cats=_tensor(rows.cats),  # [B]
        context=_tensor(rows.context),  # [B, C]
        label=_tensor(rows.label),  # [B]
        neg_hist_items=_tensor(negatives[0]) if negatives is not None else None,  # [B, L]
        neg_hist_cats=_tensor(negatives[1]) if negatives is not None else None,  # [B, L]
        conversion=_tensor(rows.conversion) if rows.conversion is not None else None,  # [B]
    )


def _encode_histories(lists: pd.Series, vocab: Vocabulary, history_len: int) -> np.ndarray:
    """Lists of ids (oldest first) -> [n, history_len] int64 keeping the last history_len, PAD at end."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    codes = _encode(vocab, _flat(lists))
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(codes.size) - starts[rows]  # index inside its own list
    slot = position - np.maximum(lengths - history_len, 0)[rows]  # shift drops the oldest items
    keep = slot >= 0
    out = np.full((len(lengths), history_len), PAD, dtype=np.int64)
    out[rows[keep], slot[keep]] = codes[keep]
    return out


def _flat(lists: Iterable[Iterable[str]]) -> Iterator[str]:
    return chain.from_iterable(lists)


def _ids(values: Iterable[str]) -> np.ndarray:
    return np.fromiter(values, dtype=object)


def _fit(values: Iterable[str]) -> Vocabulary:
    """`Vocabulary.fit` with the counting done by pandas (millions of ids)."""
    counts = pd.Series(_ids(values), dtype=object).value_counts(sort=False)
    return Vocabulary.from_counts(dict(zip(counts.index, counts.tolist(), strict=True)))


def _encode(vocab: Vocabulary, values: Iterable[str]) -> np.ndarray:
    """`vocab.encode` over the distinct ids only: hashing in pandas is ~4x faster at scale."""
    codes, uniques = pd.factorize(_ids(values))
    return vocab.encode(uniques)[codes].astype(np.int64)


def _context_column(df: pd.DataFrame, name: str) -> str:
    column = CONTEXT_PREFIX + name
    if column not in df.columns:
        raise ValueError(f"context field {name!r}: the data has no column {column!r}")
    return column


def _take(value: np.ndarray | None, index: np.ndarray) -> np.ndarray | None:
    return None if value is None else value[index]


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))
