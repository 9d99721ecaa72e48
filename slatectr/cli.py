"""The `ctr` console script. Each command imports its implementation lazily: `ctr serve` must
not import torch, and `ctr --help` must stay fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="SlateCTR: simulate, train, evaluate, export and serve neural CTR models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """SlateCTR: simulate, train, evaluate, export and serve neural CTR models."""


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Directory the world is written to.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 5000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed; the world is deterministic.")] = 0,
) -> None:
    """Write a synthetic world with known ground truth (samples, slates, events, oracle)."""
    from models.simulate import SimulationConfig, simulate_world

    oracle = simulate_world(SimulationConfig(n_users=users, n_items=items, seed=seed), out)
    typer.echo(json.dumps(oracle))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
