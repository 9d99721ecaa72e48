"""`ctr simulate` -> `ctr train` -> `ctr evaluate` through the real console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CTR = Path(sys.executable).parent / "ctr"  # the console script installed beside this Python


def ctr(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the test machine is shared
    result = subprocess.run(
        [str(CTR), *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ctr {args[0]} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.mark.slow
def test_simulate_train_evaluate(tmp_path: Path) -> None:
    world, run = tmp_path / "world", tmp_path / "run"
    ctr("simulate", "--out", world, "--users", 120, "--items", 100, "--seed", 3)
    train_file, test_file = world / "behavior/train.parquet", world / "behavior/test.parquet"

    trained = ctr(
        "train",
        "--model",
        "din",
        "--train",
        train_file,
        "--valid",
        test_file,
        "--out",
        run,
        "--epochs",
        2,
        "--max-len",
        10,
        "--batch-size",
        128,
        "--lr",
        0.005,
        "--device",
        "cpu",
    )
    assert "valid_auc=" in trained.stderr  # per-epoch lines go to stderr
    summary = json.loads(trained.stdout)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert summary["valid_auc"] == metrics["valid"]["auc"]

    evaluated = ctr("evaluate", "--run", run, "--data", test_file, "--device", "cpu")
    lines = evaluated.stdout.splitlines()
    assert len(lines) == 1  # exactly one JSON line; progress and logs stay on stderr
    result = json.loads(lines[0])
    assert set(result) == {"model", "auc", "logloss", "n"}
    assert result["model"] == "din"
    assert result["auc"] > 0.5
    # The same file was the validation file, so the selected epoch's numbers come back.
    assert result["auc"] == pytest.approx(metrics["valid"]["auc"], abs=1e-9)
    assert result["logloss"] == pytest.approx(metrics["valid"]["logloss"], abs=1e-9)
    assert result["n"] == metrics["valid"]["n"] > 0
    print("per-epoch valid AUC:", [e["valid_auc"] for e in metrics["epochs"]])


def test_help_lists_train_and_evaluate_and_bad_runs_fail_cleanly(tmp_path: Path) -> None:
    listing = ctr("--help").stdout
    assert "train" in listing and "evaluate" in listing
    data = tmp_path / "x.csv"
    data.write_text("user_id\n")
    failed = ctr("evaluate", "--run", tmp_path / "missing", "--data", data, check=False)
    assert failed.returncode == 2
    assert "model.safetensors is missing" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert failed.stdout == ""


def test_serve_refuses_a_bad_routing_file_in_one_line_before_starting(tmp_path: Path) -> None:
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        "experiments: [{name: a, variants: [{name: x, model: m, weight: 1}]},"
        " {name: b, variants: [{name: x, model: m, weight: 1}]}]"
    )
    failed = ctr("serve", "--repo", tmp_path, "--routing-file", routing, "--port", "1", check=False)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: the routing file is invalid (")
    assert "variant names must be unique" in failed.stderr and "Traceback" not in failed.stderr


def test_serve_refuses_a_routing_file_naming_a_model_the_repository_lacks(tmp_path: Path) -> None:
    routing = tmp_path / "routing.yaml"
    routing.write_text("experiments: [{name: a, variants: [{name: x, model: ghost, weight: 1}]}]")
    failed = ctr("serve", "--repo", tmp_path, "--routing-file", routing, "--port", "1", check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip() == (
        "error: the routing file names models the repository lacks"
        " (model: ghost is not in the repository)"
    )
