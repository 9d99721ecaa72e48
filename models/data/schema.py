"""The sample files of DESIGN.md ("Sample files"), Parquet or CSV: which files a path names,
reading them in validated chunks, loading them whole as pandas frames, and writing them.

Every reader validates with vectorised checks (`models.data.columns`) and raises `DataError`
whose message names the file, the 1-based data row, the column and what is wrong, e.g.
`train.csv: row 12, column 'label': 2 is not 0 or 1`. What a loader returns:

* string columns (ids, `context_<name>`, `type`) in pandas' default string dtype; ids are
  never empty, and CSV ids keep their text (`007` stays "007", it is read with dtype=str);
* list columns as Python lists (of str; of int for `clicks`), oldest / display order first;
  in CSV a list is one space-separated string, and "" or a missing value is the empty list;
  a null list in Parquet is the empty list too;
* integer columns as int64;
* only the columns the schema knows: its columns in schema order, then the `context_<name>`
  columns in file order. Other columns are dropped (and, in Parquet, never read).

A path may name one file or a directory: every `.parquet`, `.pq` and `.csv` file below it, in
path order, is read (names starting with `.` or `_`, such as `_SUCCESS`, are skipped), so a
Hive-style partitioned directory (`day=2024-01-01/part-0.parquet`) is read file by file; the
partition values in folder names are not columns. An error names the file it is in; a file
with no rows is an error on its own, a directory only when none of its files has a row.

`read_chunks` is the streaming form (`models.data.stream` builds on it): Parquet is read one
record batch at a time, so memory holds one chunk, not the file; CSV, the small-data format,
is read whole and then handed out in chunks.

Decisions: integer id columns in Parquet are accepted and read as their decimal text, so they
equal the same ids read from CSV; float or boolean columns where integers are expected are
errors rather than silently rounded.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.data.columns import (
    LIST_KINDS,
    Kind,
    Where,
    list_lengths,
    np_of,
    one_chunk,
    validate_column,
)
from models.data.columns import DataError as DataError

SUFFIXES = (".parquet", ".pq", ".csv")


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


@dataclass(frozen=True)
class Chunk:
    """Validated columns (canonical Arrow types, `models.data.columns`) of consecutive rows of
    one file; `first_row` is the 0-based row of the file where the chunk starts."""

    path: Path
    first_row: int
    columns: dict[str, pa.Array]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


# A table's rules across columns of a chunk (e.g. equal list lengths); they raise DataError.
Rules = Callable[[Chunk], None]


# ----------------------------------------------------------------------------- public API


def load_behavior(path: Path) -> pd.DataFrame:
    """Behaviour CTR samples: one row per (history, target, label), in file order."""
    return _load(Path(path), BEHAVIOR, behavior_rules)


def load_slates(path: Path) -> pd.DataFrame:
    """Slate sessions, sorted by (user_id, session_id, slate_index)."""
    path = Path(path)
    files, lengths, df = _load_files(path, SLATES, _slate_rules)
    keys = ["user_id", "session_id", "slate_index"]
    dup = df.duplicated(keys).to_numpy()
    if dup.any():
        file, row = _place(files, lengths, int(np.flatnonzero(dup)[0]))
        problem = "this (user_id, session_id, slate_index) is in an earlier row"
        raise DataError(file, problem, row=row, column="slate_index")
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def load_events(path: Path) -> pd.DataFrame:
    """Raw event log: user_id, item_id, category_id, ts (unix seconds)[, event_id, type]."""
    return _load(Path(path), EVENTS, None)


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


def sample_files(path: Path) -> list[Path]:
    """The files a path names: itself, or every sample file below a directory, in path order."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_dir():
        _format_of(path)  # an unsupported suffix is an error before anything is read
        return [path]
    found = sorted(
        p
        for p in path.rglob("*")
        if p.suffix.lower() in SUFFIXES
        and p.is_file()
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not found:
        raise DataError(path, f"the directory holds no {', '.join(SUFFIXES)} files")
    return found


def columns_of(path: Path, schema: TableSchema) -> list[str]:
    """The columns read from one file: the schema's in schema order, then the prefixed ones in
    file order. Reads the Parquet footer or the CSV header only."""
    if _format_of(path) == "parquet":
        present = _parquet_file(path).schema_arrow.names
    else:
        present = [str(c) for c in _read_csv_text(path, rows=0).columns]
    return _column_order(path, schema, present)


def read_chunks(path: Path, schema: TableSchema, rows: int, rules: Rules | None) -> Iterator[Chunk]:
    """Validated chunks of at most `rows` rows of one file, in file order (module docstring)."""
    names = columns_of(path, schema)
    first = 0
    for raw, from_text in _raw_chunks(path, names, rows):
        chunk = _validate(path, schema, raw, from_text, first)
        if rules is not None:
            rules(chunk)
        yield chunk
        first += len(chunk)


def behavior_rules(chunk: Chunk) -> None:
    """Histories have one category per item; a conversion needs a click."""
    _check_same_lengths(chunk, "hist_item_ids", ["hist_category_ids"])
    if "conversion" in chunk.columns:
        conversion = chunk.columns["conversion"].to_numpy()
        bad = (conversion == 1) & (chunk.columns["label"].to_numpy() == 0)
        problem = "1 on a row whose label is 0 (a conversion needs a click)"
        Where(chunk.path, "conversion", chunk.first_row).reject(bad, problem)


def _slate_rules(chunk: Chunk) -> None:
    lengths = _check_same_lengths(chunk, "item_ids", ["category_ids", "clicks"])
    Where(chunk.path, "item_ids", chunk.first_row).reject(lengths == 0, "empty slate")


# ----------------------------------------------------------------------------- reading


def _load(path: Path, schema: TableSchema, rules: Rules | None) -> pd.DataFrame:
    return _load_files(path, schema, rules)[2]


def _load_files(
    path: Path, schema: TableSchema, rules: Rules | None
) -> tuple[list[Path], list[int], pd.DataFrame]:
    """(files, rows per file, every file's rows in one frame): each file read whole."""
    files = sample_files(path)
    frames = [_frame(chunk) for file in files for chunk in read_chunks(file, schema, 0, rules)]
    lengths = [len(frame) for frame in frames]
    if sum(lengths) == 0:
        raise DataError(path, "no rows")
    if len(frames) == 1:
        return files, lengths, frames[0]
    return files, lengths, pd.concat(frames, ignore_index=True)


def _place(files: list[Path], lengths: list[int], index: int) -> tuple[Path, int]:
    """(file, 1-based row) of row `index` of the frame that concatenates `files`."""
    ends = np.cumsum(lengths)
    which = int(np.searchsorted(ends, index, side="right"))
    return files[which], index - int(ends[which] - lengths[which]) + 1


def _raw_chunks(
    path: Path, names: list[str], rows: int
) -> Iterator[tuple[dict[str, pa.Array], bool]]:
    """(column -> Arrow array, whether the values are CSV text) per chunk; rows=0: one chunk."""
    if _format_of(path) == "parquet":
        parquet = _parquet_file(path)
        if rows == 0 or parquet.metadata.num_rows == 0:
            table = _guarded(path, lambda: parquet.read(columns=names))
            yield {n: one_chunk(table.column(n)) for n in names}, False
            return
        batches = parquet.iter_batches(batch_size=rows, columns=names)
        while (batch := _guarded(path, lambda: next(batches, None))) is not None:
            yield {n: batch.column(n) for n in names}, False
        return
    frame = _read_csv_text(path)
    # Large CSVs come back from pandas in several Arrow chunks; checks expect one array.
    columns = {n: one_chunk(pa.array(frame[n])) for n in names}
    step = rows or max(len(frame), 1)
    for start in range(0, max(len(frame), 1), step):
        yield {n: arr.slice(start, step) for n, arr in columns.items()}, True


def _guarded(path: Path, read: Callable[[], object]) -> Any:
    try:
        return read()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, f"cannot read as Parquet ({exc})") from exc


def _parquet_file(path: Path) -> pq.ParquetFile:
    _check_readable(path)
    result: pq.ParquetFile = _guarded(path, lambda: pq.ParquetFile(path))
    return result


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a directory, not a file")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (no header, no rows)")


def _read_csv_text(path: Path, rows: int | None = None) -> pd.DataFrame:
    _check_readable(path)
    try:
        with warnings.catch_warnings():
            # A first data row longer than the header would otherwise silently lose fields.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False, nrows=rows)
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


def _validate(
    path: Path, schema: TableSchema, raw: dict[str, pa.Array], from_text: bool, first_row: int
) -> Chunk:
    columns = {}
    for name, arr in raw.items():
        kind = schema.kind_of(name)
        assert kind is not None
        columns[name] = validate_column(Where(path, name, first_row), kind, arr, from_text)
    return Chunk(path, first_row, columns)


def _frame(chunk: Chunk) -> pd.DataFrame:
    """A validated chunk as the pandas frame the loaders return (module docstring)."""
    data: dict[str, object] = {}
    for name, arr in chunk.columns.items():
        if pa.types.is_large_list(arr.type):
            data[name] = _python_lists(arr)
        elif pa.types.is_string(arr.type):
            data[name] = pd.Series(arr.to_numpy(zero_copy_only=False), dtype=str)
        else:
            data[name] = pd.Series(arr.to_numpy())
    return pd.DataFrame(data)


def _python_lists(arr: pa.Array) -> list[list[object]]:
    flat = pc.list_flatten(arr)
    if pa.types.is_string(flat.type):
        # Dictionary-encode so that each distinct id is one Python string shared by every row.
        encoded = pc.dictionary_encode(flat)
        values = encoded.dictionary.to_numpy(zero_copy_only=False)[encoded.indices.to_numpy()]
    else:
        values = flat.to_numpy()
    ends = np.cumsum(list_lengths(arr))
    starts = ends - list_lengths(arr)
    return [values[a:b].tolist() for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


# ----------------------------------------------------------------------------- checks


def _check_same_lengths(chunk: Chunk, ref: str, others: list[str]) -> np.ndarray:
    lengths = list_lengths(chunk.columns[ref])
    for name in others:
        other = list_lengths(chunk.columns[name])
        bad = np.flatnonzero(other != lengths)
        if bad.size:
            problem = f"{other[bad[0]]} values but {ref!r} has {lengths[bad[0]]}"
            raise Where(chunk.path, name, chunk.first_row).fail(problem, int(bad[0]))
    return lengths


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
        if kind in LIST_KINDS:
            arrays.append(pa.array(list(df[name]), type=arrow_type))
        else:
            arrays.append(pa.array(df[name].to_numpy(), type=arrow_type, from_pandas=True))
    return pa.Table.from_arrays(arrays, names=[str(c) for c in df.columns])


def _to_csv_frame(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    out = df.copy()
    for name in df.columns:
        kind = _kind_anywhere(str(name))
        if kind not in LIST_KINDS:
            continue
        lists = pa.array(list(df[name]), type=_ARROW_TYPES[kind]).cast(pa.list_(pa.string()))
        flat = pc.list_flatten(lists)
        bad = np_of(pc.or_(pc.equal(flat, ""), pc.match_substring_regex(flat, r"\s")))
        if bad.any():
            row = int(np_of(pc.list_parent_indices(lists))[np.flatnonzero(bad)[0]])
            raise DataError(
                path,
                "an id inside the list is empty or contains whitespace, which CSV cannot hold",
                row=row + 1,
                column=str(name),
            )
        out[name] = pc.binary_join(lists, " ").to_numpy(zero_copy_only=False)
    return out
