"""One column of a sample file -> a validated Arrow array of its canonical type.

`models.data.schema` says which columns a file has; this module checks the values of one column
of a chunk of rows and returns them in one canonical Arrow type per kind, so that the pandas
loaders and the streaming readers (`models.data.stream`) share every check:

| kind | canonical type | what is checked |
|---|---|---|
| `id` | string | no missing value, no empty id (integer ids are read as their decimal text) |
| `text` | string | no missing value |
| `int`, `flag` | int64 | integers (CSV text parsed), flags 0 or 1 |
| `ids` | large_list<string> | lists (CSV: space-separated), no missing or empty id inside |
| `flags` | large_list<int64> | lists of 0 or 1 |

A chunk is any run of consecutive rows of one file: `Where.first_row` places it in its file, so
that an error names the 1-based row of the file, whatever chunk it was found in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Kind = Literal["id", "text", "int", "flag", "ids", "flags"]
LIST_KINDS = ("ids", "flags")


class DataError(ValueError):
    """Bad input data; the message says where (file, row, column) and what is wrong."""

    def __init__(
        self, file: str | Path, problem: str, *, row: int | None = None, column: str | None = None
    ) -> None:
        self.file, self.problem, self.row, self.column = str(file), problem, row, column
        where = [f"row {row}"] if row is not None else []
        where += [f"column {column!r}"] if column is not None else []
        prefix = f"{self.file}: " + (", ".join(where) + ": " if where else "")
        super().__init__(prefix + problem)


@dataclass(frozen=True)
class Where:
    """The file, column and first row of the chunk being checked; builds the error for a
    0-based row of the chunk."""

    path: Path
    column: str
    first_row: int = 0  # 0-based row in the file of the chunk's first row

    def fail(self, problem: str, row: int | None = None) -> DataError:
        file_row = None if row is None else self.first_row + row + 1
        return DataError(self.path, problem, row=file_row, column=self.column)

    def reject(self, bad: np.ndarray, problem: str | Callable[[int], str]) -> None:
        """Raises for the first True in `bad` (one entry per row)."""
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise self.fail(problem(row) if callable(problem) else problem, row)

    def expect(self, ok: bool, what: str, arr: pa.Array) -> None:
        if not ok:
            valid = arr.is_valid().to_numpy(zero_copy_only=False)
            row = int(np.flatnonzero(valid)[0]) if valid.any() else 0
            raise self.fail(f"expected {what}, found {arr.type}", row)


def validate_column(where: Where, kind: Kind, arr: pa.Array, from_text: bool) -> pa.Array:
    """The column's values in their canonical type (module docstring); DataError otherwise.
    `from_text`: the values are CSV cells to be parsed."""
    if kind in LIST_KINDS:
        return _lists(where, kind, arr, from_text)
    return _scalars(where, kind, arr, from_text)


def _scalars(where: Where, kind: Kind, arr: pa.Array, from_text: bool) -> pa.Array:
    where.reject(np_of(arr.is_null()), "missing value")
    if kind in ("id", "text"):
        if kind == "id" and pa.types.is_integer(arr.type):
            arr = arr.cast(pa.string())
        where.expect(is_string(arr.type), "strings", arr)
        if kind == "id":
            where.reject(np_of(pc.equal(arr, "")), "empty id")
        return arr.cast(pa.string())
    if from_text:
        ok = np_of(pc.match_substring_regex(arr, r"^-?[0-9]{1,18}$"))
        where.reject(~ok, lambda r: f"{arr[r].as_py()!r} is not an integer")
        arr = arr.cast(pa.int64())
    where.expect(pa.types.is_integer(arr.type), "integers", arr)
    arr = arr.cast(pa.int64())
    if kind == "flag":
        values = arr.to_numpy()
        where.reject((values != 0) & (values != 1), lambda r: f"{values[r]} is not 0 or 1")
    return arr


def _lists(where: Where, kind: Kind, arr: pa.Array, from_text: bool) -> pa.Array:
    if from_text:
        flat, rows, lengths = _split_text(arr)
    else:
        where.expect(pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type), "lists", arr)
        lengths = np_of(pc.list_value_length(arr).fill_null(0)).astype(np.int64)
        flat, rows = pc.list_flatten(arr), np.repeat(np.arange(len(arr)), lengths)
    nulls = np_of(flat.is_null())
    if nulls.any():
        raise where.fail("missing value inside the list", int(rows[np.flatnonzero(nulls)[0]]))
    values = _list_ids(where, flat, rows) if kind == "ids" else _list_flags(where, flat, rows)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # large lists: no 2^31 element limit
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)


def _split_text(arr: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """CSV cells -> (flat tokens, row of each token, tokens per row); blanks make no token."""
    parts = pc.utf8_split_whitespace(arr)
    flat, rows = pc.list_flatten(parts), np_of(pc.list_parent_indices(parts))
    keep = pc.greater(pc.utf8_length(flat), 0)
    flat, rows = flat.filter(keep), rows[np_of(keep)]
    return flat, rows, np.bincount(rows, minlength=len(arr)).astype(np.int64)


def _list_ids(where: Where, flat: pa.Array, rows: np.ndarray) -> pa.Array:
    if pa.types.is_integer(flat.type):
        flat = flat.cast(pa.string())
    if not is_string(flat.type):
        raise where.fail(f"expected lists of strings, found list<{flat.type}>", int(rows[0]))
    empty = np_of(pc.equal(flat, ""))
    if empty.any():
        raise where.fail("empty id inside the list", int(rows[np.flatnonzero(empty)[0]]))
    return flat.cast(pa.string())


def _list_flags(where: Where, flat: pa.Array, rows: np.ndarray) -> pa.Array:
    if is_string(flat.type):
        ok = np_of(pc.is_in(flat, pa.array(["0", "1"])))
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise where.fail(f"{flat[bad].as_py()!r} inside the list is not 0 or 1", int(rows[bad]))
        flat = flat.cast(pa.int64())
    if not pa.types.is_integer(flat.type):
        raise where.fail(f"expected lists of integers, found list<{flat.type}>", int(rows[0]))
    flat = flat.cast(pa.int64())
    values = flat.to_numpy()
    bad_mask = (values != 0) & (values != 1)
    if bad_mask.any():
        bad = int(np.flatnonzero(bad_mask)[0])
        raise where.fail(f"{values[bad]} inside the list is not 0 or 1", int(rows[bad]))
    return flat


def list_lengths(arr: pa.Array) -> np.ndarray:
    """Elements per row of a canonical list column, int64."""
    return np_of(pc.list_value_length(arr)).astype(np.int64)


def one_chunk(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def np_of(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def is_string(arrow_type: pa.DataType) -> bool:
    return bool(pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))
