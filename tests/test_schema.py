"""Sample-file loaders and writer: round trips, CSV/Parquet parity, and one error per defect."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.data.schema import DataError, load_behavior, load_events, load_slates, write_table

HEADER = "user_id,item_id,category_id,hist_item_ids,hist_category_ids,label"


def _csv(tmp_path: Path, text: str, name: str = "train.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _parquet(tmp_path: Path, columns: dict[str, pa.Array], name: str = "train.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def _valid_parquet_columns() -> dict[str, pa.Array]:
    return {
        "user_id": pa.array(["u1", "u2"]),
        "item_id": pa.array(["i1", "i2"]),
        "category_id": pa.array(["c1", "c2"]),
        "hist_item_ids": pa.array([["i3"], []], pa.list_(pa.string())),
        "hist_category_ids": pa.array([["c3"], []], pa.list_(pa.string())),
        "label": pa.array([1, 0], pa.int64()),
    }


# ------------------------------------------------------------------------- round trips, parity


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_behavior_round_trip_is_exact(
    tmp_path: Path, tiny_behavior: pd.DataFrame, suffix: str
) -> None:
    path = tmp_path / "sub" / f"train.{suffix}"  # parent dirs are created
    write_table(tiny_behavior, path)
    loaded = load_behavior(path)
    pd.testing.assert_frame_equal(loaded, tiny_behavior)
    assert loaded["hist_item_ids"].iloc[2] == ["i4", "i5", "i6", "i7", "i8"]
    assert isinstance(loaded["hist_item_ids"].iloc[0], list)
    write_table(loaded, path)  # writing what was loaded gives the same file content back
    pd.testing.assert_frame_equal(load_behavior(path), loaded)


def test_parquet_and_csv_load_identically(tmp_path: Path, tiny_behavior: pd.DataFrame) -> None:
    write_table(tiny_behavior, tmp_path / "a.parquet")
    write_table(tiny_behavior, tmp_path / "a.csv")
    pd.testing.assert_frame_equal(
        load_behavior(tmp_path / "a.parquet"), load_behavior(tmp_path / "a.csv")
    )


def test_csv_ids_stay_text_and_lists_split_on_blanks(tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{HEADER},context_site\n007,123,NA,1  02 ,3 4,1,\n8,9,10,,,0,x\n")
    df = load_behavior(path)
    assert df["user_id"].tolist() == ["007", "8"]
    assert df["item_id"].tolist() == ["123", "9"]
    assert df["category_id"].tolist() == ["NA", "10"]  # "NA" is an id, not a missing value
    assert df["hist_item_ids"].tolist() == [["1", "02"], []]
    assert df["hist_category_ids"].tolist() == [["3", "4"], []]
    assert df["label"].dtype == "int64" and df["label"].tolist() == [1, 0]
    assert df["context_site"].tolist() == ["", "x"]


def test_parquet_integer_ids_read_as_text(tmp_path: Path) -> None:
    cols = _valid_parquet_columns()
    cols["item_id"] = pa.array([7, 8])
    cols["hist_item_ids"] = pa.array([[3], []], pa.list_(pa.int64()))
    df = load_behavior(_parquet(tmp_path, cols))
    assert df["item_id"].tolist() == ["7", "8"]
    assert df["hist_item_ids"].tolist() == [["3"], []]


def test_unknown_columns_are_dropped(tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{HEADER},weight\nu,i,c,,,1,0.5\n")
    assert "weight" not in load_behavior(path).columns


def test_slates_sorted_with_int_clicks_and_round_trip(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "user_id,session_id,slate_index,item_ids,category_ids,clicks\n"
        "u2,s1,0,a b,c c,0 1\n"
        "u1,s9,1,x,c,1\n"
        "u1,s9,0,y z w,c d c,0 0 0\n",
        "slates.csv",
    )
    df = load_slates(path)
    assert df[["user_id", "session_id", "slate_index"]].values.tolist() == [
        ["u1", "s9", 0],
        ["u1", "s9", 1],
        ["u2", "s1", 0],
    ]
    assert df["clicks"].tolist() == [[0, 0, 0], [1], [0, 1]]
    assert df["item_ids"].iloc[0] == ["y", "z", "w"]
    for suffix in ("parquet", "csv"):
        write_table(df, tmp_path / f"copy.{suffix}")
        pd.testing.assert_frame_equal(load_slates(tmp_path / f"copy.{suffix}"), df)


def test_events_round_trip_with_optional_columns(tmp_path: Path) -> None:
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "item_id": ["i1", "i2"],
            "category_id": ["c1", "c1"],
            "ts": [1700000000, 5],
            "event_id": ["e1", "e2"],
            "type": ["click", "click"],
        }
    )
    for suffix in ("parquet", "csv"):
        write_table(events, tmp_path / f"events.{suffix}")
        pd.testing.assert_frame_equal(load_events(tmp_path / f"events.{suffix}"), events)
    minimal = _csv(tmp_path, "user_id,item_id,category_id,ts\nu,i,c,12\n", "e.csv")
    assert list(load_events(minimal).columns) == ["user_id", "item_id", "category_id", "ts"]


# ------------------------------------------------------------------------- malformed CSV input

CSV_CASES = {
    "label not 0/1": (f"{HEADER}\nu,i,c,a,b,1\nu,i,c,a,b,2\n", 2, "label", "2 is not 0 or 1"),
    "label not an integer": (f"{HEADER}\nu,i,c,,,yes\n", 1, "label", "'yes' is not an integer"),
    "label float text": (f"{HEADER}\nu,i,c,,,1.0\n", 1, "label", "not an integer"),
    "empty id": (f"{HEADER}\nu,i,c,,,1\n,i,c,,,1\n", 2, "user_id", "empty id"),
    "hist lengths differ": (
        f"{HEADER}\nu,i,c,a b,x y,1\nu,i,c,a b,x,0\n",
        2,
        "hist_category_ids",
        "1 values",
    ),
    "conversion without click": (
        f"{HEADER},conversion\nu,i,c,,,1,1\nu,i,c,,,0,1\n",
        2,
        "conversion",
        "label is 0",
    ),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv_values_name_file_row_and_column(tmp_path: Path, case: str) -> None:
    text, row, column, problem = CSV_CASES[case]
    with pytest.raises(DataError) as err:
        load_behavior(_csv(tmp_path, text))
    message = str(err.value)
    assert message.startswith(str(tmp_path / "train.csv") + ": ")
    assert f"row {row}, column '{column}': " in message
    assert problem in message
    assert (err.value.row, err.value.column) == (row, column)


@pytest.mark.parametrize(
    ("text", "problem", "row"),
    [
        ("", "empty file", None),
        (f"{HEADER}\n", "no rows", None),
        (
            "user_id,item_id,category_id,hist_item_ids,hist_category_ids\nu,i,c,,\n",
            "column 'label': required column is missing",
            None,
        ),
        (f"{HEADER}\nu,i,c,,,1\nu,i,c,,,1,extra\n", "malformed CSV", 2),
        (f'{HEADER}\nu,i,c,,,1\nu,"i,c,,,1\n', "malformed CSV", None),
    ],
)
def test_bad_csv_structure(tmp_path: Path, text: str, problem: str, row: int | None) -> None:
    with pytest.raises(DataError, match=r"train\.csv") as err:
        load_behavior(_csv(tmp_path, text))
    assert problem in str(err.value)
    if row is not None:
        assert err.value.row == row


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.parquet: file not found"):
        load_behavior(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match=r"unsupported file type '\.json'"):
        load_behavior(_csv(tmp_path, "{}", "train.json"))


# ------------------------------------------------------------------------- malformed Parquet


def _with(column: str, array: pa.Array) -> dict[str, pa.Array]:
    cols = _valid_parquet_columns()
    cols[column] = array
    return cols


PARQUET_CASES = {
    "float label": (_with("label", pa.array([1.0, 0.0])), 1, "label", "expected integers"),
    "label 3": (_with("label", pa.array([0, 3])), 2, "label", "3 is not 0 or 1"),
    "history as a string": (
        _with("hist_item_ids", pa.array(["i3", ""])),
        1,
        "hist_item_ids",
        "expected lists",
    ),
    "null user": (_with("user_id", pa.array(["u1", None])), 2, "user_id", "missing value"),
    "null inside list": (
        _with("hist_category_ids", pa.array([["c3"], [None]], pa.list_(pa.string()))),
        2,
        "hist_category_ids",
        "missing value inside the list",
    ),
    "empty id inside list": (
        _with("hist_item_ids", pa.array([["i3"], [""]], pa.list_(pa.string()))),
        2,
        "hist_item_ids",
        "empty id",
    ),
    "lists of floats": (
        _with("hist_item_ids", pa.array([[1.5], []], pa.list_(pa.float64()))),
        1,
        "hist_item_ids",
        "expected lists of strings",
    ),
}


@pytest.mark.parametrize("case", list(PARQUET_CASES))
def test_bad_parquet_values_name_file_row_and_column(tmp_path: Path, case: str) -> None:
    cols, row, column, problem = PARQUET_CASES[case]
    with pytest.raises(DataError) as err:
        load_behavior(_parquet(tmp_path, cols))
    assert str(err.value).startswith(f"{tmp_path / 'train.parquet'}: row {row}, column '{column}'")
    assert problem in str(err.value)


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"train\.parquet: cannot read as Parquet"):
        load_behavior(path)


def test_parquet_with_no_rows(tmp_path: Path) -> None:
    empty = {name: arr.slice(0, 0) for name, arr in _valid_parquet_columns().items()}
    with pytest.raises(DataError, match=r"train\.parquet: no rows"):
        load_behavior(_parquet(tmp_path, empty))


# ------------------------------------------------------------------------- slates and events

SLATE_HEADER = "user_id,session_id,slate_index,item_ids,category_ids,clicks"


@pytest.mark.parametrize(
    ("body", "row", "column", "problem"),
    [
        ("u,s,0,a b,c c,0 2\n", 1, "clicks", "'2' inside the list is not 0 or 1"),
        ("u,s,0,a b,c c,1\n", 1, "clicks", "1 values but 'item_ids' has 2"),
        ("u,s,0,a,c,1\nu,s,1,a b,c,0 0\n", 2, "category_ids", "1 values"),
        ("u,s,0,a,c,0\nu,s,1,,,\n", 2, "item_ids", "empty slate"),
        ("u,s,0,a,c,0\nu,s,0,b,c,1\n", 2, "slate_index", "earlier row"),
        ("u,s,first,a,c,0\n", 1, "slate_index", "'first' is not an integer"),
    ],
)
def test_bad_slates(tmp_path: Path, body: str, row: int, column: str, problem: str) -> None:
    path = _csv(tmp_path, f"{SLATE_HEADER}\n{body}", "slates.csv")
    with pytest.raises(DataError) as err:
        load_slates(path)
    assert f"slates.csv: row {row}, column '{column}': " in str(err.value)
    assert problem in str(err.value)


def test_bad_events(tmp_path: Path) -> None:
    path = _csv(tmp_path, "user_id,item_id,category_id,ts\nu,i,c,10\nu,i,c,soon\n", "ev.csv")
    with pytest.raises(DataError, match=r"ev\.csv: row 2, column 'ts': 'soon' is not an integer"):
        load_events(path)
    cols = {
        "user_id": pa.array(["u"]),
        "item_id": pa.array(["i"]),
        "category_id": pa.array(["c"]),
        "ts": pa.array([1.5]),
    }
    with pytest.raises(DataError, match=r"ev\.parquet: row 1, column 'ts': expected integers"):
        load_events(_parquet(tmp_path, cols, "ev.parquet"))


def test_csv_writer_refuses_ids_it_cannot_encode(
    tmp_path: Path, tiny_behavior: pd.DataFrame
) -> None:
    bad = tiny_behavior.copy()
    bad.at[3, "hist_item_ids"] = ["i1 i2"]  # would read back as two ids
    with pytest.raises(DataError, match=r"out\.csv: row 4, column 'hist_item_ids'"):
        write_table(bad, tmp_path / "out.csv")
    write_table(bad, tmp_path / "out.parquet")  # Parquet holds it exactly
    assert load_behavior(tmp_path / "out.parquet")["hist_item_ids"].iloc[3] == ["i1 i2"]
