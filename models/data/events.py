"""Raw event log -> behaviour CTR samples (train, test), the DIN/DIEN/SARN protocol.

MODELS.md §1.4. Per user, events are sorted by time (stable, so ties keep log order). Each event
with at least `min_hist` earlier events of that user is a positive sample whose history is the
previous (at most) `history_len` items and their categories, oldest first. Each positive gets one
negative: the same user, history and split, with the target replaced by an item the user never
interacted with anywhere in the log.

Decisions ([proposal] items of MODELS.md §1.4 and gaps it leaves):
* minimum history 4 and truncation to the last L items (the paper's choice, and
  `local_aggretor.py`'s filter); the split is 80/20 by user, by a seeded permutation of the
  sorted user ids of the users that have samples (no hashing, so it is reproducible anywhere).
* the negative target is drawn in proportion to how often an item occurs in the log, as in
  DIEN's preprocessing (a random line of `reviews-info`), then redrawn while the user has
  interacted with it. A uniform draw would make item popularity alone separate positives from
  negatives. Its category is the item's category in its latest event in the log.
* a user who has interacted with every item in the log can get no negative; that user's samples
  are dropped (the samples stay 1:1).
* split by time: the cut is `t_max - test_fraction * (t_max - t_min)` over the whole log; a
  sample whose target time is after the cut is a test sample (its history may be older).
* every row of the log is an interaction: filter event types before calling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from runtime.features import DEFAULT_HISTORY_LEN

_REQUIRED = ("user_id", "item_id", "category_id", "ts")
_MAX_ROUNDS = 64  # rejection rounds before the exact per-user fallback


@dataclass
class _Log:
    """The event log sorted by (user, time), ids factorised. n events, U users, I items."""

    user: np.ndarray  # [n] user code; codes follow the sorted user ids
    item: np.ndarray  # [n] item code
    ts: np.ndarray  # [n] int64
    user_ids: np.ndarray  # [U] str
    item_ids: np.ndarray  # [I] str
    item_cats: np.ndarray  # [I] str, category of the item's latest event
    cats: np.ndarray  # [n] str, the event's own category

    @property
    def first_of_user(self) -> np.ndarray:
        """[n] index of the first event of each event's user."""
        return np.searchsorted(self.user, self.user, side="left")


def build_behavior_samples(
    events: pd.DataFrame,
    *,
    history_len: int = DEFAULT_HISTORY_LEN,
    min_hist: int = 4,
    split: Literal["user", "time"] = "user",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """-> (train, test) frames in the behaviour schema, positive then negative row per target."""
    _check_arguments(events, history_len, min_hist, split, test_fraction)
    log = _sort_log(events)
    first = log.first_of_user
    targets = np.flatnonzero(np.arange(len(log.user)) - first >= min_hist)  # [m] event indices
    rng_negatives, rng_split = (np.random.default_rng([seed, k]) for k in (0, 1))
    negatives = _draw_negatives(log, log.user[targets], rng_negatives)
    ok = negatives >= 0
    targets, negatives = targets[ok], negatives[ok]
    if split == "user":
        is_test = _test_users(log.user[targets], test_fraction, rng_split)
    else:
        is_test = log.ts[targets] > _time_cut(log.ts, test_fraction)
    frame = _samples_frame(
        log, targets, negatives, np.maximum(first[targets], targets - history_len)
    )
    is_test_rows = np.repeat(is_test, 2)
    train = frame[~is_test_rows].reset_index(drop=True)
    return train, frame[is_test_rows].reset_index(drop=True)


def _check_arguments(
    events: pd.DataFrame, history_len: int, min_hist: int, split: str, test_fraction: float
) -> None:
    missing = [c for c in _REQUIRED if c not in events.columns]
    if missing:
        raise ValueError(f"event log lacks column(s) {missing}")
    if len(events) == 0:
        raise ValueError("event log has no rows")
    if history_len < 1 or min_hist < 1:
        raise ValueError(f"history_len and min_hist must be >= 1, got {history_len} and {min_hist}")
    if split not in ("user", "time"):
        raise ValueError(f"split must be 'user' or 'time', got {split!r}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")


def _sort_log(events: pd.DataFrame) -> _Log:
    user, user_ids = pd.factorize(events["user_id"].astype(str), sort=True)
    item, item_ids = pd.factorize(events["item_id"].astype(str), sort=True)
    ts = events["ts"].to_numpy(dtype=np.int64)
    order = np.lexsort((ts, user))  # lexsort is stable: ties keep log order
    user, item, ts = user[order], item[order], ts[order]
    cats = events["category_id"].astype(str).to_numpy(dtype=object)[order]
    by_time = np.argsort(ts, kind="stable")  # global (time, position) order
    rank = np.empty_like(by_time)
    rank[by_time] = np.arange(by_time.size)
    latest = np.zeros(len(item_ids), dtype=np.int64)
    np.maximum.at(latest, item, rank)  # rank of the latest event of every item
    return _Log(
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        ts=ts,
        user_ids=np.asarray(user_ids, dtype=object),
        item_ids=np.asarray(item_ids, dtype=object),
        item_cats=cats[by_time[latest]],
        cats=cats,
    )


def _draw_negatives(log: _Log, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[m] user codes -> [m] item codes the user never touched (-1 where none exists)."""
    n_items = len(log.item_ids)
    seen = np.unique(log.user * n_items + log.item)  # sorted (user, item) keys

    def touched(u: np.ndarray, i: np.ndarray) -> np.ndarray:
        keys = u * n_items + i
        pos = np.minimum(np.searchsorted(seen, keys), seen.size - 1)
        return np.asarray(seen[pos] == keys)

    # An event drawn uniformly from the log gives a frequency-weighted item.
    negatives = log.item[rng.integers(0, log.item.size, users.size)]
    redo = touched(users, negatives)
    for _ in range(_MAX_ROUNDS):
        if not redo.any():
            return negatives
        negatives[redo] = log.item[rng.integers(0, log.item.size, int(redo.sum()))]
        redo[redo] = touched(users[redo], negatives[redo])
    _exact_fallback(log, users, negatives, redo, rng)
    return negatives


def _exact_fallback(
    log: _Log, users: np.ndarray, negatives: np.ndarray, redo: np.ndarray, rng: np.random.Generator
) -> None:
    """For users who touched almost every popular item: draw from exactly the allowed items."""
    counts = np.bincount(log.item, minlength=len(log.item_ids)).astype(np.float64)
    for user in np.unique(users[redo]):
        rows = np.flatnonzero(redo & (users == user))
        weights = counts.copy()
        weights[log.item[log.user == user]] = 0.0
        if weights.sum() == 0:
            negatives[rows] = -1
        else:
            negatives[rows] = rng.choice(weights.size, size=rows.size, p=weights / weights.sum())


def _test_users(users: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """[m] user codes of the samples -> [m] is-test; a seeded share of the sorted users."""
    candidates = np.unique(users)  # codes are in sorted-id order
    n_test = round(test_fraction * candidates.size)
    return np.isin(users, candidates[rng.permutation(candidates.size)[:n_test]])


def _time_cut(ts: np.ndarray, test_fraction: float) -> float:
    t_min, t_max = float(ts.min()), float(ts.max())
    return t_max - test_fraction * (t_max - t_min)


def _samples_frame(
    log: _Log, targets: np.ndarray, negatives: np.ndarray, hist_start: np.ndarray
) -> pd.DataFrame:
    """Two rows per target (positive, then negative) in the behaviour schema."""
    items = log.item_ids[log.item].tolist()
    cats = log.cats.tolist()
    spans = list(zip(hist_start.tolist(), targets.tolist(), strict=True))
    # Both rows of a pair share the same history list objects: half the memory.
    hist_items = pd.Series([items[a:b] for a, b in spans], dtype=object).repeat(2)
    hist_cats = pd.Series([cats[a:b] for a, b in spans], dtype=object).repeat(2)
    return pd.DataFrame(
        {
            "user_id": pd.Series(np.repeat(log.user_ids[log.user[targets]], 2), dtype=str),
            "item_id": _pairs(log.item_ids[log.item[targets]], log.item_ids[negatives]),
            "category_id": _pairs(log.cats[targets], log.item_cats[negatives]),
            "hist_item_ids": hist_items.to_numpy(),
            "hist_category_ids": hist_cats.to_numpy(),
            "label": np.tile(np.array([1, 0], dtype=np.int64), targets.size),
        }
    )


def _pairs(positive: np.ndarray, negative: np.ndarray) -> pd.Series:
    """[m], [m] -> [2m] interleaved, positive first."""
    return pd.Series(np.stack([positive, negative], axis=1).ravel(), dtype=str)
