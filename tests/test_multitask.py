"""Multi-task click and conversion models: towers, the ESMM loss, metrics, training, the
benchmark (the export: tests/test_multitask_export.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from export_support import TINY
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from models.data.batch import BehaviorBatch
from models.data.schema import DataError, write_table
from models.nets.multitask import ctcvr_bce, log1m_product_sigmoid, task_losses, task_metrics
from models.registry import model_class
from models.training.behavior_task import build_behavior_task
from models.training.checkpoint import load_run
from models.training.loop import TrainConfig
from models.training.run import train_run
from slatectr.cli import app

MULTI = ("ctr", "cvr")
SIZES = {"item": 30, "category": 8, "user": 10, "context_device": 5}


def make_batch(rows: int = 6, seed: int = 0) -> BehaviorBatch:
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(2, 30, (rows, 5), generator=g)
    hist[0] = 0  # an empty history
    label = torch.tensor([1.0, 0.0] * (rows // 2))
    return BehaviorBatch(
        user=torch.randint(2, 10, (rows,), generator=g),
        hist_items=hist,
        hist_cats=hist % 8,
        items=torch.randint(2, 30, (rows,), generator=g),
        cats=torch.randint(2, 8, (rows,), generator=g),
        context=torch.randint(2, 5, (rows, 1), generator=g),
        label=label,
        conversion=label * torch.tensor([1.0, 0.0, 0.0, 0.0] * (rows // 4 + 1))[:rows],
    )


def build(name: str, tasks: tuple[str, ...]) -> Any:
    cls = model_class(name)
    torch.manual_seed(0)
    return cls(SIZES, cls.config_class(**{**TINY[name], "tasks": tasks}))


# --- the loss ----------------------------------------------------------------------------------
def test_log1m_product_sigmoid_is_exact_and_finite_where_float32_rounds_to_zero() -> None:
    a = torch.tensor([-3.0, 0.0, 2.5, 8.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0, -1.5, 9.0], dtype=torch.float64)
    direct = torch.log(1 - torch.sigmoid(a) * torch.sigmoid(b))
    assert torch.allclose(log1m_product_sigmoid(a, b), direct, atol=1e-12)
    big = torch.tensor([40.0])  # σ(40)² is 1.0 in float32: the direct form gives log(0) = -inf
    assert math.isinf(float(torch.log(1 - torch.sigmoid(big) ** 2)))
    assert torch.isfinite(log1m_product_sigmoid(big, big)).all()
    # 1 − σ(a)σ(a) ≈ 2e^{-a} for large a, so the log is ≈ log 2 − a.
    assert float(log1m_product_sigmoid(big, big)) == pytest.approx(math.log(2) - 40, abs=1e-4)


def test_ctcvr_loss_is_the_bce_of_the_product_by_hand() -> None:
    a, b = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([-0.5, 0.7, 1.1])
    y = torch.tensor([1.0, 0.0, 0.0])
    p = [1 / (1 + math.exp(-x)) * 1 / (1 + math.exp(-z)) for x, z in zip(a, b, strict=True)]
    expected = -(math.log(p[0]) + math.log(1 - p[1]) + math.log(1 - p[2])) / 3
    assert float(ctcvr_bce(a, b, y)) == pytest.approx(expected, rel=1e-6)


def test_the_conversion_tower_learns_from_impressions_without_a_click() -> None:
    """ESMM: the loss runs over ALL impressions, so a batch of non-clicked rows alone still
    trains the CVR tower (through pCTR·pCVR), which a clicked-only CVR loss never would."""
    model = build("gru", MULTI).train()
    batch = make_batch()
    unclicked = batch.label == 0
    batch = BehaviorBatch(
        **{k: (v[unclicked] if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    )
    losses = task_losses(model(batch), batch.label, batch.conversion, model.tasks)
    assert set(losses) == {"ctr", "ctcvr"}
    sum(losses.values()).backward()  # type: ignore[union-attr]
    grads = [p.grad for p in model.extra_towers["cvr"].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_conversion_task_without_conversions_is_refused() -> None:
    model = build("gru", MULTI)
    batch = make_batch()
    with pytest.raises(ValueError, match="no conversions"):
        task_losses(model(batch), batch.label, None, model.tasks)


# --- the towers --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sarn", "fat", "gru", "din"])
def test_multi_task_models_have_one_logit_column_per_task(name: str) -> None:
    batch = make_batch()
    single, multi = build(name, ("ctr",)).eval(), build(name, MULTI).eval()
    assert single(batch).shape == (6, 1)
    logits = multi(batch)
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()
    assert multi.tasks == MULTI
    # The CVR tower is a second head of the same shape over the same representation.
    ctr_params = sum(p.numel() for p in single.parameters())
    cvr_params = sum(p.numel() for p in multi.extra_towers["cvr"].parameters())
    assert sum(p.numel() for p in multi.parameters()) == ctr_params + cvr_params
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # two different towers


def test_unknown_tasks_and_wide_deep_multi_task_are_refused() -> None:
    with pytest.raises(ValueError, match="tasks must be one of"):
        build("gru", ("cvr", "ctr"))
    cls = model_class("wdl")
    with pytest.raises(ValueError, match="no multi-task option"):
        cls(SIZES, cls.config_class(**{**TINY["wdl"], "tasks": MULTI}))


# --- metrics -----------------------------------------------------------------------------------
def test_conversion_metrics_use_the_right_rows() -> None:
    rng = np.random.default_rng(0)
    click = (rng.random(400) < 0.4).astype(np.float64)
    conversion = click * (rng.random(400) < 0.3)
    probs = rng.random((400, 2))
    metrics = task_metrics(probs, click, conversion, MULTI)
    clicked = click == 1
    assert metrics["auc"] == pytest.approx(roc_auc_score(click, probs[:, 0]))
    assert metrics["cvr_auc"] == pytest.approx(
        roc_auc_score(conversion[clicked], probs[clicked, 1])
    )
    product = probs[:, 0] * probs[:, 1]
    assert metrics["ctcvr_auc"] == pytest.approx(roc_auc_score(conversion, product))
    assert metrics["selection"] == pytest.approx((metrics["auc"] + metrics["ctcvr_auc"]) / 2)
    baseline = task_metrics(probs[:, 1:], click, conversion, ("cvr",))
    assert baseline["auc"] == pytest.approx(metrics["cvr_auc"])
    assert baseline["n"] == int(clicked.sum())


# --- training ----------------------------------------------------------------------------------
def conversion_frame(n: int, seed: int) -> pd.DataFrame:
    """Clicks when the target's category is in the history (90%); a click converts with
    probability 0.8 on even items and 0.1 on odd ones: both tasks are learnable."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        hist = [int(i) for i in rng.integers(0, 60, rng.integers(0, 7))]
        target = int(rng.integers(0, 60))
        click = int((target % 6 in {h % 6 for h in hist}) == (rng.random() < 0.9))
        converts = rng.random() < (0.8 if target % 2 == 0 else 0.1)
        rows.append(
            {
                "user_id": f"u{rng.integers(0, 50)}",
                "item_id": f"i{target}",
                "category_id": f"c{target % 6}",
                "hist_item_ids": [f"i{h}" for h in hist],
                "hist_category_ids": [f"c{h % 6}" for h in hist],
                "label": click,
                "conversion": int(click and converts),
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("conversions")
    write_table(conversion_frame(800, seed=1), root / "train.parquet")
    write_table(conversion_frame(400, seed=2), root / "valid.parquet")
    return root / "train.parquet", root / "valid.parquet"


def train(files: tuple[Path, Path], run_dir: Path, tasks: tuple[str, ...]) -> dict[str, Any]:
    config = TrainConfig(epochs=3, batch_size=64, lr=1e-2, history_len=8, device="cpu")
    overrides = {**TINY["gru"], "tasks": tasks}
    return train_run("gru", *files, run_dir, config, overrides, progress=False)


def test_a_multi_task_run_learns_both_tasks(files: tuple[Path, Path], tmp_path: Path) -> None:
    valid = train(files, tmp_path / "mt", MULTI)["valid"]
    assert valid["auc"] > 0.7  # clicks: category in history
    assert valid["cvr_auc"] > 0.7  # conversions: even items, learnt through the product only
    assert valid["ctcvr_auc"] > 0.7
    assert load_run(tmp_path / "mt").model.tasks == MULTI


def test_the_conversion_baseline_trains_on_clicked_rows_only(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    frame = pd.read_parquet(files[0])
    clicked = int(frame["label"].sum())
    config = TrainConfig(history_len=8)
    _, task, _, _ = build_behavior_task(*files, config, False, ("cvr",), tmp_path / "cvr")
    assert task.train.rows == clicked < 800
    assert (task.train.column("label") == 1).all() and (task.valid.column("label") == 1).all()
    _, mt_task, _, _ = build_behavior_task(*files, config, False, MULTI, tmp_path / "mt")
    assert mt_task.train.rows == 800  # the multi-task model sees every impression
    # Its vocabularies come from the clicked rows too: a user who never clicks is unknown.
    frame.loc[frame["label"] == 0, "user_id"] = "never-clicks"
    write_table(frame, tmp_path / "train.parquet")
    _, _, _, cvr_vocabs = build_behavior_task(
        tmp_path / "train.parquet", files[1], config, False, ("cvr",), tmp_path / "cvr2"
    )
    _, _, _, mt_vocabs = build_behavior_task(
        tmp_path / "train.parquet", files[1], config, False, MULTI, tmp_path / "mt2"
    )
    assert "never-clicks" in mt_vocabs["user"].tokens
    assert "never-clicks" not in cvr_vocabs["user"].tokens


def test_conversion_tasks_need_a_conversion_column(tmp_path: Path) -> None:
    frame = conversion_frame(50, seed=3).drop(columns="conversion")
    write_table(frame, tmp_path / "plain.parquet")
    with pytest.raises(DataError, match="conversion"):
        build_behavior_task(
            tmp_path / "plain.parquet",
            tmp_path / "plain.parquet",
            TrainConfig(history_len=8),
            False,
            MULTI,
            tmp_path / "run",
        )


@pytest.mark.parametrize(
    ("tasks", "change", "column"),
    [
        (MULTI, {"conversion": 0}, "conversion"),
        (("cvr",), {"conversion": 0}, "conversion"),
        (("ctr",), {"label": 0, "conversion": 0}, "label"),
    ],
)
def test_a_validation_file_that_cannot_rank_epochs_is_refused(
    files: tuple[Path, Path],
    tmp_path: Path,
    tasks: tuple[str, ...],
    change: dict[str, int],
    column: str,
) -> None:
    write_table(pd.read_parquet(files[1]).assign(**change), tmp_path / "one-class.parquet")
    with pytest.raises(DataError, match="both classes") as caught:
        build_behavior_task(
            files[0],
            tmp_path / "one-class.parquet",
            TrainConfig(history_len=8),
            False,
            tasks,
            tmp_path / "run",
        )
    assert f"column '{column}'" in str(caught.value)


def test_cli_trains_and_evaluates_a_multi_task_model(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    runner = CliRunner()
    common = [
        "train",
        "--model",
        "gru",
        "--train",
        str(files[0]),
        "--valid",
        str(files[1]),
        "--epochs",
        "1",
        "--max-len",
        "8",
        "--quiet",
        "--device",
        "cpu",
    ]
    # a space after the comma is what people type; it must mean the same tasks
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "run"), "--tasks", "ctr, cvr"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert {"valid_cvr_auc", "valid_ctcvr_auc"} <= set(summary)
    evaluated = runner.invoke(
        app,
        ["evaluate", "--run", str(tmp_path / "run"), "--data", str(files[1]), "--device", "cpu"],
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.output.strip().splitlines()[-1])
    # Independent of task_metrics: sklearn on the run's own probabilities and the file's labels.
    probs = run_probs(tmp_path / "run", files[1])
    truth = pd.read_parquet(files[1])
    clicked = truth["label"].to_numpy() == 1
    assert metrics["cvr_auc"] == pytest.approx(
        roc_auc_score(truth["conversion"][clicked], probs[clicked, 1])
    )
    assert metrics["ctcvr_auc"] == pytest.approx(
        roc_auc_score(truth["conversion"], probs[:, 0] * probs[:, 1])
    )
    assert "selection" not in metrics  # the early-stopping criterion is not a test metric
    bad = runner.invoke(app, [*common, "--out", str(tmp_path / "x"), "--tasks", "ctr,clicks"])
    assert bad.exit_code == 2 and "tasks must be one of" in bad.output
    wdl = runner.invoke(
        app, [*common[:2], "wdl", *common[3:], "--out", str(tmp_path / "w"), "--tasks", "ctr,cvr"]
    )
    assert wdl.exit_code == 2 and "no multi-task option" in wdl.output


def run_probs(run_dir: Path, data: Path) -> np.ndarray:
    """[n, T] probabilities of a run on every row of a file, straight from the model."""
    from models.training.behavior_task import eval_batches, load_arrays, predict

    run = load_run(run_dir, device="cpu")
    return predict(run.model, eval_batches(load_arrays(data, run.spec, run.vocabs), 256)).probs


@pytest.mark.parametrize("tasks", ["ctr,cvr", "cvr"])
def test_evaluating_a_conversion_run_on_a_file_without_conversions_says_so(
    files: tuple[Path, Path], tmp_path: Path, tasks: str
) -> None:
    runner = CliRunner()
    trained = runner.invoke(
        app,
        [
            "train",
            "--model",
            "gru",
            "--train",
            str(files[0]),
            "--valid",
            str(files[1]),
            "--epochs",
            "1",
            "--max-len",
            "8",
            "--quiet",
            "--device",
            "cpu",
            "--tasks",
            tasks,
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert trained.exit_code == 0, trained.output
    write_table(pd.read_parquet(files[1]).drop(columns="conversion"), tmp_path / "clicks.parquet")
    result = runner.invoke(
        app,
        ["evaluate", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "clicks.parquet")],
    )
    assert result.exit_code == 2
    assert "need conversion labels; the file has no column" in result.output
    assert "Traceback" not in result.output


def test_an_undefined_metric_is_printed_as_json_null(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    assert train(files, tmp_path / "run", MULTI)["best_epoch"] >= 1
    frame = pd.read_parquet(files[1]).assign(conversion=0)  # no clicked row converts
    write_table(frame, tmp_path / "none.parquet")
    result = CliRunner().invoke(
        app, ["evaluate", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "none.parquet")]
    )
    assert result.exit_code == 0, result.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads(result.output.strip().splitlines()[-1], parse_constant=refuse)
    assert metrics["cvr_auc"] is None and metrics["ctcvr_auc"] is None
    assert 0.5 < metrics["auc"] <= 1.0  # the click metrics are still there


# --- the benchmark -----------------------------------------------------------------------------
def test_summary_gives_mean_and_sample_sd_per_approach() -> None:
    from models.bench.multitask import format_table, summarize

    runs = [
        {
            "model": "GRU",
            "approach": "a",
            "ctr_auc": v,
            "cvr_auc": 0.5,
            "ctcvr_auc": 0.6,
            "ctcvr_logloss": 0.2,
            "train_seconds": 10.0,
        }
        for v in (0.60, 0.64)
    ]
    (row,) = summarize(runs)
    assert row["ctr_auc"] == pytest.approx(0.62) and row["seeds"] == 2
    assert row["ctr_auc_sd"] == pytest.approx(math.sqrt(2 * 0.02**2))  # n − 1 = 1
    assert "| GRU | a | 0.6200 ± 0.0283 | 0.5000 ± 0.0000 |" in format_table([row])


def test_the_multi_task_gain_is_paired_by_seed() -> None:
    from models.bench.multitask import MULTI_TASK, SEPARATE, summarize

    def run(approach: str, seed: int, ctcvr: float) -> dict[str, Any]:
        return {
            "model": "FAT",
            "approach": approach,
            "seed": seed,
            "ctr_auc": 0.6,
            "cvr_auc": 0.6,
            "ctcvr_auc": ctcvr,
            "ctcvr_logloss": 0.2,
            "train_seconds": 1.0,
        }

    # Seed 1 is better for both approaches; the paired gains are +0.01 and +0.03.
    runs = [
        run(MULTI_TASK, 0, 0.66),
        run(SEPARATE, 0, 0.65),
        run(MULTI_TASK, 1, 0.73),
        run(SEPARATE, 1, 0.70),
    ]
    multi, separate = summarize(runs)
    assert multi["ctcvr_gain"] == pytest.approx(0.02)
    assert multi["ctcvr_gain_sd"] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert "ctcvr_gain" not in separate


def test_bench_multitask_compares_both_approaches_beside_the_oracle(tmp_path: Path) -> None:
    from models.simulate import SimulationConfig, simulate_world

    world = SimulationConfig(n_users=60, n_items=80, n_categories=8, events_per_user=12, seed=0)
    simulate_world(world, tmp_path / "world", progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "rows.jsonl").write_text('{"stale": "row of an earlier run"}\n')
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "multitask",
            "--world",
            str(tmp_path / "world"),
            "--out",
            str(tmp_path / "b"),
            "--models",
            "gru",
            "--epochs",
            "1",
            "--max-len",
            "10",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    table = (tmp_path / "b" / "multitask.md").read_text().splitlines()
    assert [line.split(" | ")[1] for line in table[2:]] == [
        "multi-task (ESMM loss)",
        "CTR model × CVR model (clicked rows)",
        "true probabilities",
    ]
    oracle = json.loads((tmp_path / "world" / "oracle.json").read_text())["behavior"]
    assert f"| {oracle['ctcvr_auc']:.4f} |" in table[-1]
    multi, separate = (
        json.loads(line) for line in (tmp_path / "b" / "rows.jsonl").read_text().splitlines()
    )
    # Independently of the bench's arithmetic: sklearn on the test file's labels and on the
    # products of each run's own probabilities (the two-model row multiplies two runs).
    test = tmp_path / "world" / "behavior" / "test.parquet"
    truth = pd.read_parquet(test)
    ctcvr = truth["label"] * truth["conversion"]
    runs = tmp_path / "b" / "runs"
    joint = run_probs(runs / "gru-ctr-cvr-seed0", test)
    click, conversion = (run_probs(runs / f"gru-{t}-seed0", test)[:, 0] for t in ("ctr", "cvr"))
    image = matplotlib.image.imread(tmp_path / "b" / "multitask.png")
    assert image.shape[:2] == (704, 352)  # one architecture: a column of two panels, 110 dpi
    assert multi["ctcvr_auc"] == pytest.approx(roc_auc_score(ctcvr, joint[:, 0] * joint[:, 1]))
    assert separate["ctcvr_auc"] == pytest.approx(roc_auc_score(ctcvr, click * conversion))
    assert separate["ctr_auc"] == pytest.approx(roc_auc_score(truth["label"], click))
    clicked = truth["label"].to_numpy() == 1
    assert separate["cvr_auc"] == pytest.approx(
        roc_auc_score(truth["conversion"][clicked], conversion[clicked])
    )


def test_bench_multitask_refuses_architectures_without_a_conversion_tower(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "multitask",
            "--world",
            str(tmp_path),
            "--out",
            str(tmp_path / "b"),
            "--models",
            "gru,wdl",
        ],
    )
    assert result.exit_code == 2 and "no multi-task option for wdl" in result.output
    assert not (tmp_path / "b").exists()  # refused before anything is written


@pytest.mark.parametrize("seeds", ["0,0", "-1", "", "0,x"])
def test_bench_multitask_refuses_seeds_that_would_mislead(tmp_path: Path, seeds: str) -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "multitask",
            "--world",
            str(tmp_path),
            "--out",
            str(tmp_path / "b"),
            "--models",
            "gru",
            "--seeds",
            seeds,
        ],
    )
    assert result.exit_code == 2 and "--seeds" in result.output
    assert not (tmp_path / "b").exists()


def test_a_validation_split_is_reused_only_for_the_same_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.bench.quality as benchmark

    written: list[Path] = []

    def counted(frame: pd.DataFrame, path: Path) -> None:
        written.append(path)
        write_table(frame, path)

    monkeypatch.setattr(benchmark, "write_table", counted)
    write_table(conversion_frame(200, seed=5), tmp_path / "a.parquet")
    write_table(conversion_frame(200, seed=6), tmp_path / "b.parquet")
    first = benchmark.split_validation(tmp_path / "a.parquet", tmp_path / "split")
    assert written == list(first)
    assert benchmark.split_validation(tmp_path / "a.parquet", tmp_path / "split") == first
    assert written == list(first)  # same source, fraction and seed: reused, nothing rewritten
    benchmark.split_validation(tmp_path / "b.parquet", tmp_path / "split")
    assert written == [*first, *first]
    rows = pd.concat([pd.read_parquet(path) for path in first])
    source = pd.read_parquet(tmp_path / "b.parquet")
    assert sorted(rows["item_id"]) == sorted(source["item_id"])  # cut again, from b
    with pytest.raises(DataError, match="not found"):
        benchmark.split_validation(tmp_path / "missing.parquet", tmp_path / "split")


def test_a_conversion_without_a_click_is_refused_as_bad_data(tmp_path: Path) -> None:
    frame = conversion_frame(40, seed=4)
    row = int(np.flatnonzero(frame["label"].to_numpy() == 0)[0])
    frame.loc[row, "conversion"] = 1
    write_table(frame, tmp_path / "bad.parquet")
    bad = str(tmp_path / "bad.parquet")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            "gru",
            "--tasks",
            "ctr,cvr",
            "--train",
            bad,
            "--valid",
            bad,
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    assert f"row {row + 1}" in result.output  # rows are counted from 1
    assert "a conversion needs a click" in result.output
    assert not (tmp_path / "run" / "model.safetensors").exists()
