"""Model-quality benchmark: every behaviour model trained on one simulated world, beside the
world's oracle, or on a real data set's train / valid / test files beside its popularity
floor (`ctr bench models --world` / `--data`), for one or several training seeds.

Protocol, the same for every row: a world's training file is split by user into train (90%)
and validation (10%) (a `--data` directory comes split already); validation picks the epoch
(early stopping on its AUC); the test file is touched once, by `evaluate_run` on the kept
checkpoint. Selecting on test, as the SARN authors
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
from models.training.metrics import auc, logloss
from models.training.run import train_run


@dataclass(frozen=True)
class Variant:
    label: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, overrides: dict[str, Any], note: str) -> Variant:
        """This variant with more config overrides (`--set`), `note` shown in its label."""
        return Variant(f"{self.label} ({note})", self.model, {**self.overrides, **overrides})

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


@dataclass(frozen=True)
class BenchFiles:
    """What a benchmark trains, selects and tests on, and the reference rows shown beside the
    models (a simulated world's oracle; a real data set's popularity floor)."""

    train: Path
    valid: Path
    test: Path
    reference: tuple[dict[str, Any], ...] = ()


def world_files(world: Path, out: Path) -> BenchFiles:
    """A `ctr simulate` world: its training file split by user into train / valid (out/data),
    its test file, and its oracle."""
    train, valid = split_validation(world / "behavior" / "train.parquet", out / "data")
    oracle = json.loads((world / "oracle.json").read_text())["behavior"]
    row = {
        "model": "oracle (true probabilities)",
        "auc": oracle["auc"],
        "logloss": oracle["logloss"],
    }
    return BenchFiles(train, valid, world / "behavior" / "test.parquet", (row,))


def data_files(data: Path) -> BenchFiles:
    """A directory with train / valid / test.parquet already split by user (e.g. `ctr data
    movielens`), with the popularity floor as its reference."""
    paths = [data / f"{name}.parquet" for name in ("train", "valid", "test")]
    floor = popularity_floor(*paths)
    return BenchFiles(paths[0], paths[1], paths[2], reference=(floor,))


SMOOTHING_GRID = (0.1, 1.0, 3.0, 10.0, 30.0, 100.0)


def popularity_floor(train: Path, valid: Path, test: Path) -> dict[str, Any]:
    """The target item's training click rate, smoothed towards the training CTR p0 with m
    pseudo-impressions, (clicks + m·p0) / (impressions + m), m picked on validation AUC; an
    item never seen as a training target scores p0. What a model that ignores the history
    can reach (the same rule as the DeepCTR peer runner's "pop" row)."""
    frames = [load_behavior(path) for path in (train, valid, test)]
    stats = frames[0].groupby("item_id")["label"].agg(["sum", "count"])
    p0 = float(frames[0]["label"].mean())

    def scores(frame: Any, m: float) -> np.ndarray:
        rate = (stats["sum"] + m * p0) / (stats["count"] + m)
        return frame["item_id"].map(rate).astype(float).fillna(p0).to_numpy()

    by_m = {m: auc(frames[1]["label"], scores(frames[1], m)) for m in SMOOTHING_GRID}
    m = max(SMOOTHING_GRID, key=lambda k: (by_m[k], -k))
    tested = scores(frames[2], m)
    label = f"popularity floor (smoothed train CTR of the item, m={m:g})"
    return {
        "model": label,
        "auc": auc(frames[2]["label"], tested),
        "logloss": logloss(frames[2]["label"], tested),
        "valid_auc": by_m[m],
    }


def run_variant(
    variant: Variant, files: BenchFiles, out: Path, config: TrainConfig
) -> dict[str, Any]:
    """Trains one variant and scores it on test -> a table row."""
    run_dir = out / "runs" / f"{variant.slug}-seed{config.seed}"
    metrics = train_run(
        variant.model, files.train, files.valid, run_dir, config, dict(variant.overrides)
    )
    tested = evaluate_run(run_dir, files.test, device=config.device)
    epochs = metrics["epochs"]
    return {
        "model": variant.label,
        "seed": config.seed,
        "auc": tested["auc"],
        "logloss": tested["logloss"],
        "valid_auc": metrics["valid"]["auc"],
        "best_epoch": metrics["best_epoch"],
        "epochs_run": len(epochs),
        "train_samples_per_s": statistics.median(e["train_samples_per_s"] for e in epochs),
        "train_seconds": sum(e["train_seconds"] for e in epochs),
    }


def run_model_bench(
    files: BenchFiles,
    out: Path,
    config_for: Callable[[str, int], TrainConfig],
    variants: Sequence[Variant] = VARIANTS,
    seeds: Sequence[int] = (0,),
) -> list[dict[str, Any]]:
    """Every variant × seed on `files`, then the reference rows -> one row per run.

    `config_for(model_name, seed)` gives each run its training config (SARN's default
    learning rate differs). Rows also go to OUT/rows.jsonl as they finish (see `RowLog`)."""
    out.mkdir(parents=True, exist_ok=True)
    log = RowLog(out)
    rows = []
    for variant in variants:
        for seed in seeds:
            row = run_variant(variant, files, out, config_for(variant.model, seed))
            rows.append(row)
            log.append([row])
    log.append(files.reference)
    return [*rows, *files.reference]


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model label: the mean of every number over its seeds, and the sample
    standard deviation as `<key>_sd` when there are several."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["model"], []).append(row)
    summary = []
    for label, group in groups.items():
        merged: dict[str, Any] = {"model": label, "seeds": len(group)}
        for key in ("auc", "logloss", "valid_auc", "best_epoch", "epochs_run"):
            values = [r[key] for r in group if key in r]
            if values:
                merged[key] = statistics.fmean(values)
                if len(values) > 1:
                    merged[f"{key}_sd"] = statistics.stdev(values)
        for key in ("train_samples_per_s", "train_seconds"):
            if all(key in r for r in group):
                merged[key] = statistics.median(r[key] for r in group)
        summary.append(merged)
    return summary


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of test AUC, LogLoss and training throughput: mean ± sample sd over
    the seeds where a model ran several (per-seed rows: OUT/rows.jsonl)."""
    lines = [
        "| model | seeds | test AUC | test LogLoss | valid AUC | best / run epochs "
        "| train samples/s | train s per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summarize(rows):
        epochs = f"{row['best_epoch']:.1f} / {row['epochs_run']:.1f}" if "best_epoch" in row else ""
        lines.append(
            f"| {row['model']} | {row['seeds']} | {_mean_sd(row, 'auc')} "
            f"| {_mean_sd(row, 'logloss')} | {_mean_sd(row, 'valid_auc')} | {epochs} "
            f"| {_number(row, 'train_samples_per_s')} | {_number(row, 'train_seconds')} |"
        )
    return "\n".join(lines)


def _mean_sd(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return ""
    sd = row.get(f"{key}_sd")
    return f"{row[key]:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def _number(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:,.0f}" if key in row else ""
