"""Data-parallel training and resume with real processes: `ctr train --nproc 2` starts torchrun,
two gloo ranks train on a simulated world written in parts (a directory per split), and runs
stopped by SIGTERM or by a killed rank resume from their checkpoints.

Every run here is the same small run (2 ranks, 2 epochs, checkpoints at every poll, i.e.
every 16 steps), so an uninterrupted run is the reference the others must end at.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from models.simulate import simulate_world
from models.simulate.config import SimulationConfig
from models.training.checkpoint import WEIGHTS

CTR = Path(sys.executable).parent / "ctr"  # the console script installed beside this Python
TIMING = {"train_seconds", "train_samples_per_s"}  # wall-clock figures: not repeatable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    config = SimulationConfig(n_users=100, n_items=30, n_categories=6, events_per_user=12, parts=2)
    simulate_world(config, root, progress=False)
    return root / "behavior"  # train/ and test/: two part files each


def train_args(world: Path, run: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [
        "train",
        *("--model", "gru", "--train", str(world / "train"), "--valid", str(world / "test")),
        *("--out", str(run), "--epochs", "2", "--history-len", "8", "--batch-size", "16"),
        *("--lr", "0.02", "--device", "cpu", "--nproc", str(nproc), "--checkpoint-minutes", "0"),
        *("--set", "embed_dim=4", "--set", "context_dim=4", "--set", "mlp_hidden=8"),
        "--quiet",
        *extra,
    ]


def start(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the test machine is shared
    return subprocess.Popen(
        [str(CTR), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def ctr(args: list[str], expect: int = 0) -> subprocess.CompletedProcess[str]:
    process = start(args)
    out, err = process.communicate(timeout=300)
    assert process.returncode == expect, f"ctr {args[0]} exited {process.returncode}:\n{err}"
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def epochs(run: Path) -> list[dict[str, Any]]:
    metrics = json.loads((run / "metrics.json").read_text())
    return [{k: v for k, v in e.items() if k not in TIMING} for e in metrics["epochs"]]


def wait_for_checkpoint(
    run: Path, process: subprocess.Popen[str], after: tuple[int, int] = (0, 0)
) -> None:
    """Until the run commits a checkpoint later than `after` (epoch, step)."""
    deadline = time.monotonic() + 240
    while not (run / "resume" / "latest.json").exists() or checkpoint_position(run) <= after:
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.05)


def checkpoint_position(run: Path) -> tuple[int, int]:
    """(epoch, batches done in it) of the run's newest checkpoint."""
    loop = checkpoint_state(run)["loop"]
    return loop["epoch"], loop["step"]


def checkpoint_state(run: Path) -> dict[str, Any]:
    """The JSON half of the run's newest checkpoint."""
    name = json.loads((run / "resume" / "latest.json").read_text())["snapshot"]
    state: dict[str, Any] = json.loads((run / "resume" / name / "state.json").read_text())
    return state


@pytest.fixture(scope="module")
def reference(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-rank run."""
    run = tmp_path_factory.mktemp("reference")
    summary = json.loads(ctr(train_args(world, run)).stdout)  # one line: rank 0's
    assert summary["best_epoch"] in (1, 2)
    return run


def test_two_ranks_validate_on_every_validation_row_and_leave_a_clean_run(
    reference: Path, world: Path
) -> None:
    metrics = json.loads((reference / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["valid"]["auc"] > 0.56  # it learnt: chance is 0.5, one s.e. about 0.025
    # The ranks' predictions were gathered: the metrics are those of the whole validation set,
    # the numbers `ctr evaluate` computes on it in one process. Equal up to float rounding
    # only: the two score the rows in different batches, so a score can differ in its last
    # bits, and one near-tie pair that flips moves the AUC by 1/(positives·negatives), about
    # 1e-5 here (seen on one CPU model). Half the rows would be 0.01 away.
    evaluated = json.loads(
        ctr(["evaluate", "--run", str(reference), "--data", str(world / "test")]).stdout
    )
    assert evaluated["n"] == metrics["valid"]["n"]
    assert evaluated["auc"] == pytest.approx(metrics["valid"]["auc"], abs=1e-4)
    assert evaluated["logloss"] == pytest.approx(metrics["valid"]["logloss"], abs=1e-6)
    # A complete run keeps the model and drops its checkpoints and shards.
    assert not (reference / "resume").exists() and not (reference / "shards").exists()


def test_a_run_stopped_by_sigterm_then_by_a_killed_rank_ends_as_an_uninterrupted_one(
    reference: Path, world: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    process = start(train_args(world, run))
    wait_for_checkpoint(run, process)
    process.send_signal(signal.SIGTERM)  # to torchrun's launcher, as a scheduler would
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "--resume continues" in err
    stopped_at = checkpoint_position(run)
    assert stopped_at[0] == 1 and stopped_at[1] > 0  # mid-epoch, a checkpoint at that batch
    # One checkpoint, written by rank 0, holding both ranks' random streams and epoch sums.
    assert [len(checkpoint_state(run)["ranks"])] == [2]
    assert {r["sums"]["samples"] for r in checkpoint_state(run)["ranks"]} == {16 * stopped_at[1]}
    # Another run is never resumed: one process with another batch size is told what differs.
    refused = ctr(train_args(world, run, "--resume", "--batch-size", "64", nproc=1), expect=2)
    assert "batch_size: was 16, now 64" in refused.stderr
    assert "world: was 2, now 1" in refused.stderr

    process = start(train_args(world, run, "--resume"))
    wait_for_checkpoint(run, process, after=stopped_at)
    workers = _children(process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # no handler runs: the rank just dies
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGKILL, err

    ctr(train_args(world, run, "--resume"))  # from the last periodic checkpoint
    assert epochs(run) == epochs(reference)  # the same batches, weights and random draws
    # Repeatable for a seed and a world size: the very weights of the uninterrupted run.
    weights, expected = load_file(run / WEIGHTS), load_file(reference / WEIGHTS)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_resume_needs_a_checkpoint(reference: Path, world: Path) -> None:
    refused = ctr(train_args(world, reference, "--resume", nproc=1), expect=2)
    assert "holds no checkpoint to resume" in refused.stderr


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (torchrun's workers of the launcher), Linux /proc."""
    tasks = Path(f"/proc/{pid}/task")
    found = {int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()}
    return sorted(found)
