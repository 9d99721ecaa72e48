"""`ctr bench models` pieces (models/bench/quality.py): the popularity floor of a `--data`
directory and the seed summary of the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from models.bench.quality import format_table, popularity_floor, summarize
from models.data.schema import write_table
from slatectr.cli import app


def frame(rows: list[tuple[str, int]]) -> pd.DataFrame:
    """(target item, label) rows with a one-item history."""
    return pd.DataFrame(
        {
            "user_id": [f"u{k}" for k in range(len(rows))],
            "item_id": [item for item, _ in rows],
            "category_id": ["c"] * len(rows),
            "hist_item_ids": [["h"]] * len(rows),
            "hist_category_ids": [["c"]] * len(rows),
            "label": [label for _, label in rows],
        }
    )


def test_popularity_floor_ranks_by_the_items_training_click_rate(tmp_path: Path) -> None:
    # train: "hit" clicked 3 of 4 times, "miss" 1 of 4; p0 = 0.5
    train = [("hit", 1)] * 3 + [("hit", 0), ("miss", 1)] + [("miss", 0)] * 3
    write_table(frame(train), tmp_path / "train.parquet")
    write_table(frame([("hit", 1), ("miss", 0)]), tmp_path / "valid.parquet")
    # "new" was never a training target: it scores p0, between "miss" and "hit"
    test = [("hit", 1), ("new", 1), ("new", 0), ("miss", 0)]
    write_table(frame(test), tmp_path / "test.parquet")
    row = popularity_floor(*(tmp_path / f"{n}.parquet" for n in ("train", "valid", "test")))
    assert row["valid_auc"] == 1.0
    assert row["auc"] == pytest.approx(0.875)  # pairs: hit>new, hit>miss, new>miss, new=new
    assert "m=0.1" in row["model"]  # ties on validation go to the smallest smoothing


def test_the_table_gives_mean_and_sd_over_seeds_and_references_as_they_are() -> None:
    rows = [
        {
            "model": "DIN",
            "seed": 0,
            "auc": 0.90,
            "logloss": 0.4,
            "valid_auc": 0.9,
            "best_epoch": 2,
            "epochs_run": 4,
            "train_samples_per_s": 100.0,
            "train_seconds": 10.0,
        },
        {
            "model": "DIN",
            "seed": 1,
            "auc": 0.92,
            "logloss": 0.4,
            "valid_auc": 0.9,
            "best_epoch": 3,
            "epochs_run": 5,
            "train_samples_per_s": 300.0,
            "train_seconds": 30.0,
        },
        {"model": "floor", "auc": 0.85, "logloss": 0.5},
    ]
    din, floor = summarize(rows)
    assert din["seeds"] == 2 and din["auc"] == pytest.approx(0.91)
    assert din["auc_sd"] == pytest.approx(0.0141421, rel=1e-4)
    table = format_table(rows)
    assert "| DIN | 2 | 0.9100 ± 0.0141 |" in table
    assert "| floor | 1 | 0.8500 | 0.5000 |" in table
    assert "auc_sd" not in floor


def bench_on_data(tmp_path: Path) -> tuple[list[str], Path]:
    """`ctr bench models` on train/valid/test where items i0-i9 are clicked 80% of the time,
    i10-i19 20%: the command's start and its --out."""
    rng = np.random.default_rng(0)
    for name, n in (("train", 400), ("valid", 200), ("test", 200)):
        items = rng.integers(0, 20, n)
        rows = [(f"i{i}", int(rng.random() < (0.8 if i < 10 else 0.2))) for i in items]
        write_table(frame(rows), tmp_path / "data" / f"{name}.parquet")
    out = tmp_path / "out"
    return ["bench", "models", "--data", str(tmp_path / "data"), "--out", str(out)], out


def test_bench_models_on_a_data_directory_runs_every_seed_and_adds_the_floor(
    tmp_path: Path,
) -> None:
    command, out = bench_on_data(tmp_path)
    options = ["--only", "wdl", "--seeds", "0,1", "--epochs", "1", "--history-len", "4"]
    result = CliRunner().invoke(app, [*command, *options, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["model"], r.get("seed")) for r in logged[:2]] == [("Wide&Deep", 0), ("Wide&Deep", 1)]
    assert logged[2]["model"].startswith("popularity floor")
    assert (out / "runs" / "wdl-seed0").is_dir() and (out / "runs" / "wdl-seed1").is_dir()
    assert "| Wide&Deep | 2 |" in (out / "models.md").read_text()


def test_bench_models_trains_with_the_learning_rate_and_settings_it_is_given(
    tmp_path: Path,
) -> None:
    command, out = bench_on_data(tmp_path)
    options = ["--only", "wdl", "--epochs", "1", "--history-len", "4", "--device", "cpu"]
    settings = ["--lr", "0.005", "--set", "embed_dim=4", "--set", "weight_decay=0.001"]
    result = CliRunner().invoke(app, [*command, *options, *settings])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "runs" / "wdl-embed_dim-4-seed0" / "config.json").read_text())
    assert config["model_config"]["embed_dim"] == 4
    assert config["train_config"]["lr"] == 0.005
    assert config["train_config"]["weight_decay"] == 0.001
    first = json.loads((out / "rows.jsonl").read_text().splitlines()[0])
    assert first["model"] == "Wide&Deep (embed_dim=4, weight_decay=0.001)"

    wrong = CliRunner().invoke(app, [*command, *options, "--set", "user_token=false"])
    assert wrong.exit_code == 2  # a usage error that lists the fields, before any training
    assert "embed_dim" in wrong.output and not (out / "runs" / "wdl-seed0").exists()
