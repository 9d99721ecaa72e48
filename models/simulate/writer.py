"""Arrow tables in the DESIGN.md schemas, built column-wise (no per-row Python) and written
as Parquet. Ids are strings: users "u12", items "i345", categories "c7", sessions "u12-s0",
events "e42".

Behaviour rows carry DESIGN.md's optional `conversion` column (0/1, 0 wherever label is 0).
Extra columns beyond the schema (the loaders in `models.data.schema` drop them): behaviour rows
carry `click_prob` (the true click probability p), `ts` (the impression time) and
`conversion_prob` (the true q = P(conversion | click); written on every row, on a non-clicked
row it is what q would have been had the user clicked, so p · q is the true P(click and
conversion) everywhere), slate rows carry `click_probs` (true probability per position).
The conversion columns come last, so every column written before they existed is unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.simulate.behavior import BehaviorLog
from models.simulate.config import SimulationConfig
from models.simulate.slates import SlateLog
from models.simulate.world import World

ROWS_PER_GROUP = 250_000  # behaviour rows per Parquet row group: bounds the writer's memory


class Names:
    """String id arrays for dense numbers, built once per world."""

    def __init__(self, config: SimulationConfig) -> None:
        self.user = _ids("u", config.n_users)
        self.item = _ids("i", config.n_items)
        self.category = _ids("c", config.n_categories)
        self.first_event = 0  # the number of the first event written (a part continues)

    def for_part(self, users: np.ndarray, first_event: int) -> Names:
        """The names of a part of the world whose user k is world user users[k] and whose
        events are numbered from `first_event` on (event ids stay unique over the parts)."""
        part = copy.copy(self)
        part.user, part.first_event = self.user.take(users), first_event
        return part


def _ids(prefix: str, n: int, start: int = 0) -> pa.Array:
    return pa.array([f"{prefix}{i}" for i in range(start, start + n)], type=pa.string())


def _lists(values: pa.Array, lengths: np.ndarray) -> pa.Array:
    """list<...> array of consecutive runs of `values` with the given lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), values).cast(pa.list_(values.type))


def write_behavior(
    log: BehaviorLog,
    world: World,
    names: Names,
    rows: np.ndarray,
    config: SimulationConfig,
    path: Path,
) -> None:
    """Writes the samples `rows` (indices into the log, user-major) to one Parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    for start in range(0, max(len(rows), 1), ROWS_PER_GROUP):
        table = _behavior_table(log, world, names, rows[start : start + ROWS_PER_GROUP], config)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def _behavior_table(
    log: BehaviorLog, world: World, names: Names, rows: np.ndarray, config: SimulationConfig
) -> pa.Table:
    user, item, n = log.user[rows], log.item[rows], log.n_hist[rows]
    length = np.minimum(n, config.history_len)  # the last min(n, L) clicks, oldest first
    starts = np.repeat(n - length, length)
    within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    hist = log.clicks[np.repeat(user, length), starts + within]  # [sum(length)]
    return pa.table(
        {
            "user_id": names.user.take(user),
            "item_id": names.item.take(item),
            "category_id": names.category.take(world.item_cat[item]),
            "hist_item_ids": _lists(names.item.take(hist), length),
            "hist_category_ids": _lists(names.category.take(world.item_cat[hist]), length),
            "label": pa.array(log.label[rows], type=pa.int64()),
            "click_prob": pa.array(log.prob[rows], type=pa.float64()),
            "ts": pa.array(log.ts[rows], type=pa.int64()),
            "conversion": pa.array(log.conversion[rows], type=pa.int64()),
            "conversion_prob": pa.array(log.conversion_prob[rows], type=pa.float64()),
        }
    )


def write_events(log: BehaviorLog, world: World, names: Names, path: Path) -> None:
    """Every click of the behaviour stream, user by user, in time order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.arange(log.clicks.shape[1])[None, :] < log.n_clicks[:, None]  # [U, E]
    user = np.nonzero(mask)[0]
    item = log.clicks[mask]
    table = pa.table(
        {
            "user_id": names.user.take(user),
            "item_id": names.item.take(item),
            "category_id": names.category.take(world.item_cat[item]),
            "ts": pa.array(log.click_ts[mask], type=pa.int64()),
            "event_id": _ids("e", len(item), names.first_event),
            "type": pa.array(["click"], type=pa.string()).take(np.zeros(len(item), dtype=np.int64)),
        }
    )
    pq.write_table(table, path)


def write_slates(
    log: SlateLog,
    world: World,
    names: Names,
    sessions: np.ndarray,
    config: SimulationConfig,
    path: Path,
) -> None:
    """Writes the sessions `sessions` (indices into the log), one row per slate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s, k = config.slates_per_session, config.slate_size
    items = log.items[sessions].reshape(-1)  # [n_sessions * S * K], display order
    lengths = np.full(len(sessions) * s, k)
    session_names = [
        f"u{q // config.sessions_per_user}-s{q % config.sessions_per_user}" for q in sessions
    ]
    table = pa.table(
        {
            "user_id": names.user.take(np.repeat(sessions // config.sessions_per_user, s)),
            "session_id": pa.array(session_names, type=pa.string()).take(
                np.repeat(np.arange(len(sessions)), s)
            ),
            "slate_index": pa.array(np.tile(np.arange(s), len(sessions)), type=pa.int64()),
            "item_ids": _lists(names.item.take(items), lengths),
            "category_ids": _lists(names.category.take(world.item_cat[items]), lengths),
            "clicks": _lists(pa.array(log.clicks[sessions].reshape(-1), type=pa.int64()), lengths),
            "click_probs": _lists(pa.array(log.probs[sessions].reshape(-1)), lengths),
        }
    )
    pq.write_table(table, path)


def write_jobs(
    paths: dict[str, Path],
    config: SimulationConfig,
    world: World,
    log: BehaviorLog,
    slates: SlateLog,
    names: Names,
) -> list[Callable[[], None]]:
    """One writer call per file of `paths` (keys: behavior/train, behavior/test,
    slates/train, slates/test, events)."""
    sample_test = world.is_test[log.user]
    session_test = np.repeat(world.is_test, config.sessions_per_user)
    return [
        lambda: write_behavior(
            log, world, names, np.flatnonzero(~sample_test), config, paths["behavior/train"]
        ),
        lambda: write_behavior(
            log, world, names, np.flatnonzero(sample_test), config, paths["behavior/test"]
        ),
        lambda: write_slates(
            slates, world, names, np.flatnonzero(~session_test), config, paths["slates/train"]
        ),
        lambda: write_slates(
            slates, world, names, np.flatnonzero(session_test), config, paths["slates/test"]
        ),
        lambda: write_events(log, world, names, paths["events"]),
    ]
