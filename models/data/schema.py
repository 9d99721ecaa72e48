"""Loaders and writers for the sample files of DESIGN.md ("Sample files"), Parquet or CSV.

Every loader validates the whole file with vectorised checks and raises `DataError` whose
message names the file, the 1-based data row, the column and what is wrong, e.g.
`train.csv: row 12, column 'label': 2 is not 0 or 1`. What a loader returns:

* string columns (ids, `context_<name>`, `type`) in pandas' default string dtype; ids are
  never empty, and CSV ids keep their text (`007` stays "007", it is read with dtype=str);
* list columns as Python lists (of str; of int for `clicks`), oldest / display order first;
  in CSV a list is one space-separated string, and "" or a missing value is the empty list;
  a null list in Parquet is the empty list too;
* integer columns as int64;
* only the columns the schema knows: its columns in schema order, then the `context_<name>`
  columns in file order. Other columns are dropped.

Decisions: integer id columns in Parquet are accepted and read as their decimal text, so they
equal the same ids read from CSV; float or boolean columns where integers are expected are
errors rather than silently rounded.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

Kind = Literal["id", "text", "int", "flag", "ids", "flags"]
_LIST_KINDS = ("ids", "flags")
_INT_TEXT = r"[+-]?\d+"


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
class Column:
    name: str
    kind: Kind
    required: bool = True


@dataclass(frozen=True)
class TableSchema:
    columns: tuple[Column, ...]
    prefix: str | None = None  # any number of extra optional text columns, `context_<name>`

    def kind_of(self, name: str) -> Kind | None:
        for col in self.columns:
            if col.name == name:
                return col.kind
        if self.prefix and name.startswith(self.prefix) and len(name) > len(self.prefix):
            return "text"
        return None


BEHAVIOR = TableSchema(
    (
        Column("user_id", "id"),
        Column("item_id", "id"),
        Column("category_id", "id"),
        Column("hist_item_ids", "ids"),
        Column("hist_category_ids", "ids"),
        Column("label", "flag"),
        Column("conversion", "flag", required=False),
    ),
    prefix="context_",
)
SLATES = TableSchema(
    (
        Column("user_id", "id"),
        Column("session_id", "id"),
        Column("slate_index", "int"),
        Column("item_ids", "ids"),
        Column("category_ids", "ids"),
        Column("clicks", "flags"),
    )
)
EVENTS = TableSchema(
    (
        Column("user_id", "id"),
        Column("item_id", "id"),
        Column("category_id", "id"),
        Column("ts", "int"),
        Column("event_id", "id", required=False),
        Column("type", "text", required=False),
    )
)


# ----------------------------------------------------------------------------- public API


def load_behavior(path: Path) -> pd.DataFrame:
    """Behaviour CTR samples: one row per (history, target, label), in file order."""
    path = Path(path)
    df = _load(path, BEHAVIOR)
    _check_same_lengths(path, df, "hist_item_ids", ["hist_category_ids"])
    if "conversion" in df.columns:
        bad = (df["conversion"].to_numpy() == 1) & (df["label"].to_numpy() == 0)
        if bad.any():
            raise DataError(
                path,
                "1 on a row whose label is 0 (a conversion needs a click)",
                row=_first(bad),
                column="conversion",
            )
    return df


def load_slates(path: Path) -> pd.DataFrame:
    """Slate sessions, sorted by (user_id, session_id, slate_index)."""
    path = Path(path)
    df = _load(path, SLATES)
    lengths = _check_same_lengths(path, df, "item_ids", ["category_ids", "clicks"])
    if (lengths == 0).any():
        raise DataError(path, "empty slate", row=_first(lengths == 0), column="item_ids")
    keys = ["user_id", "session_id", "slate_index"]
    dup = df.duplicated(keys).to_numpy()
    if dup.any():
        raise DataError(
            path,
            "this (user_id, session_id, slate_index) is in an earlier row",
            row=_first(dup),
            column="slate_index",
        )
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def load_events(path: Path) -> pd.DataFrame:
    """Raw event log: user_id, item_id, category_id, ts (unix seconds)[, event_id, type]."""
    return _load(Path(path), EVENTS)


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Writes Parquet (list<string> / list<int64> columns) or CSV (lists space-joined).

    Parent directories are created. A list element that is empty or contains whitespace cannot
    survive the CSV encoding, so it raises DataError instead of writing a file that reads back
    differently.
    """
    path = Path(path)
    fmt = _format_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(_to_arrow(df), path)
    else:
        _to_csv_frame(df, path).to_csv(path, index=False)


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Where:
    """The file and column being checked; builds the error for a 0-based row."""

    path: Path
    column: str

    def fail(self, problem: str, row: int | None = None) -> DataError:
        return DataError(
            self.path, problem, row=None if row is None else row + 1, column=self.column
        )

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


def _load(path: Path, schema: TableSchema) -> pd.DataFrame:
    columns, from_text = _read(path)
    names = _column_order(path, schema, list(columns))
    if len(columns[names[0]]) == 0:
        raise DataError(path, "no rows")
    data: dict[str, object] = {}
    for name in names:
        kind = schema.kind_of(name)
        assert kind is not None
        where, arr = _Where(path, name), columns[name]
        if kind in _LIST_KINDS:
            data[name] = _lists(where, kind, arr, from_text)
        else:
            data[name] = _scalars(where, kind, arr, from_text)
    return pd.DataFrame(data)


def _read(path: Path) -> tuple[dict[str, pa.Array], bool]:
    """Column name -> Arrow array, and whether the values are CSV text to be parsed."""
    fmt = _format_of(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a directory, not a file")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (no header, no rows)")
    if fmt == "parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(path, f"cannot read as Parquet ({exc})") from exc
        return {n: _one_chunk(table.column(n)) for n in table.column_names}, False
    frame = _read_csv_text(path)
    # Large CSVs come back from pandas in several Arrow chunks; checks expect one array.
    return {str(n): _one_chunk(pa.array(frame[n])) for n in frame}, True


def _read_csv_text(path: Path) -> pd.DataFrame:
    try:
        with warnings.catch_warnings():
            # A first data row longer than the header would otherwise silently lose fields.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.ParserWarning) as exc:
        line = re.search(r"line (\d+)", str(exc))
        row = int(line.group(1)) - 1 if line else None  # line 1 is the header
        raise DataError(path, f"malformed CSV ({str(exc).strip()})", row=row) from exc
    except (pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DataError(path, f"cannot read as CSV ({exc})") from exc


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise DataError(path, f"unsupported file type {suffix!r} (use .parquet or .csv)")


def _column_order(path: Path, schema: TableSchema, present: list[str]) -> list[str]:
    names = []
    for col in schema.columns:
        if col.name in present:
            names.append(col.name)
        elif col.required:
            raise DataError(
                path, f"required column is missing (found: {', '.join(present)})", column=col.name
            )
    return names + [c for c in present if schema.kind_of(c) and c not in names]


def _scalars(where: _Where, kind: Kind, arr: pa.Array, from_text: bool) -> pd.Series:
    where.reject(_np(arr.is_null()), "missing value")
    if kind in ("id", "text"):
        if kind == "id" and pa.types.is_integer(arr.type):
            arr = arr.cast(pa.string())
        where.expect(_is_string(arr.type), "strings", arr)
        if kind == "id":
            where.reject(_np(pc.equal(arr, "")), "empty id")
        return pd.Series(arr.to_numpy(zero_copy_only=False), dtype=str)
    if from_text:
        ok = _np(pc.match_substring_regex(arr, r"^-?[0-9]{1,18}$"))
        where.reject(~ok, lambda r: f"{arr[r].as_py()!r} is not an integer")
        arr = arr.cast(pa.int64())
    where.expect(pa.types.is_integer(arr.type), "integers", arr)
    values = arr.to_numpy().astype(np.int64)
    if kind == "flag":
        where.reject((values != 0) & (values != 1), lambda r: f"{values[r]} is not 0 or 1")
    return pd.Series(values)


def _lists(where: _Where, kind: Kind, arr: pa.Array, from_text: bool) -> list[list[Any]]:
    if from_text:
        flat, rows, lengths = _split_text(arr)
    else:
        where.expect(pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type), "lists", arr)
        lengths = _np(pc.list_value_length(arr).fill_null(0)).astype(np.int64)
        flat, rows = pc.list_flatten(arr), np.repeat(np.arange(len(arr)), lengths)
    nulls = _np(flat.is_null())
    if nulls.any():
        raise where.fail("missing value inside the list", int(rows[np.flatnonzero(nulls)[0]]))
    values = _list_ids(where, flat, rows) if kind == "ids" else _list_flags(where, flat, rows)
    ends = np.cumsum(lengths).tolist()
    starts = (np.cumsum(lengths) - lengths).tolist()
    return [values[a:b].tolist() for a, b in zip(starts, ends, strict=True)]


def _split_text(arr: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """CSV cells -> (flat tokens, row of each token, tokens per row); blanks make no token."""
    parts = pc.utf8_split_whitespace(arr)
    flat, rows = pc.list_flatten(parts), _np(pc.list_parent_indices(parts))
    keep = pc.greater(pc.utf8_length(flat), 0)
    flat, rows = flat.filter(keep), rows[_np(keep)]
    return flat, rows, np.bincount(rows, minlength=len(arr)).astype(np.int64)


def _list_ids(where: _Where, flat: pa.Array, rows: np.ndarray) -> np.ndarray:
    if pa.types.is_integer(flat.type):
        flat = flat.cast(pa.string())
    if not _is_string(flat.type):
        raise where.fail(f"expected lists of strings, found list<{flat.type}>", int(rows[0]))
    empty = _np(pc.equal(flat, ""))
    if empty.any():
        raise where.fail("empty id inside the list", int(rows[np.flatnonzero(empty)[0]]))
    # Dictionary-encode so that each distinct id is one Python string shared by every row.
    encoded = pc.dictionary_encode(flat)
    return encoded.dictionary.to_numpy(zero_copy_only=False)[encoded.indices.to_numpy()]


def _list_flags(where: _Where, flat: pa.Array, rows: np.ndarray) -> np.ndarray:
    if _is_string(flat.type):
        ok = _np(pc.is_in(flat, pa.array(["0", "1"])))
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise where.fail(f"{flat[bad].as_py()!r} inside the list is not 0 or 1", int(rows[bad]))
        flat = flat.cast(pa.int64())
    if not pa.types.is_integer(flat.type):
        raise where.fail(f"expected lists of integers, found list<{flat.type}>", int(rows[0]))
    values = flat.to_numpy().astype(np.int64)
    bad_mask = (values != 0) & (values != 1)
    if bad_mask.any():
        bad = int(np.flatnonzero(bad_mask)[0])
        raise where.fail(f"{values[bad]} inside the list is not 0 or 1", int(rows[bad]))
    return values


def _one_chunk(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _np(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _is_string(arrow_type: pa.DataType) -> bool:
    return bool(pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))


# ----------------------------------------------------------------------------- checks


def _first(mask: np.ndarray) -> int:
    """1-based row of the first True in `mask`."""
    return int(np.flatnonzero(mask)[0]) + 1


def _check_same_lengths(path: Path, df: pd.DataFrame, ref: str, others: list[str]) -> np.ndarray:
    lengths = _lengths(df[ref])
    for name in others:
        other = _lengths(df[name])
        bad = other != lengths
        if bad.any():
            r = _first(bad) - 1
            raise DataError(
                path, f"{other[r]} values but {ref!r} has {lengths[r]}", row=r + 1, column=name
            )
    return lengths


def _lengths(series: pd.Series) -> np.ndarray:
    return np.fromiter(map(len, series), dtype=np.int64, count=len(series))


# ----------------------------------------------------------------------------- writing


def _kind_anywhere(name: str) -> Kind | None:
    for schema in (BEHAVIOR, SLATES, EVENTS):
        kind = schema.kind_of(name)
        if kind is not None:
            return kind
    return None


_ARROW_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(),
    "text": pa.string(),
    "int": pa.int64(),
    "flag": pa.int64(),
    "ids": pa.list_(pa.string()),
    "flags": pa.list_(pa.int64()),
}


def _to_arrow(df: pd.DataFrame) -> pa.Table:
    arrays = []
    for name in df.columns:
        kind = _kind_anywhere(str(name))
        arrow_type = _ARROW_TYPES[kind] if kind else None
        if kind in _LIST_KINDS:
            arrays.append(pa.array(list(df[name]), type=arrow_type))
        else:
            arrays.append(pa.array(df[name].to_numpy(), type=arrow_type, from_pandas=True))
    return pa.Table.from_arrays(arrays, names=[str(c) for c in df.columns])


def _to_csv_frame(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    out = df.copy()
    for name in df.columns:
        kind = _kind_anywhere(str(name))
        if kind not in _LIST_KINDS:
            continue
        lists = pa.array(list(df[name]), type=_ARROW_TYPES[kind]).cast(pa.list_(pa.string()))
        flat = pc.list_flatten(lists)
        bad = _np(pc.or_(pc.equal(flat, ""), pc.match_substring_regex(flat, r"\s")))
        if bad.any():
            row = int(_np(pc.list_parent_indices(lists))[np.flatnonzero(bad)[0]])
            raise DataError(
                path,
                "an id inside the list is empty or contains whitespace, which CSV cannot hold",
                row=row + 1,
                column=str(name),
            )
        out[name] = pc.binary_join(lists, " ").to_numpy(zero_copy_only=False)
    return out
