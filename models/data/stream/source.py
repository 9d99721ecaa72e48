"""Behaviour samples named by a path (one file or a directory of files), read chunk by chunk.

Every file is validated as it is read (`models.data.schema.read_chunks`), so an error names the
file, its row and the column, as the in-memory loader does. The context fields are those of
the first file (or the ones a trained run expects); every file must carry them, and the
`conversion` column when the model needs it: both are checked from the files' headers before
a row is read, so a bad part file fails in seconds, not after an hour of counting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from models.data.schema import (
    BEHAVIOR,
    Chunk,
    DataError,
    behavior_rules,
    columns_of,
    read_chunks,
    sample_files,
)
from models.data.vocab import CONTEXT_PREFIX

CHUNK_ROWS = 65_536  # rows per chunk: Arrow's work per call stays large, memory stays small


@dataclass(frozen=True)
class SampleSource:
    """The behaviour files behind a path and what is read from them.

    `clicked_only`: only rows with label 1 are read (a conversion-only model trains on clicks);
    `conversions`: every file has the `conversion` column, and it is read (when only some
    files have it, it is left out, so every chunk has the same columns).
    """

    path: Path
    files: tuple[Path, ...]
    context_fields: tuple[str, ...]
    conversions: bool = False
    clicked_only: bool = False

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        context_fields: Sequence[str] | None = None,
        conversions: bool = False,
        clicked_only: bool = False,
    ) -> SampleSource:
        """Checks every file's columns; `context_fields` None: those of the first file;
        `conversions`: the model needs them, so every file must have them."""
        files = sample_files(Path(path))
        columns = [columns_of(file, BEHAVIOR) for file in files]
        why = "the model was trained with this context field"
        if context_fields is None:
            context_fields = [c[len(CONTEXT_PREFIX) :] for c in columns[0] if _is_context(c)]
            why = f"{files[0].name} has this context column and every file must"
        for file, present in zip(files, columns, strict=True):
            for name in context_fields:
                _check_has(file, present, CONTEXT_PREFIX + name, why)
            if conversions:
                _check_has(file, present, "conversion", "the model's tasks need conversion labels")
        everywhere = all("conversion" in present for present in columns)
        return cls(Path(path), tuple(files), tuple(context_fields), everywhere, clicked_only)

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[Chunk]:
        """Validated chunks of every file in order (only clicked rows when `clicked_only`)."""
        for file in self.files:
            for chunk in read_chunks(file, BEHAVIOR, rows, behavior_rules):
                yield self._shaped(chunk)

    def _shaped(self, chunk: Chunk) -> Chunk:
        """The chunk's columns and rows that this source reads (validated before: an error
        still names the file's row)."""
        columns = {n: a for n, a in chunk.columns.items() if n != "conversion" or self.conversions}
        if self.clicked_only:
            keep = pc.equal(columns["label"], 1)
            columns = {name: arr.filter(keep) for name, arr in columns.items()}
        return Chunk(chunk.path, chunk.first_row, columns)


def _is_context(column: str) -> bool:
    return column.startswith(CONTEXT_PREFIX)


def _check_has(file: Path, present: list[str], column: str, why: str) -> None:
    if column not in present:
        raise DataError(file, f"{why}; the file has no column", column=column)
