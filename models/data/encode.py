"""Behaviour samples -> integer arrays: trained vocabularies applied to validated Arrow columns.

One encoder serves every path: the streaming readers hand it one chunk at a time, the
in-memory path (`models.data.dataset.encode_behavior`) one whole frame. Ids are mapped
distinct-first: Arrow dictionary-encodes a column (C++ hashing over every value), and only its
distinct ids are looked up in a pandas `Index` of the vocabulary (a hash table built once), so
no Python code runs per value.

Histories are oldest first, truncated to their LAST `history_len` items and padded with PAD (0)
at the end, so a row's real length is `(hist_items != PAD).sum()`. `context_fields` are the
field names without the `context_` prefix: field `device` is column `context_device` and
vocabulary `context_device`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.data.columns import list_lengths
from models.data.vocab import CONTEXT_PREFIX
from runtime.features import OOV, PAD, Vocabulary


@dataclass
class BehaviorArrays:
    """An encoded behaviour split (or a part of one); row i of every array is sample i."""

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

    def take(self, index: np.ndarray | slice) -> BehaviorArrays:
        """The rows `index` (an integer index array, a boolean mask or a slice), in that order."""
        taken: dict[str, Any] = {f.name: _take(getattr(self, f.name), index) for f in fields(self)}
        return replace(self, **taken)

    @staticmethod
    def concat(parts: Sequence[BehaviorArrays]) -> BehaviorArrays:
        """The rows of `parts`, one after the other (at least one part)."""
        if len(parts) == 1:
            return parts[0]
        joined: dict[str, Any] = {
            f.name: _concat([getattr(part, f.name) for part in parts]) for f in fields(parts[0])
        }
        return BehaviorArrays(**joined)


def rebatch(parts: Iterable[BehaviorArrays], size: int) -> Iterator[BehaviorArrays]:
    """The rows of `parts` in order, `size` at a time (the last batch may be smaller)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    carry: BehaviorArrays | None = None
    for part in parts:
        rows = part if carry is None else BehaviorArrays.concat([carry, part])
        full = len(rows) - len(rows) % size
        for start in range(0, full, size):
            yield rows.take(slice(start, start + size))
        carry = rows.take(slice(full, None)) if full < len(rows) else None
    if carry is not None:
        yield carry


class Encoder:
    """Trained vocabularies applied to behaviour columns; unknown ids become OOV."""

    def __init__(
        self, vocabs: dict[str, Vocabulary], history_len: int, context_fields: Sequence[str]
    ) -> None:
        if history_len < 1:
            raise ValueError(f"history_len must be at least 1, got {history_len}")
        self.history_len = history_len
        self.context_fields = list(context_fields)
        self._lookup = {
            name: pd.Index(np.asarray(vocab.tokens, dtype=object)) for name, vocab in vocabs.items()
        }

    def encode(self, columns: dict[str, pa.Array]) -> BehaviorArrays:
        """Canonical columns (`models.data.columns`) of n rows -> their `BehaviorArrays`."""
        n = len(columns["item_id"])
        context = [
            self.codes(CONTEXT_PREFIX + name, columns[CONTEXT_PREFIX + name])
            for name in self.context_fields
        ]
        conversion = columns.get("conversion")
        return BehaviorArrays(
            user=self.codes("user", columns["user_id"]),
            hist_items=self._histories("item", columns["hist_item_ids"]),
            hist_cats=self._histories("category", columns["hist_category_ids"]),
            items=self.codes("item", columns["item_id"]),
            cats=self.codes("category", columns["category_id"]),
            context=np.stack(context, axis=1) if context else np.zeros((n, 0), np.int64),
            label=columns["label"].to_numpy().astype(np.float32),
            conversion=None if conversion is None else conversion.to_numpy().astype(np.float32),
        )

    def codes(self, vocabulary: str, ids: pa.Array) -> np.ndarray:
        """String ids -> int64 indices of the vocabulary (OOV when unknown)."""
        encoded = pc.dictionary_encode(ids)
        distinct = encoded.dictionary.to_numpy(zero_copy_only=False)
        found = self._lookup[vocabulary].get_indexer(distinct)  # -1 when unknown
        table = np.where(found < 0, OOV, found + OOV + 1).astype(np.int64)
        return table[encoded.indices.to_numpy()]

    def _histories(self, vocabulary: str, lists: pa.Array) -> np.ndarray:
        codes = self.codes(vocabulary, pc.list_flatten(lists))
        return pad_histories(codes, list_lengths(lists), self.history_len)


def pad_histories(codes: np.ndarray, lengths: np.ndarray, history_len: int) -> np.ndarray:
    """Flat codes of n lists (oldest first) with their lengths -> [n, history_len] int64
    keeping each list's last history_len codes, PAD at the end."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(codes.size) - starts[rows]  # index inside its own list
    slot = position - np.maximum(lengths - history_len, 0)[rows]  # shift drops the oldest items
    keep = slot >= 0
    out = np.full((len(lengths), history_len), PAD, dtype=np.int64)
    out[rows[keep], slot[keep]] = codes[keep]
    return out


def _take(value: np.ndarray | None, index: np.ndarray | slice) -> np.ndarray | None:
    return None if value is None else value[index]


def _concat(values: list[np.ndarray | None]) -> np.ndarray | None:
    present = [v for v in values if v is not None]
    return np.concatenate(present) if len(present) == len(values) else None
