"""The simulated user population a load test draws from (torch-free: numpy and pandas only).

Built from a world's raw event log (`ctr simulate` writes `DIR/events.parquet`), the same
world the served model was trained on, so the ids it sends are in the model's vocabularies and
the histories it seeds into Redis are the users' real click streams.

* Users are drawn with Zipf-like popularity, P(rank r) ∝ 1 / r^s: a few heavy users carry
  much of the traffic, as in real ad/recommendation logs. Which user gets which rank is a
  seeded permutation, so popularity is independent of the user id order.
* Candidates are drawn uniformly from the catalogue of (item, category) pairs seen in the log
  (a retrieval stage hands a ranker a broad set, not only popular items).
* Histories are each user's last `history` events, oldest first (the order the API takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from runtime.features import DEFAULT_HISTORY_LEN

Pair = tuple[str, str]


def events_path(world: Path) -> Path:
    """A world directory (`ctr simulate --out`) or the events file itself."""
    world = Path(world)
    return world / "events.parquet" if world.is_dir() else world


def read_events(world: Path) -> pd.DataFrame:
    """The raw event log, sorted by user and time (DESIGN.md "Raw event log")."""
    path = events_path(world)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)
    missing = {"user_id", "item_id", "category_id", "ts"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: not an event log, missing columns {sorted(missing)}")
    for column in ("user_id", "item_id", "category_id"):
        frame[column] = frame[column].astype(str)
    frame["ts"] = pd.to_numeric(frame["ts"])
    return frame.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)


def last_events(frame: pd.DataFrame, per_user: int) -> pd.DataFrame:
    """Each user's last `per_user` events of a sorted log (0 keeps none)."""
    if per_user <= 0:
        return frame.iloc[:0]
    return frame.groupby("user_id", sort=False).tail(per_user)


@dataclass
class Population:
    users: list[str]
    weights: np.ndarray  # [U] float64, sums to 1: Zipf popularity of each user
    histories: dict[str, list[Pair]]  # user -> last events, oldest first
    catalogue: list[Pair]  # distinct (item, category) pairs

    @classmethod
    def from_events(
        cls,
        frame: pd.DataFrame,
        history: int = DEFAULT_HISTORY_LEN,
        zipf: float = 1.1,
        seed: int = 0,
    ) -> Population:
        kept = last_events(frame, history)
        histories: dict[str, list[Pair]] = {
            str(user): list(zip(group["item_id"], group["category_id"], strict=True))
            for user, group in kept.groupby("user_id", sort=False)
        }
        users = list(dict.fromkeys(frame["user_id"].tolist()))
        if not users:
            raise ValueError("the event log is empty")
        pairs = frame[["item_id", "category_id"]].drop_duplicates()
        catalogue = list(zip(pairs["item_id"], pairs["category_id"], strict=True))
        return cls(users, zipf_weights(len(users), zipf, seed), histories, catalogue)

    @classmethod
    def load(cls, world: Path, history: int = 50, zipf: float = 1.1, seed: int = 0) -> Population:
        return cls.from_events(read_events(world), history, zipf, seed)

    def sampler(self, seed: int) -> Sampler:
        return Sampler(self, np.random.default_rng(seed))


def zipf_weights(n: int, exponent: float, seed: int) -> np.ndarray:
    """[n] probabilities ∝ 1 / rank^exponent, ranks assigned by a seeded permutation."""
    ranks = np.random.default_rng(seed).permutation(n) + 1  # [n], user i has rank ranks[i]
    weights = 1.0 / np.power(ranks.astype(np.float64), exponent)
    return weights / weights.sum()


class Sampler:
    """Draws users and slates from a population; one per locust user (not shared: cheap)."""

    def __init__(self, population: Population, rng: np.random.Generator) -> None:
        self.population = population
        self.rng = rng
        self._cdf = np.cumsum(population.weights)

    def user(self) -> str:
        index = int(np.searchsorted(self._cdf, self.rng.random(), side="right"))
        return self.population.users[min(index, len(self.population.users) - 1)]

    def candidates(self, k: int) -> list[Pair]:
        catalogue = self.population.catalogue
        picks = self.rng.integers(0, len(catalogue), k)
        return [catalogue[i] for i in picks]

    def history(self, user: str, length: int) -> list[Pair]:
        """The user's last `length` events, oldest first (fewer if the user has fewer)."""
        events = self.population.histories.get(user, [])
        return events[-length:] if length > 0 else []


def parse_range(text: str) -> tuple[int, int]:
    """'100' -> (100, 100); '20-100' -> (20, 100). Slate sizes and history lengths."""
    low, _, high = str(text).partition("-")
    bounds = (int(low), int(high or low))
    if bounds[0] < 0 or bounds[0] > bounds[1]:
        raise ValueError(f"bad range {text!r}: expected N or LOW-HIGH with 0 <= LOW <= HIGH")
    return bounds
