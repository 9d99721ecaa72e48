"""Streaming data: files and directories read in validated chunks, vocabularies counted chunk by
chunk, encoded shards, and the epoch order that splits rows among ranks in bounded windows.

The data come from the simulator (a world written in parts: a directory per split) or, for
malformed files, from Parquet files written here."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.data.dataset import encode_behavior, fit_vocabularies
from models.data.encode import BehaviorArrays, Encoder
from models.data.schema import DataError, load_behavior, load_slates, write_table
from models.data.stream.order import EpochOrder, train_rows
from models.data.stream.shards import Shards, open_shards, write_shards
from models.data.stream.source import SampleSource
from models.data.vocab import VocabularyCounter
from models.simulate import simulate_world
from models.simulate.config import SimulationConfig
from runtime.features import OOV


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    config = SimulationConfig(n_users=40, n_items=30, n_categories=5, events_per_user=6, parts=3)
    simulate_world(config, root, progress=False)
    return root


def test_a_directory_streams_into_the_vocabularies_and_arrays_of_the_in_memory_path(
    world: Path,
) -> None:
    path = world / "behavior" / "train"
    assert len(list(path.glob("*.parquet"))) == 3
    frame = load_behavior(path)  # the in-memory path: every part file in one frame
    source = SampleSource.open(path)
    counter = VocabularyCounter(source.context_fields)
    chunks = list(source.chunks(rows=97))  # chunks that straddle nothing: one file at a time
    assert sum(len(c) for c in chunks) == len(frame) and len(chunks) > 3
    for chunk in chunks:
        counter.add(chunk.columns)
    vocabs = counter.vocabularies()
    in_memory = fit_vocabularies(frame, [])
    assert {k: v.tokens for k, v in vocabs.items()} == {k: v.tokens for k, v in in_memory.items()}
    encoder = Encoder(vocabs, history_len=5, context_fields=[])
    streamed = BehaviorArrays.concat([encoder.encode(c.columns) for c in chunks])
    whole = encode_behavior(frame, vocabs, 5, [])
    for name in ("user", "hist_items", "hist_cats", "items", "cats", "label", "conversion"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(whole, name))


def test_min_count_sends_rare_ids_to_oov(world: Path) -> None:
    source = SampleSource.open(world / "behavior" / "train")
    counter = VocabularyCounter([])
    for chunk in source.chunks():
        counter.add(chunk.columns)
    counts = counter.tallies["user"].counts()
    threshold = int(np.median(list(counts.values()))) + 1
    vocab = counter.vocabularies(min_count=threshold)["user"]
    kept = {user for user, n in counts.items() if n >= threshold}
    assert set(vocab.tokens) == kept and 0 < len(kept) < len(counts)
    rare = next(user for user, n in counts.items() if n < threshold)
    codes = Encoder({"user": vocab}, 1, []).codes("user", pa.array([rare, vocab.tokens[0]]))
    assert codes.tolist() == [OOV, OOV + 1]


def _columns(n: int, start: int = 0) -> dict[str, pa.Array]:
    return {
        "user_id": pa.array([f"u{i % 3}" for i in range(start, start + n)]),
        "item_id": pa.array([f"i{i}" for i in range(start, start + n)]),
        "category_id": pa.array(["c1"] * n),
        "hist_item_ids": pa.array([["i1", "i2"]] * n, pa.list_(pa.string())),
        "hist_category_ids": pa.array([["c1", "c1"]] * n, pa.list_(pa.string())),
        "label": pa.array([i % 2 for i in range(n)], pa.int64()),
        "context_device": pa.array(["ios"] * n),
    }


def _hive(tmp_path: Path, days: dict[str, dict[str, pa.Array]]) -> Path:
    root = tmp_path / "samples"
    for day, columns in days.items():
        (root / f"day={day}").mkdir(parents=True)
        pq.write_table(pa.table(columns), root / f"day={day}" / "part-0.parquet")
    (root / "_SUCCESS").write_text("")  # a marker that is not data
    return root


def test_a_bad_row_in_a_later_partition_is_named_by_file_row_and_column(tmp_path: Path) -> None:
    bad = _columns(10, start=10)
    bad["label"] = pa.array([0, 1, 0, 1, 0, 1, 0, 3, 0, 1], pa.int64())
    root = _hive(tmp_path, {"2024-01-01": _columns(10), "2024-01-02": bad})
    with pytest.raises(DataError) as streamed:
        for _ in SampleSource.open(root).chunks(rows=4):  # the bad row is in the file's 2nd chunk
            pass
    with pytest.raises(DataError) as whole:
        load_behavior(root / "day=2024-01-02" / "part-0.parquet")
    assert str(streamed.value) == str(whole.value)
    assert str(streamed.value).startswith(f"{root / 'day=2024-01-02' / 'part-0.parquet'}: row 8")
    assert (streamed.value.row, streamed.value.column) == (8, "label")


def test_every_file_needs_the_first_files_context_columns_and_a_source_needs_rows(
    tmp_path: Path,
) -> None:
    second = _columns(5)
    del second["context_device"]
    root = _hive(tmp_path, {"2024-01-01": _columns(5), "2024-01-02": second})
    with pytest.raises(DataError, match="has this context column and every file must") as err:
        SampleSource.open(root)
    assert err.value.file.endswith("day=2024-01-02/part-0.parquet")
    assert err.value.column == "context_device"
    empty = {name: arr.slice(0, 0) for name, arr in _columns(1).items()}
    nothing = _hive(tmp_path / "empty", {"2024-01-01": empty, "2024-01-02": empty})
    with pytest.raises(DataError, match="no rows"):
        load_behavior(nothing)  # empty part files are fine, a source without a row is not
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"holds no \.parquet, \.pq, \.csv files"):
        load_behavior(tmp_path / "nothing")


def test_a_duplicate_slate_in_another_part_file_names_that_file(tmp_path: Path) -> None:
    slate = {
        "user_id": ["u"],
        "session_id": ["s"],
        "slate_index": [0],
        "item_ids": [["a"]],
        "category_ids": [["c"]],
        "clicks": [[0]],
    }
    write_table(pd.DataFrame(slate), tmp_path / "slates" / "a.parquet")
    write_table(pd.DataFrame({**slate, "slate_index": [1]}), tmp_path / "slates" / "b.parquet")
    assert len(load_slates(tmp_path / "slates")) == 2
    write_table(pd.DataFrame(slate), tmp_path / "slates" / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: row 1, column 'slate_index'"):
        load_slates(tmp_path / "slates")


def _numbered(rows: int) -> list[BehaviorArrays]:
    """Encoded-looking rows whose `items` column is the row number, in parts of 37."""
    parts = []
    for start in range(0, rows, 37):
        n = min(37, rows - start)
        items = np.arange(start, start + n)
        parts.append(
            BehaviorArrays(
                user=items % 5,
                hist_items=np.stack([items, items + 1], axis=1),
                hist_cats=np.ones((n, 2), np.int64),
                items=items,
                cats=np.ones(n, np.int64),
                context=np.zeros((n, 0), np.int64),
                label=(items % 2).astype(np.float32),
            )
        )
    return parts


def test_shards_read_back_any_runs_of_rows_and_only_when_complete(tmp_path: Path) -> None:
    shards = write_shards(
        tmp_path / "s",
        _numbered(200),
        history_len=2,
        context_width=0,
        conversion=False,
        fingerprint={"data": 1},
    )
    assert shards.rows == 200
    rows = shards.read_runs([(150, 160), (3, 5)])
    assert rows.items.tolist() == [*range(150, 160), 3, 4]
    assert rows.hist_items[:, 1].tolist() == [*range(151, 161), 4, 5]
    assert rows.label.dtype == np.float32 and rows.conversion is None
    assert open_shards(tmp_path / "s", {"data": 1}) == shards
    assert open_shards(tmp_path / "s", {"data": 2}) is None  # made from other data
    (tmp_path / "s" / "manifest.json").unlink()  # what an interrupted write leaves
    assert open_shards(tmp_path / "s", {"data": 1}) is None


@pytest.fixture
def numbered(tmp_path: Path) -> tuple[Shards, int]:
    rows = 1000
    shards = write_shards(
        tmp_path / "s", _numbered(rows), history_len=2, context_width=0, conversion=False,
        fingerprint={},
    )  # fmt: skip
    return shards, rows


def _epoch(shards: Shards, order: EpochOrder, epoch: int, skip: int = 0) -> list[list[int]]:
    return [b.items.tolist() for b in train_rows(shards, order, epoch, 32, skip)]


def _flat(batches: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(batches))


def test_ranks_split_each_epoch_evenly_in_an_order_fixed_by_seed_epoch_and_rank(
    numbered: tuple[Shards, int],
) -> None:
    shards, rows = numbered
    orders = [
        EpochOrder(rows, seed=7, world=3, rank=r, block_rows=16, window_rows=64) for r in range(3)
    ]
    parts = [_flat(_epoch(shards, order, epoch=1)) for order in orders]
    assert [len(p) for p in parts] == [333] * 3  # the same number of steps on every rank
    assert len(set(parts[0]) | set(parts[1]) | set(parts[2])) == 999  # disjoint, 1 row sits out
    assert _epoch(shards, orders[0], epoch=1) == _epoch(shards, orders[0], epoch=1)  # repeatable
    assert _flat(_epoch(shards, orders[0], epoch=2)) != parts[0]  # another epoch, another order
    alone = EpochOrder(rows, seed=7, block_rows=16, window_rows=64)
    everything = _flat(_epoch(shards, alone, epoch=1))
    assert sorted(everything) == list(range(rows)) and everything != list(range(rows))


def test_a_resumed_epoch_continues_with_the_batches_it_would_have_had(
    numbered: tuple[Shards, int],
) -> None:
    shards, rows = numbered
    order = EpochOrder(rows, seed=1, world=2, rank=1, block_rows=16, window_rows=100)
    full = _epoch(shards, order, epoch=3)
    assert _epoch(shards, order, epoch=3, skip=5) == full[5:]  # 5 · 32 = 160: mid-window


def test_memory_holds_one_window_of_rows(numbered: tuple[Shards, int]) -> None:
    shards, rows = numbered
    order = EpochOrder(rows, seed=0, world=2, rank=0, block_rows=16, window_rows=64)
    windows = list(order.windows(epoch=1))
    assert len(windows) == 8  # 500 rows of this rank in windows of 64
    assert all(sum(stop - start for start, stop in runs) <= 64 for runs, _ in windows)
    # The batches shuffle within a window and never across two: each run of 64 trained rows
    # is exactly the rows of one window, in an order that is not the order read.
    trained = _flat(_epoch(shards, order, epoch=1))
    for k, (runs, _) in enumerate(windows):
        read = [row for start, stop in runs for row in range(start, stop)]
        assert sorted(trained[64 * k : 64 * (k + 1)]) == sorted(read)
        assert trained[64 * k : 64 * (k + 1)] != read or len(read) < 2
