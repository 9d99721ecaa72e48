"""Conversion benchmark (`ctr bench multitask`): one multi-task model against two single-task
models, per architecture, beside the world's oracle.

For each architecture (SARN, FAT, GRU by default), on one simulated world with conversions:

* multi-task: `tasks=("ctr", "cvr")`, trained on every impression with the ESMM loss;
* two models: a click model (`("ctr",)`, every impression) times a conversion model
  (`("cvr",)`, trained on the clicked impressions only, the conventional CVR model).

Both are scored on every test impression: CTR AUC (clicks), CVR AUC (conversions among the
clicked rows) and CTCVR AUC/LogLoss (pCTR·pCVR against click ∧ conversion over all rows: what
ranking by expected value needs). The protocol is `models.bench.quality`'s: train/validation split
by user from the world's training file, early stopping on validation, test touched once. With
several seeds (`--seeds`), every run is repeated with that training seed (initialisation and
shuffling; the data stay the same) and the table gives the mean and standard deviation.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.bench.quality import RowLog, split_validation
from models.data.schema import DataError, load_behavior
from models.nets.multitask import CTR, CVR, task_metrics
from models.registry import multitask_models
from models.training.behavior_task import Predictions, eval_batches, load_arrays, predict
from models.training.checkpoint import load_run
from models.training.loop import TrainConfig
from models.training.run import train_run

MODELS: tuple[str, ...] = ("sarn", "fat", "gru")
MULTI_TASK = "multi-task (ESMM loss)"
SEPARATE = "CTR model × CVR model (clicked rows)"
LABELS = {"sarn": "SARN", "fat": "FAT", "gru": "GRU", "din": "DIN"}


def predict_file(run_dir: Path, test: Path, device: str) -> Predictions:
    """The run's probabilities on every row of the test file."""
    run = load_run(run_dir, device=device)
    arrays = load_arrays(test, run.spec, run.vocabs)
    return predict(run.model, eval_batches(arrays, 1024))


def _train(
    model: str, tasks: tuple[str, ...], files: tuple[Path, Path], out: Path, config: TrainConfig
) -> tuple[Path, dict[str, Any]]:
    run_dir = out / "runs" / f"{model}-{'-'.join(tasks)}-seed{config.seed}"
    metrics = train_run(model, *files, run_dir, config, {"tasks": tasks})
    return run_dir, metrics


def _row(
    model: str, approach: str, probs: np.ndarray, test: Predictions, seconds: float
) -> dict[str, Any]:
    metrics = task_metrics(probs, test.label, test.conversion, (CTR, CVR))
    return {
        "model": LABELS.get(model, model),
        "approach": approach,
        "ctr_auc": metrics["auc"],
        "cvr_auc": metrics["cvr_auc"],
        "ctcvr_auc": metrics["ctcvr_auc"],
        "ctcvr_logloss": metrics["ctcvr_logloss"],
        "train_seconds": seconds,
    }


def _seconds(metrics: dict[str, Any]) -> float:
    return float(sum(epoch["train_seconds"] for epoch in metrics["epochs"]))


def bench_architecture(
    model: str, files: tuple[Path, Path], test: Path, out: Path, config: TrainConfig
) -> list[dict[str, Any]]:
    """The multi-task row and the two-model row of one architecture."""
    multi_dir, multi = _train(model, (CTR, CVR), files, out, config)
    ctr_dir, ctr = _train(model, (CTR,), files, out, config)
    cvr_dir, cvr = _train(model, (CVR,), files, out, config)
    joint = predict_file(multi_dir, test, config.device)
    click, conversion = (predict_file(d, test, config.device) for d in (ctr_dir, cvr_dir))
    separate = np.stack([click.probs[:, 0], conversion.probs[:, 0]], axis=1)
    return [
        _row(model, MULTI_TASK, joint.probs, joint, _seconds(multi)),
        _row(model, SEPARATE, separate, joint, _seconds(ctr) + _seconds(cvr)),
    ]


METRICS = ("ctr_auc", "cvr_auc", "ctcvr_auc", "ctcvr_logloss", "train_seconds")


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-seed rows -> one row per (model, approach): the mean of every metric, and its
    sample standard deviation as `<metric>_sd` when there are several seeds. The multi-task
    row also gets `ctcvr_gain`: its CTCVR AUC minus the two-model row's, paired by seed (the
    same seed, data and test rows), which cancels what the two share."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in _with_gains(runs):
        groups.setdefault((run["model"], run["approach"]), []).append(run)
    summary = []
    for (model, approach), group in groups.items():
        row: dict[str, Any] = {"model": model, "approach": approach, "seeds": len(group)}
        for key in (*METRICS, "ctcvr_gain"):
            values = [r[key] for r in group if key in r]
            if not values:
                continue
            row[key] = statistics.fmean(values)
            if len(values) > 1:
                row[f"{key}_sd"] = statistics.stdev(values)
        summary.append(row)
    return summary


def _with_gains(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    gains = {
        id(joint): joint["ctcvr_auc"] - separate["ctcvr_auc"] for separate, joint in _pairs(runs)
    }
    return [{**r, "ctcvr_gain": gains[id(r)]} if id(r) in gains else r for r in runs]


def _pairs(runs: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(two-model row, multi-task row) of every (model, seed) that has both, in run order."""
    by_run: dict[tuple[Any, Any], dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_run.setdefault((run["model"], run.get("seed")), {})[run["approach"]] = run
    return [
        (pair[SEPARATE], pair[MULTI_TASK])
        for pair in by_run.values()
        if SEPARATE in pair and MULTI_TASK in pair
    ]


def check_models(models: Sequence[str]) -> None:
    """ValueError unless every name is an architecture with a multi-task option."""
    known = multitask_models()
    choices = ", ".join(known)
    if not models:
        raise ValueError(f"no architecture given; choose from {choices}")
    unknown = [model for model in models if model not in known]
    if unknown:
        raise ValueError(f"no multi-task option for {', '.join(unknown)}; choose from {choices}")


def run_multitask_bench(
    world: Path,
    out: Path,
    config_for: Callable[[str], TrainConfig],
    models: Sequence[str] = MODELS,
    seeds: Sequence[int] = (0,),
) -> list[dict[str, Any]]:
    """Every architecture and seed on `world` (per-seed rows go to OUT/rows.jsonl as they
    finish, see `RowLog`, and their plot to OUT/multitask.png) -> the summary rows, then the
    oracle row. Runs already in OUT/runs are trained again, not reused."""
    check_models(models)
    out.mkdir(parents=True, exist_ok=True)
    files = split_validation(world / "behavior" / "train.parquet", out / "data")
    test = world / "behavior" / "test.parquet"
    if "conversion" not in load_behavior(test).columns:  # before hours of training, not after
        raise DataError(test, "no conversions: simulate the world again", column="conversion")
    log = RowLog(out)
    runs: list[dict[str, Any]] = []
    for model in models:
        for seed in seeds:
            new = bench_architecture(model, files, test, out, replace(config_for(model), seed=seed))
            runs += [{**row, "seed": seed} for row in new]
            log.append(runs[-len(new) :])
    plot_seeds(runs, out / "multitask.png")
    rows = summarize(runs)
    oracle = json.loads((world / "oracle.json").read_text())["behavior"]
    rows.append(
        {
            "model": "oracle",
            "approach": "true probabilities",
            "ctr_auc": oracle["auc"],
            "cvr_auc": oracle["cvr_auc"],
            "ctcvr_auc": oracle["ctcvr_auc"],
            "ctcvr_logloss": oracle["ctcvr_logloss"],
        }
    )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of test metrics (higher AUC, lower LogLoss is better): mean ± sd over
    the seeds."""
    lines = [
        "| model | approach | CTR AUC | CVR AUC (clicked) | CTCVR AUC | CTCVR LogLoss "
        "| CTCVR AUC gain (paired) | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [_cell(row, key, ".4f") for key in METRICS[:4]]
        gain = _cell(row, "ctcvr_gain", "+.4f") if "ctcvr_gain" in row else ""
        seconds = _cell(row, "train_seconds", ",.0f") if "train_seconds" in row else ""
        lines.append(
            f"| {row['model']} | {row['approach']} | {' | '.join(cells)} | {gain} | {seconds} |"
        )
    return "\n".join(lines)


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    sd = row.get(f"{key}_sd")
    sd_spec = spec.lstrip("+")  # a spread has no sign
    return f"{row[key]:{spec}}" + (f" ± {sd:{sd_spec}}" if sd is not None else "")


def plot_seeds(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Per-seed rows -> a PNG: for each architecture, CTCVR AUC and CVR AUC (clicked rows) of
    the two models (left) and the multi-task model (right) of every seed, joined by a line that
    is green where the multi-task model is higher. The paired comparison the gain column
    summarises, with every seed visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(run["model"] for run in runs))
    metrics = (("ctcvr_auc", "CTCVR AUC"), ("cvr_auc", "CVR AUC (clicked rows)"))
    fig, axes = plt.subplots(
        len(metrics), len(models), figsize=(3.2 * len(models), 6.4), squeeze=False
    )
    for column, model in enumerate(models):
        pairs = [pair for pair in _pairs(runs) if pair[1]["model"] == model]
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][column]
            for separate, joint in pairs:
                better = joint[key] > separate[key]
                ax.plot(
                    [0, 1],
                    [separate[key], joint[key]],
                    marker="o",
                    alpha=0.7,
                    color="tab:green" if better else "tab:red",
                )
            ax.set_xticks([0, 1], ["CTR × CVR\nmodels", "multi-task"])
            ax.set_xlim(-0.3, 1.3)
            ax.set_title(f"{model}: {label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
