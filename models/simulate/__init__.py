"""`ctr simulate`: a synthetic world with known ground truth.

Users hold a mixture of drifting latent interests, items have categories, styles and latent
vectors, and every click is drawn from a known probability: the behaviour truth is written
out in `models.simulate.behavior`, the slate truth in `models.simulate.slates`, the static
world in `models.simulate.world`, every knob in `SimulationConfig`. `simulate_world` writes

    out/behavior/{train,test}.parquet   behaviour samples with conversions (+ click_prob, ts,
                                        conversion_prob), split by user
    out/slates/{train,test}.parquet     slate sessions (+ click_probs), same user split
    out/events.parquet                  the raw click log of the behaviour stream
    out/oracle.json                     test metrics of the true probabilities + the config

(`parts` > 1: each split is a directory of part files, `models.simulate.parts`).

Determinism: one `numpy.random.SeedSequence(seed)` is split into independent streams for the
world, the behaviour stream, the slates and the conversions, so the same config gives
byte-identical files, changing a slate knob does not change the behaviour data, and changing a
conversion knob changes nothing but the conversions. The conversion stream is the fourth child:
`SeedSequence(seed).spawn(4)`'s first three children are those `spawn(3)` gave before
conversions existed, so every click is what it was. Everything is vectorised over
users (lockstep over steps), so a world of 1M events takes well under a minute on one core.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.simulate.behavior import simulate_behavior
from models.simulate.config import SimulationConfig
from models.simulate.oracle import behavior_oracle, slate_oracle
from models.simulate.parts import simulate_parts
from models.simulate.slates import simulate_slates
from models.simulate.world import build_world
from models.simulate.writer import Names, write_jobs

__all__ = ["SimulationConfig", "simulate_world"]


def simulate_world(config: SimulationConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Simulates the world of `config` into `out` and returns the oracle (also oracle.json).
    With `config.parts` > 1 the world is simulated and written in parts (`parts.py`)."""
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if config.parts > 1:
        oracle = simulate_parts(config, out, progress)
    else:
        oracle = _simulate_whole(config, out, progress)
    (out / "oracle.json").write_text(json.dumps(oracle, indent=2) + "\n")
    return oracle


def _simulate_whole(config: SimulationConfig, out: Path, progress: bool) -> dict[str, Any]:
    world_rng, behavior_rng, slate_rng, conversion_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(4)
    )
    world = build_world(config, world_rng)
    total = config.n_users * config.events_per_user
    with tqdm(total=total, desc="simulate", unit="event", disable=not progress) as bar:
        log = simulate_behavior(world, config, behavior_rng, conversion_rng, on_clicks=bar.update)
    slates = simulate_slates(world, config, log.interests, slate_rng)
    paths = {
        "behavior/train": out / "behavior" / "train.parquet",
        "behavior/test": out / "behavior" / "test.parquet",
        "slates/train": out / "slates" / "train.parquet",
        "slates/test": out / "slates" / "test.parquet",
        "events": out / "events.parquet",
    }
    jobs = write_jobs(paths, config, world, log, slates, Names(config))
    for job in tqdm(jobs, desc="write", unit="file", disable=not progress):
        job()
    return {
        "behavior": behavior_oracle(log, world.is_test),
        "slates": slate_oracle(slates, world.is_test, config),
        "config": asdict(config),
    }
