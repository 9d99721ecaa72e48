"""Model-quality benchmark: every behaviour model trained on one simulated world, beside the
world's oracle (`ctr bench models`).

Protocol, the same for every row: the world's training file is split by user into train (90%)
and validation (10%); validation picks the epoch (early stopping on its AUC); the test file is
touched once, by `evaluate_run` on the kept checkpoint. Selecting on test, as the SARN authors
did (MODELS.md §1.5), would flatter every model. Training throughput is the median over
epochs of samples/s inside the training loop (batch preparation included, validation not).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.data.schema import load_behavior, write_table
from models.training.evaluate import evaluate_run
from models.training.loop import TrainConfig
from models.training.run import train_run


@dataclass(frozen=True)
class Variant:
    label: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        extra = "-".join(f"{k}-{v}" for k, v in sorted(self.overrides.items()))
        return f"{self.model}-{extra}" if extra else self.model


VARIANTS: tuple[Variant, ...] = (
    Variant("SARN", "sarn"),
    Variant("SARN without positional loss", "sarn", {"positional_loss": False}),
    Variant("SARN without auxiliary loss", "sarn", {"auxiliary_loss": False}),
    Variant("SARN without both", "sarn", {"positional_loss": False, "auxiliary_loss": False}),
    Variant("FAT", "fat"),
    Variant("DIN", "din"),
    Variant("GRU", "gru"),
    Variant("Wide&Deep", "wdl"),
)


def split_validation(
    train_path: Path, out_dir: Path, fraction: float = 0.1, seed: int = 0
) -> tuple[Path, Path]:
    """Splits a behaviour file by user into (train, valid) files under out_dir.

    A rerun reuses the split only when it was cut from the same bytes with the same fraction
    and seed (recorded in out_dir/split.json); pointed at another world, it splits again
    instead of silently training on the old one.
    """
    train_out, valid_out = out_dir / "train.parquet", out_dir / "valid.parquet"
    record_path = out_dir / "split.json"
    frame = load_behavior(train_path)  # a missing or bad file is a DataError, before anything
    with train_path.open("rb") as source:
        digest = hashlib.file_digest(source, "sha256").hexdigest()
    record = {"source_sha256": digest, "fraction": fraction, "seed": seed}
    made = train_out.exists() and valid_out.exists() and record_path.exists()
    if made and json.loads(record_path.read_text()) == record:
        return train_out, valid_out
    record_path.unlink(missing_ok=True)  # an interrupted split must not look complete later
    users = np.sort(frame["user_id"].unique())
    rng = np.random.default_rng(seed)
    held_out = set(rng.permutation(users)[: max(1, int(len(users) * fraction))].tolist())
    is_valid = frame["user_id"].isin(held_out).to_numpy()
    write_table(frame[~is_valid].reset_index(drop=True), train_out)
    write_table(frame[is_valid].reset_index(drop=True), valid_out)
    record_path.write_text(json.dumps(record) + "\n")
    return train_out, valid_out


class RowLog:
    """OUT/rows.jsonl: a benchmark's finished rows, one JSON line each, written as they
    finish so that an interrupted run keeps them. Opened once the benchmark's inputs have
    been checked, it starts empty: the file holds this run's rows only."""

    def __init__(self, out: Path) -> None:
        self.path = out / "rows.jsonl"
        self.path.write_text("")

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        with self.path.open("a") as log:
            log.writelines(json.dumps(row) + "\n" for row in rows)


def run_variant(
    variant: Variant, train: Path, valid: Path, test: Path, out: Path, config: TrainConfig
) -> dict[str, Any]:
    """Trains one variant and scores it on test -> a table row."""
    run_dir = out / "runs" / variant.slug
    metrics = train_run(variant.model, train, valid, run_dir, config, dict(variant.overrides))
    tested = evaluate_run(run_dir, test, device=config.device)
    speeds = [epoch["train_samples_per_s"] for epoch in metrics["epochs"]]
    return {
        "model": variant.label,
        "auc": tested["auc"],
        "logloss": tested["logloss"],
        "valid_auc": metrics["valid"]["auc"],
        "best_epoch": metrics["best_epoch"],
        "epochs_run": len(metrics["epochs"]),
        "train_samples_per_s": statistics.median(speeds),
    }


def run_model_bench(
    world: Path,
    out: Path,
    config_for: Callable[[str], TrainConfig],
    variants: Sequence[Variant] = VARIANTS,
) -> list[dict[str, Any]]:
    """Every variant on `world` (written by `ctr simulate`), plus the oracle row.

    `config_for(model_name)` gives each model its training config (SARN's default learning
    rate differs). Rows also go to OUT/rows.jsonl as they finish (see `RowLog`)."""
    out.mkdir(parents=True, exist_ok=True)
    train, valid = split_validation(world / "behavior" / "train.parquet", out / "data")
    test = world / "behavior" / "test.parquet"
    log = RowLog(out)
    rows = []
    for variant in variants:
        row = run_variant(variant, train, valid, test, out, config_for(variant.model))
        rows.append(row)
        log.append([row])
    oracle = json.loads((world / "oracle.json").read_text())["behavior"]
    rows.append(
        {"model": "oracle (true probabilities)", "auc": oracle["auc"], "logloss": oracle["logloss"]}
    )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of test AUC, LogLoss and training throughput."""
    lines = [
        "| model | test AUC | test LogLoss | valid AUC | best / run epochs | train samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        epochs = f"{row['best_epoch']} / {row['epochs_run']}" if "best_epoch" in row else ""
        valid = f"{row['valid_auc']:.4f}" if "valid_auc" in row else ""
        speed = f"{row['train_samples_per_s']:,.0f}" if "train_samples_per_s" in row else ""
        lines.append(
            f"| {row['model']} | {row['auc']:.4f} | {row['logloss']:.4f} | {valid} "
            f"| {epochs} | {speed} |"
        )
    return "\n".join(lines)
