"""In-memory behaviour samples -> integer arrays -> `BehaviorBatch`es (torch only for batches).

The in-memory flow is `load_behavior` (models.data.schema) -> `fit_vocabularies` on the
training split only -> `encode_behavior` for every split -> `iterate_batches`, optionally with
a `NegativeSampler` for the auxiliary losses that need one negative item per history slot
(DIEN/SARN). The counting and the encoding are those of the streaming path
(`models.data.vocab`, `models.data.encode`), applied to a whole frame: both paths give the same
vocabularies and the same arrays for the same rows. `make_batch` turns rows of either path into
a `BehaviorBatch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from models.data.batch import BehaviorBatch
from models.data.encode import BehaviorArrays, Encoder
from models.data.vocab import CONTEXT_PREFIX, VocabularyCounter
from runtime.features import OOV, PAD, Vocabulary

_ID_COLUMNS = ("user_id", "item_id", "category_id")
_LIST_COLUMNS = ("hist_item_ids", "hist_category_ids")


def fit_vocabularies(train: pd.DataFrame, context_fields: Sequence[str]) -> dict[str, Vocabulary]:
    """Vocabularies `item` (targets + history), `category`, `user`, `context_<name>`.

    Pass the training split only: ids first seen in validation or at serving time must map to
    OOV exactly as they will in production.
    """
    counter = VocabularyCounter(context_fields)
    counter.add(_arrow_columns(train, context_fields))
    return counter.vocabularies()


def encode_behavior(
    df: pd.DataFrame, vocabs: dict[str, Vocabulary], history_len: int, context_fields: Sequence[str]
) -> BehaviorArrays:
    """Maps a loaded behaviour frame to indices with trained vocabularies (unknown -> OOV)."""
    encoder = Encoder(vocabs, history_len, context_fields)
    return encoder.encode(_arrow_columns(df, context_fields))


def _arrow_columns(df: pd.DataFrame, context_fields: Sequence[str]) -> dict[str, pa.Array]:
    """The frame's behaviour columns as the canonical Arrow columns the encoder reads."""
    names = [*_ID_COLUMNS, *(_context_column(df, name) for name in context_fields)]
    columns = {name: pa.array(df[name].to_numpy(dtype=object), pa.string()) for name in names}
    for name in _LIST_COLUMNS:
        columns[name] = pa.array(list(df[name]), pa.large_list(pa.string()))
    for name in ("label", "conversion"):
        if name in df.columns:
            columns[name] = pa.array(df[name].to_numpy(dtype=np.int64))
    return columns


class ItemFrequencies:
    """How often each item occurs among the positive targets and the history slots of encoded
    rows, and its category: what `NegativeSampler` draws from. Added chunk by chunk, so the
    streaming path builds it while it writes its shards."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)  # [V] occurrences per item index
        self.category = np.zeros(0, dtype=np.int64)  # [V] category index per item index

    def add(self, arrays: BehaviorArrays) -> None:
        positives = arrays.label > 0.5
        items = np.concatenate([arrays.items[positives], arrays.hist_items.ravel()])
        cats = np.concatenate([arrays.cats[positives], arrays.hist_cats.ravel()])
        real = items > OOV  # PAD is padding; OOV is no particular item
        items, cats = items[real].astype(np.int64), cats[real].astype(np.int64)
        size = max(len(self.counts), int(items.max(initial=-1)) + 1)
        self.counts = np.pad(self.counts, (0, size - len(self.counts)))
        self.category = np.pad(self.category, (0, size - len(self.category)))
        self.counts += np.bincount(items, minlength=size)
        self.category[items] = cats


class NegativeSampler:
    """One negative item per history slot, for the auxiliary losses of DIEN/SARN.

    As in DIEN's `data_iterator.py`, the draw is weighted by how often an item occurs (there:
    one entry per review in `reviews-info`; here: every occurrence of an item among the positive
    targets and the history slots of the training arrays), a draw equal to the positive in the
    same slot is drawn again, and the category of a drawn item is the one it has in the training
    data. PAD slots stay PAD. Seeded: the same seed and calls give the same negatives; `rng`'s
    `bit_generator.state` is what a resumed run restores.
    """

    def __init__(
        self, source: BehaviorArrays | ItemFrequencies, seed: int | np.random.SeedSequence = 0
    ) -> None:
        if isinstance(source, BehaviorArrays):
            frequencies = ItemFrequencies()
            frequencies.add(source)
        else:
            frequencies = source
        self.pool = np.flatnonzero(frequencies.counts)  # items > OOV only: PAD/OOV never count
        if self.pool.size < 2:
            raise ValueError("negative sampling needs at least 2 distinct items in training")
        self.cumulative = np.cumsum(frequencies.counts[self.pool], dtype=np.float64)
        self.category = frequencies.category  # item -> its category
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
        yield make_batch(arrays.take(order[start : start + batch_size]), sampler, trim)


def make_batch(
    rows: BehaviorArrays, sampler: NegativeSampler | None = None, trim: bool = True
) -> BehaviorBatch:
    """Rows as tensors (ids int64); `trim`: see `iterate_batches`."""
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


def _context_column(df: pd.DataFrame, name: str) -> str:
    column = CONTEXT_PREFIX + name
    if column not in df.columns:
        raise ValueError(f"context field {name!r}: the data has no column {column!r}")
    return column


def _tensor(array: np.ndarray) -> torch.Tensor:
    """int64 for ids (shards hold int32), float32 for labels."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.long() if not tensor.is_floating_point() else tensor
