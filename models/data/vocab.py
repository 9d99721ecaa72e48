"""Vocabularies fitted from id counts that are gathered chunk by chunk.

Training data may be far larger than memory, so ids are counted one chunk at a time: each
chunk's ids are counted by Arrow (`value_counts`), and the partial counts are merged by an
Arrow group-by whenever they outgrow the merged table, so memory holds about twice the distinct
ids, never the data. The vocabulary of the counts is `Vocabulary.from_counts`: decreasing
frequency, ties by id, ids seen fewer than `min_count` times left out (they map to OOV, like
ids never seen). The in-memory path (`models.data.dataset.fit_vocabularies`) counts through the
same code, so both paths give the same vocabularies for the same rows.

Vocabularies: `item` (targets + every history item), `category` (the same for categories),
`user`, and `context_<name>` per context field.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from runtime.features import Vocabulary

CONTEXT_PREFIX = "context_"
_MERGE_AT = 1 << 20  # partial counts held before the first merge


class IdTally:
    """Counts of string ids, added one Arrow array at a time."""

    def __init__(self) -> None:
        self._values: list[pa.Array] = []
        self._counts: list[pa.Array] = []
        self._pending = 0  # partial-count entries since the last merge
        self._merged = 0  # entries after the last merge (the distinct ids so far)

    def add(self, ids: pa.Array) -> None:
        counted = pc.value_counts(ids)
        self._values.append(counted.field("values"))
        self._counts.append(counted.field("counts"))
        self._pending += len(counted)
        if self._pending > max(_MERGE_AT, self._merged):
            self._merge()

    def counts(self) -> dict[str, int]:
        self._merge()
        if not self._values:
            return {}
        return dict(zip(self._values[0].to_pylist(), self._counts[0].to_pylist(), strict=True))

    def _merge(self) -> None:
        if len(self._values) <= 1:
            return
        table = pa.table(
            {"id": pa.concat_arrays(self._values), "n": pa.concat_arrays(self._counts)}
        )
        merged = table.group_by("id").aggregate([("n", "sum")])
        self._values = [merged.column("id").combine_chunks()]
        self._counts = [merged.column("n_sum").combine_chunks()]
        self._merged, self._pending = len(merged), 0


class VocabularyCounter:
    """The ids of behaviour chunks (canonical columns, `models.data.columns`), counted per
    vocabulary."""

    def __init__(self, context_fields: Sequence[str]) -> None:
        self.context_fields = list(context_fields)
        self.tallies = {name: IdTally() for name in vocabulary_names(context_fields)}

    def add(self, columns: dict[str, pa.Array]) -> None:
        self.tallies["item"].add(_with_history(columns, "item_id", "hist_item_ids"))
        self.tallies["category"].add(_with_history(columns, "category_id", "hist_category_ids"))
        self.tallies["user"].add(columns["user_id"])
        for name in self.context_fields:
            self.tallies[CONTEXT_PREFIX + name].add(columns[CONTEXT_PREFIX + name])

    def vocabularies(self, min_count: int = 1) -> dict[str, Vocabulary]:
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        return {
            name: Vocabulary.from_counts(tally.counts(), min_count)
            for name, tally in self.tallies.items()
        }


def vocabulary_names(context_fields: Iterable[str]) -> list[str]:
    return ["item", "category", "user", *(CONTEXT_PREFIX + name for name in context_fields)]


def _with_history(columns: dict[str, pa.Array], target: str, history: str) -> pa.Array:
    return pa.concat_arrays([columns[target], pc.list_flatten(columns[history])])
