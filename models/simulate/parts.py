"""A large world simulated and written in parts, so that memory holds one part.

With `SimulationConfig.parts` = P > 1 the users are cut into P consecutive groups. The static
world (items, categories, every user's interests and biases, the test split, the conversion
biases) is drawn once, exactly as for a world in one part; then each group runs the behaviour
stream and the slate sessions with random streams of its own (children of the world's seed,
so the same config gives the same files) and is written at once. Users never interact in the
simulator, so a part is a small world of its own users with the same truth: the data have the
statistics of a one-part world, though not its exact draws (the streams differ).

Each split becomes a directory of part files, which `ctr train` and the loaders read as one
data set (`models.data.schema.sample_files`):

    out/behavior/{train,test}/part-00000.parquet, ...
    out/slates/{train,test}/part-00000.parquet, ...
    out/events/part-00000.parquet, ...
    out/oracle.json                     over every part

The oracle keeps the test samples' truth (four numbers a test sample) and every session's
clicks and true probabilities (as int8 / float32), which is far less than the parts.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.simulate.behavior import BehaviorLog, simulate_behavior
from models.simulate.config import SimulationConfig
from models.simulate.oracle import behavior_metrics, held_out_truth, slate_metrics_of
from models.simulate.slates import SlateLog, simulate_slates
from models.simulate.world import build_world, draw_conversion_bias
from models.simulate.writer import Names, write_jobs


def simulate_parts(config: SimulationConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Simulates and writes every part; -> the oracle over all of them."""
    world_seed, behavior_seed, slate_seed, conversion_seed = np.random.SeedSequence(
        config.seed
    ).spawn(4)
    world = build_world(config, np.random.default_rng(world_seed))
    cvr_bias = draw_conversion_bias(world, config, np.random.default_rng(conversion_seed))
    names = Names(config)
    streams = [seed.spawn(config.parts) for seed in (behavior_seed, slate_seed, conversion_seed)]
    oracle, events = _OracleParts(), 0
    total = config.n_users * config.events_per_user
    with tqdm(total=total, desc="simulate", unit="event", disable=not progress) as bar:
        for part, users in enumerate(np.array_split(np.arange(config.n_users), config.parts)):
            rngs = [np.random.default_rng(stream[part]) for stream in streams]
            part_world, part_config = world.for_users(users), replace(config, n_users=len(users))
            log = simulate_behavior(
                part_world, part_config, rngs[0], rngs[2], bar.update, cvr_bias.for_users(users)
            )
            slates = simulate_slates(part_world, part_config, log.interests, rngs[1])
            part_names = names.for_part(users, first_event=events)
            for job in write_jobs(
                _paths(out, part), part_config, part_world, log, slates, part_names
            ):
                job()
            events += int(log.n_clicks.sum())
            oracle.add(log, slates, part_world.is_test, part_config)
    return {**oracle.result(config), "config": asdict(config)}


def _paths(out: Path, part: int) -> dict[str, Path]:
    name = f"part-{part:05d}.parquet"
    return {
        "behavior/train": out / "behavior" / "train" / name,
        "behavior/test": out / "behavior" / "test" / name,
        "slates/train": out / "slates" / "train" / name,
        "slates/test": out / "slates" / "test" / name,
        "events": out / "events" / name,
    }


class _OracleParts:
    """What the oracle needs of each part, kept as the parts are simulated."""

    def __init__(self) -> None:
        self.truth: list[tuple[np.ndarray, ...]] = []  # (label, p, conversion, q) of test rows
        self.clicks: list[np.ndarray] = []  # [Q, S, K] int8 per part
        self.probs: list[np.ndarray] = []  # [Q, S, K] float32
        self.session_test: list[np.ndarray] = []  # [Q]

    def add(
        self, log: BehaviorLog, slates: SlateLog, is_test: np.ndarray, config: SimulationConfig
    ) -> None:
        self.truth.append(held_out_truth(log, is_test))
        self.clicks.append(slates.clicks.astype(np.int8))
        self.probs.append(slates.probs.astype(np.float32))
        self.session_test.append(np.repeat(is_test, config.sessions_per_user))

    def result(self, config: SimulationConfig) -> dict[str, Any]:
        truth = [np.concatenate(column) for column in zip(*self.truth, strict=True)]
        slates = [np.concatenate(x) for x in (self.clicks, self.probs, self.session_test)]
        return {
            "behavior": behavior_metrics(*truth),
            "slates": slate_metrics_of(slates[0], slates[1].astype(np.float64), slates[2], config),
        }
