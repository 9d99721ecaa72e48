"""Encoded behaviour rows on disk: one binary file per column, written once, read by row ranges.

Why encode once: turning string ids into indices costs more than reading integers back (see
docs/training.md for the measured rates), and an epoch re-reads every row; an 8-GPU job would
wait on its input. Why one flat file per column: a row range is one contiguous read per
column, so a rank reads exactly its rows, a resumed run starts at any row, and the shuffle
(`models.data.stream.order`) can draw blocks from anywhere in the data set.

Why reads and not a memory map: the pages a process maps and touches count in its resident set
until the kernel evicts them, so an epoch over a memory-mapped file shows a resident set that
grows with the data set. A read copies the rows into the window's own buffer and leaves the
file's pages in the kernel's page cache, which is reclaimable and not the process's memory.

A directory holds `<column>.bin` files (ids int32 — every vocabulary is far below 2^31 —, labels
uint8) and `manifest.json`, written last and atomically: a directory without it is an
interrupted write and is written again.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.data.encode import BehaviorArrays

FORMAT = "slatectr-shards/1"
MANIFEST = "manifest.json"
_IDS = np.dtype(np.int32)
_FLAGS = np.dtype(np.uint8)


@dataclass(frozen=True)
class Shards:
    """An encoded split on disk (module docstring)."""

    directory: Path
    rows: int
    history_len: int
    context_width: int
    conversion: bool  # whether the split has a conversion column
    fingerprint: dict[str, Any]  # what it was encoded from (files, vocabularies, options)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row on disk (a window of w rows holds about twice w·row_bytes)."""
        return sum(dtype.itemsize * width for _, dtype, width in self._columns())

    def read(self, start: int, stop: int) -> BehaviorArrays:
        """Rows [start, stop)."""
        return self.read_runs([(start, stop)])

    def read_runs(self, runs: Sequence[tuple[int, int]]) -> BehaviorArrays:
        """The rows of every [start, stop) run, one run after the other."""
        total = sum(stop - start for start, stop in runs)
        data = {}
        for name, dtype, width in self._columns():
            out = np.empty((total, width), dtype=dtype)
            with (self.directory / f"{name}.bin").open("rb") as file:
                _read_runs(file, out, runs, width * dtype.itemsize)
            data[name] = out
        return _arrays(data, self.conversion)

    def column(self, name: str) -> np.ndarray:
        """One whole column (e.g. the labels, to check a validation split)."""
        dtype, width = next((d, w) for n, d, w in self._columns() if n == name)
        values = np.fromfile(self.directory / f"{name}.bin", dtype=dtype)
        return values.reshape(self.rows, width) if width > 1 else values

    def _columns(self) -> list[tuple[str, np.dtype[Any], int]]:
        return _layout(self.history_len, self.context_width, self.conversion)


def write_shards(
    directory: Path,
    parts: Iterable[BehaviorArrays],
    *,
    history_len: int,
    context_width: int,
    conversion: bool,
    fingerprint: dict[str, Any],
) -> Shards:
    """Appends every part to the column files, then writes the manifest (module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    layout = _layout(history_len, context_width, conversion)
    files = {name: (directory / f"{name}.bin").open("wb") for name, _, _ in layout}
    rows = 0
    try:
        for part in parts:
            for name, dtype, _ in layout:
                _column_of(part, name).astype(dtype, copy=False).tofile(files[name])
            rows += len(part)
    finally:
        for file in files.values():
            file.close()
    shards = Shards(directory, rows, history_len, context_width, conversion, fingerprint)
    manifest = {"format": FORMAT, **asdict(shards), "directory": None}
    temporary = directory / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, directory / MANIFEST)
    return shards


def open_shards(directory: Path, fingerprint: dict[str, Any]) -> Shards | None:
    """The complete shards in `directory` encoded from `fingerprint`; None otherwise."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("fingerprint") != fingerprint:
        return None
    fields = {k: v for k, v in manifest.items() if k not in ("format", "directory")}
    return Shards(directory=directory, **fields)


def _layout(history_len: int, context_width: int, conversion: bool) -> list[tuple[str, Any, int]]:
    """(column, dtype on disk, values per row) of a split."""
    layout = [
        ("user", _IDS, 1),
        ("hist_items", _IDS, history_len),
        ("hist_cats", _IDS, history_len),
        ("items", _IDS, 1),
        ("cats", _IDS, 1),
        ("context", _IDS, context_width),
        ("label", _FLAGS, 1),
    ]
    return layout + ([("conversion", _FLAGS, 1)] if conversion else [])


def _column_of(part: BehaviorArrays, name: str) -> np.ndarray:
    value = getattr(part, name)
    assert value is not None, f"a part without the {name} column"
    if value.dtype.kind in "iu" and value.size and value.max() > np.iinfo(_IDS).max:
        raise ValueError(f"{name}: an index does not fit int32")
    return np.ascontiguousarray(value)


def _read_runs(
    file: io.BufferedReader, out: np.ndarray, runs: Sequence[tuple[int, int]], size: int
) -> None:
    """Reads each run of rows of `size` bytes straight into the next rows of `out`."""
    view = out.reshape(-1).view(np.uint8).data  # [rows · size] bytes, a memoryview
    position = 0
    for start, stop in runs:
        nbytes = (stop - start) * size
        file.seek(start * size)
        if file.readinto(view[position : position + nbytes]) != nbytes:
            raise OSError(f"{file.name}: shorter than its manifest says (rows {start}-{stop})")
        position += nbytes


def _arrays(data: dict[str, np.ndarray], conversion: bool) -> BehaviorArrays:
    """Column buffers [n, width] -> BehaviorArrays (flat columns, float32 labels)."""
    return BehaviorArrays(
        user=data["user"][:, 0],
        hist_items=data["hist_items"],
        hist_cats=data["hist_cats"],
        items=data["items"][:, 0],
        cats=data["cats"][:, 0],
        context=data["context"],
        label=data["label"][:, 0].astype(np.float32),
        conversion=data["conversion"][:, 0].astype(np.float32) if conversion else None,
    )
