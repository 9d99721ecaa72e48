"""Event log -> behaviour samples (MODELS.md §1.4), checked on hand-built logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.data.events import build_behavior_samples
from models.data.schema import load_behavior, write_table


def _log(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """(user, item, ts) rows; every item's category is 'c_' + item."""
    users, items, ts = zip(*rows, strict=True)
    return pd.DataFrame(
        {"user_id": users, "item_id": items, "category_id": [f"c_{i}" for i in items], "ts": ts}
    )


def _all_train(events: pd.DataFrame, **kwargs: int) -> pd.DataFrame:
    train, test = build_behavior_samples(events, split="time", test_fraction=0.0, **kwargs)
    assert len(test) == 0
    return train


def _positives(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["label"] == 1].reset_index(drop=True)


def _wide_log(n_users: int, per_user: int, seed: int) -> pd.DataFrame:
    """Each event has its own ts in 0..n_users*per_user-1 and item 'i<ts>' (ts is readable)."""
    rng = np.random.default_rng(seed)
    ts = rng.permutation(n_users * per_user)
    users = np.repeat([f"u{k:03d}" for k in range(n_users)], per_user)
    return _log([(u, f"i{t}", int(t)) for u, t in zip(users, ts, strict=True)])


def test_positives_and_histories_follow_time_order() -> None:
    events = _log(
        [
            ("A", "a3", 30),
            ("B", "b1", 1),
            ("A", "a1", 10),
            ("A", "a6", 60),
            ("B", "b2", 2),
            ("A", "a5", 50),
            ("A", "a2", 20),
            ("B", "b3", 3),
            ("A", "a4", 40),
            ("B", "b4", 4),
        ]
    )
    pos = _positives(_all_train(events, min_hist=4))
    # B has exactly 4 events: none has 4 earlier ones. A: a5 and a6 do.
    assert pos["user_id"].tolist() == ["A", "A"]
    assert pos["item_id"].tolist() == ["a5", "a6"]
    assert pos["category_id"].tolist() == ["c_a5", "c_a6"]
    assert pos["hist_item_ids"].tolist() == [
        ["a1", "a2", "a3", "a4"],
        ["a1", "a2", "a3", "a4", "a5"],
    ]
    assert pos["hist_category_ids"].iloc[0] == ["c_a1", "c_a2", "c_a3", "c_a4"]
    short = _positives(_all_train(events, min_hist=4, history_len=3))
    assert short["hist_item_ids"].tolist() == [["a2", "a3", "a4"], ["a3", "a4", "a5"]]
    assert len(_positives(_all_train(events, min_hist=3))) == 3 + 1  # a4, a5, a6 and b4


def test_ties_keep_log_order() -> None:
    events = _log(
        [
            ("C", "c1", 1),
            ("D", "d1", 5),
            ("C", "c2", 5),
            ("C", "c3", 5),
            ("D", "d2", 6),
            ("C", "c4", 5),
            ("C", "c5", 9),
        ]
    )
    pos = _positives(_all_train(events, min_hist=3))
    assert pos["item_id"].tolist() == ["c4", "c5"]
    assert pos["hist_item_ids"].tolist() == [["c1", "c2", "c3"], ["c1", "c2", "c3", "c4"]]


def test_each_positive_is_followed_by_its_negative() -> None:
    events = _wide_log(30, 9, seed=1)
    train, test = build_behavior_samples(events, min_hist=4, seed=3)
    touched = events.groupby("user_id")["item_id"].agg(set).to_dict()
    catalogue = dict(zip(events["item_id"], events["category_id"], strict=True))
    for frame in (train, test):
        assert frame["label"].tolist() == [1, 0] * (len(frame) // 2)
        pos, neg = frame.iloc[0::2].reset_index(drop=True), frame.iloc[1::2].reset_index(drop=True)
        assert pos["user_id"].equals(neg["user_id"])
        assert pos["hist_item_ids"].tolist() == neg["hist_item_ids"].tolist()
        assert pos["hist_category_ids"].tolist() == neg["hist_category_ids"].tolist()
        for user, item, cat in zip(neg["user_id"], neg["item_id"], neg["category_id"], strict=True):
            assert item not in touched[user]
            assert catalogue[item] == cat
    assert len(train) + len(test) == 2 * 30 * (9 - 4)


def test_history_is_strictly_earlier_and_contiguous() -> None:
    events = _wide_log(20, 12, seed=2)
    train, test = build_behavior_samples(events, min_hist=4, history_len=5, seed=0)
    user_times = events.groupby("user_id")["ts"].agg(sorted).to_dict()
    for frame in (train, test):
        for row in _positives(frame).itertuples():
            target = int(row.item_id[1:])
            hist = [int(i[1:]) for i in row.hist_item_ids]
            earlier = [t for t in user_times[row.user_id] if t < target]
            assert len(earlier) >= 4
            assert hist == earlier[-5:]  # the (at most) 5 latest events before the target


def test_split_by_user_is_disjoint_with_the_requested_share() -> None:
    events = _wide_log(100, 6, seed=4)
    train, test = build_behavior_samples(events, split="user", test_fraction=0.2, seed=7)
    train_users, test_users = set(train["user_id"]), set(test["user_id"])
    assert not train_users & test_users
    assert len(test_users) == 20 and len(train_users | test_users) == 100
    other, _ = build_behavior_samples(events, split="user", test_fraction=0.2, seed=8)
    assert set(other["user_id"]) != train_users


def test_split_by_time_respects_the_cut() -> None:
    events = _wide_log(25, 8, seed=5)  # ts 0..199, so the cut at 20% is 199 - 0.2*199
    train, test = build_behavior_samples(events, split="time", test_fraction=0.2, seed=0)
    cut = 199 - 0.2 * 199
    train_ts = [int(i[1:]) for i in _positives(train)["item_id"]]
    test_ts = [int(i[1:]) for i in _positives(test)["item_id"]]
    assert test_ts and max(train_ts) <= cut < min(test_ts)
    assert len(train_ts) + len(test_ts) == 25 * (8 - 4)


def test_deterministic_by_seed() -> None:
    events = _wide_log(40, 7, seed=6)
    first = build_behavior_samples(events, seed=11)
    second = build_behavior_samples(events.sample(frac=1.0, random_state=0), seed=11)
    for a, b in zip(first, second, strict=True):
        pd.testing.assert_frame_equal(a, b)  # row order of the log does not matter either
    third = build_behavior_samples(events, seed=12)
    assert not first[0]["item_id"].equals(third[0]["item_id"])


def test_negatives_are_drawn_by_item_frequency() -> None:
    # Ten users with 20 own items each; user P clicks "pop" 180 times. For a user of the ten,
    # the allowed items are pop (weight 180) and the other 9*20 items (weight 1 each): P = 1/2.
    # A uniform draw would pick pop with probability 1/181.
    rows = [(f"u{k}", f"x{k}_{j}", j) for k in range(10) for j in range(20)]
    rows += [("P", "pop", j) for j in range(180)]
    train = _all_train(_log(rows), min_hist=4, seed=1)
    negatives = train[(train["label"] == 0) & (train["user_id"] != "P")]
    assert len(negatives) == 10 * 16
    assert 0.35 < float((negatives["item_id"] == "pop").mean()) < 0.65


def test_user_who_touched_every_item_is_dropped() -> None:
    rows = [("Z", i, t) for t, i in enumerate(["x", "y", "z", "x", "y"])]
    rows += [("W", "x", t) for t in range(200)]  # negatives must be y or z, weight 2 in 205
    train = _all_train(_log(rows), min_hist=4)
    assert set(train["user_id"]) == {"W"}
    negatives = train[train["label"] == 0]["item_id"]
    assert len(negatives) == 196 and set(negatives) <= {"y", "z"}


def test_output_is_a_valid_behaviour_file(tmp_path: Path) -> None:
    train, _ = build_behavior_samples(_wide_log(10, 6, seed=8), seed=0)
    for suffix in ("parquet", "csv"):
        write_table(train, tmp_path / f"train.{suffix}")
        pd.testing.assert_frame_equal(load_behavior(tmp_path / f"train.{suffix}"), train)


@pytest.mark.parametrize(
    "kwargs", [{"min_hist": 0}, {"history_len": 0}, {"split": "day"}, {"test_fraction": 1.5}]
)
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_behavior_samples(_wide_log(3, 6, seed=0), **kwargs)  # type: ignore[arg-type]
