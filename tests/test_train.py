"""The trainer (early stopping, repeatability), run directories (round trip, corruption, no
pickle) and `ctr evaluate`'s metrics, on tiny in-memory tasks and tiny sample files."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from models.data.batch import BehaviorBatch
from models.data.schema import write_table
from models.nets.baselines import DIN
from models.nets.sarn import SARNConfig
from models.registry import BEHAVIOR_MODELS, model_class
from models.training.checkpoint import CheckpointError, config_from_dict, load_run, save_run
from models.training.evaluate import evaluate_run
from models.training.loop import TrainConfig, fit, train_config_for
from models.training.metrics import auc, logloss
from models.training.resume import (
    EpochSums,
    LoopState,
    RankState,
    Snapshot,
    load_snapshot,
    save_snapshot,
)
from models.training.run import train_run
from runtime.features import FeatureSpec, Vocabulary, vocab_sizes

torch.set_num_threads(1)

TINY_DIN = {"embed_dim": 4, "context_dim": 2, "attention_hidden": [8], "mlp_hidden": [16, 8]}


# --- metrics ----------------------------------------------------------------------------------
def test_auc_counts_ties_as_one_half() -> None:
    # Positives {0.8, 0.5}, negatives {0.5, 0.1}: pairs won 1, 1, 1 and one tie -> 3.5 / 4.
    assert auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.1]) == pytest.approx(0.875)
    assert auc([1, 0], [0.2, 0.9]) == 0.0
    assert np.isnan(auc([1, 1], [0.2, 0.9]))


def test_logloss_is_clipped_and_matches_the_definition() -> None:
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))
    assert np.isfinite(logloss([1], [0.0]))  # a confident miss is large but finite
    assert logloss([1], [0.0]) == pytest.approx(-np.log(1e-7), rel=1e-6)


# --- the generic loop: early stopping ---------------------------------------------------------
class FlippingTask:
    """Validation labels say "x > 0"; training labels say "x < 0". Training pushes the weight of
    a 1-d logistic model from +1 through 0, so validation AUC is 1 and then falls to 0."""

    def __init__(self) -> None:
        self.x = torch.linspace(-1, 1, 20).unsqueeze(1)

    def train_batches(self, epoch: int, skip: int = 0) -> Iterable[tuple[Tensor, Tensor]]:
        return [(self.x, (self.x[:, 0] < 0).float())][skip:]

    def valid_batches(self) -> Iterable[tuple[Tensor, Tensor]]:
        return [(self.x, (self.x[:, 0] > 0).float())]

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
        return loss, {}

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        ((x, y),) = list(batches)
        weight = float(model.weight.item())  # type: ignore[operator]
        return {"auc": auc(y.numpy(), model(x).squeeze(1).numpy()), "weight": weight}

    def rng_state(self) -> dict[str, Any]:
        return {}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        pass


def test_early_stopping_stops_after_patience_and_keeps_the_best_epoch() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    config = TrainConfig(epochs=10, lr=0.6, patience=2, device="cpu")
    result = fit(model, FlippingTask(), config, progress=False)
    aucs = [e["valid_auc"] for e in result["epochs"]]
    assert aucs[0] == 1.0 and aucs[1] == 0.0  # the weight crossed 0 in epoch 2
    assert len(aucs) == 3  # best at 1, then 2 epochs without improvement
    assert result["stopped_early"] is True
    assert result["best_epoch"] == 1
    assert result["valid"]["auc"] == 1.0
    # The model holds epoch 1's weights, not the last epoch's.
    assert model.weight.item() == pytest.approx(result["epochs"][0]["valid_weight"])
    assert model.weight.item() > 0 > result["epochs"][-1]["valid_weight"]


def test_a_tie_is_not_an_improvement_and_the_first_best_epoch_is_kept() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, -1.0)  # wrong sign: training on "x > 0" labels fixes it
    task = FlippingTask()
    task.train_batches = lambda epoch, skip=0: task.valid_batches()  # type: ignore[method-assign]
    config = TrainConfig(epochs=20, lr=0.3, patience=5, device="cpu")
    result = fit(model, task, config, progress=False)
    weights = [e["valid_weight"] for e in result["epochs"]]
    crossing = next(i for i, w in enumerate(weights, start=1) if w > 0)
    assert crossing > 1  # AUC 0 for a few epochs (ties with epoch 1), then 1 for good
    assert result["best_epoch"] == crossing
    assert len(weights) == crossing + config.patience
    assert model.weight.item() == pytest.approx(weights[crossing - 1])


def test_steps_per_epoch_trains_the_first_batches_of_every_epoch() -> None:
    task = FlippingTask()
    drawn: list[tuple[int, int]] = []

    def five_batches(epoch: int, skip: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        for number in range(skip, 5):
            drawn.append((epoch, number))
            yield task.x, (task.x[:, 0] < 0).float()

    task.train_batches = five_batches  # type: ignore[method-assign]
    config = TrainConfig(epochs=2, lr=0.1, patience=5, device="cpu", steps_per_epoch=2)
    result = fit(nn.Linear(1, 1, bias=False), task, config, progress=False)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert drawn == [(1, 0), (1, 1), (2, 0), (2, 1)]  # no batch past the cap is even made


def test_lr_decay_sets_each_epochs_rate_from_its_number() -> None:
    config = TrainConfig(epochs=3, lr=0.1, lr_decay=0.5, patience=5, device="cpu")
    result = fit(nn.Linear(1, 1, bias=False), FlippingTask(), config, progress=False)
    # Read back from the optimizer at each epoch's end: the rate it really trained at.
    assert [e["lr"] for e in result["epochs"]] == pytest.approx([0.1, 0.05, 0.025])
    plain = fit(
        nn.Linear(1, 1, bias=False),
        FlippingTask(),
        TrainConfig(epochs=2, device="cpu"),
        progress=False,
    )
    assert [e["lr"] for e in plain["epochs"]] == [1e-3, 1e-3]  # no decay by default


def test_model_defaults_apply_unless_overridden() -> None:
    assert train_config_for("sarn").lr == 0.01
    assert train_config_for("din").lr == 1e-3
    assert train_config_for("sarn", lr=0.002, epochs=None).lr == 0.002
    assert train_config_for("ncm").grad_clip == 1.0
    with pytest.raises(ValueError, match="no field"):
        train_config_for("din", epoch=3)


# --- tiny sample files ------------------------------------------------------------------------
def behaviour_frame(n: int, seed: int) -> pd.DataFrame:
    """Label 1 (mostly) when the target's category occurs in the history: learnable."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        hist = [int(i) for i in rng.integers(0, 60, rng.integers(0, 7))]
        target = int(rng.integers(0, 60))
        seen = target % 6 in {h % 6 for h in hist}
        rows.append(
            {
                "user_id": f"u{rng.integers(0, 50)}",
                "item_id": f"i{target}",
                "category_id": f"c{target % 6}",
                "hist_item_ids": [f"i{h}" for h in hist],
                "hist_category_ids": [f"c{h % 6}" for h in hist],
                "label": int(seen == (rng.random() < 0.9)),
                "context_device": str(rng.choice(["ios", "web"])),
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    write_table(behaviour_frame(600, seed=1), root / "train.parquet")
    write_table(behaviour_frame(300, seed=2), root / "valid.parquet")
    return root / "train.parquet", root / "valid.parquet"


def tiny_run(files: tuple[Path, Path], run_dir: Path, seed: int = 0) -> dict[str, Any]:
    config = TrainConfig(epochs=2, batch_size=64, lr=1e-2, history_len=8, seed=seed, device="cpu")
    return train_run("din", *files, run_dir, config, TINY_DIN, progress=False)


@pytest.fixture(scope="module")
def trained(files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    tiny_run(files, run_dir)
    return run_dir


def test_a_run_learns_and_writes_a_complete_run_directory(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["model"] == "din" and len(metrics["epochs"]) == 2
    assert metrics["valid"]["auc"] > 0.6  # the rule is learnable; chance is 0.5
    assert metrics["valid"]["n"] == 300
    config = json.loads((trained / "config.json").read_text())
    assert config["model_config"]["embed_dim"] == 4 and config["train_config"]["history_len"] == 8
    spec, vocabs = FeatureSpec.load(trained)
    assert spec.context_fields and spec.history_len == 8
    assert "i5" in vocabs["item"] and "c3" in vocabs["category"]
    log = (trained / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]


def test_same_seed_gives_identical_metrics(files: tuple[Path, Path], tmp_path: Path) -> None:
    first = tiny_run(files, tmp_path / "a")
    second = tiny_run(files, tmp_path / "b")
    other = tiny_run(files, tmp_path / "c", seed=1)
    assert _without_timing(first) == _without_timing(second)
    assert first["epochs"][0]["train_samples_per_s"] > 0  # wall-clock figures: not repeatable
    assert other["epochs"][0]["train_loss"] != first["epochs"][0]["train_loss"]


def _without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    timing = {"train_seconds", "train_samples_per_s"}
    epochs = [{k: v for k, v in epoch.items() if k not in timing} for epoch in metrics["epochs"]]
    return {**metrics, "epochs": epochs}


def test_evaluate_on_the_validation_file_reproduces_the_logged_metrics(
    trained: Path, files: tuple[Path, Path]
) -> None:
    logged = json.loads((trained / "metrics.json").read_text())["valid"]
    result = evaluate_run(trained, files[1], device="cpu")
    assert list(result) == ["model", "auc", "logloss", "n"]
    assert result["model"] == "din" and result["n"] == 300
    assert result["auc"] == pytest.approx(logged["auc"], abs=1e-9)
    assert result["logloss"] == pytest.approx(logged["logloss"], abs=1e-9)


@pytest.mark.parametrize("name", sorted(BEHAVIOR_MODELS))
def test_every_behaviour_model_trains_saves_and_evaluates(
    name: str, files: tuple[Path, Path], tmp_path: Path
) -> None:
    config = TrainConfig(epochs=1, batch_size=128, history_len=8, device="cpu")
    metrics = train_run(name, *files, tmp_path, config, progress=False)
    record = metrics["epochs"][0]
    assert np.isfinite(record["train_loss"]) and 0 < metrics["valid"]["auc"] < 1
    if name == "sarn":  # samples negatives: the sampler fed its interest (auxiliary) loss
        assert model_class(name).samples_negatives(SARNConfig()) and "train_auxiliary" in record
    result = evaluate_run(tmp_path, files[1], device="cpu")
    assert result["auc"] == pytest.approx(metrics["valid"]["auc"], abs=1e-9)


def test_fat_trains_with_its_auxiliary_loss_only_when_it_asks_for_it(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    config = TrainConfig(epochs=1, batch_size=128, history_len=8, device="cpu")
    tiny = {"d": 8, "heads": 2, "d_ff": 16, "num_bases": 4, "meta_dim": 4, "top_k": 2}
    plain = train_run("fat", *files, tmp_path / "plain", config, tiny, progress=False)
    aux = {**tiny, "auxiliary_weight": 1.0}
    with_aux = train_run("fat", *files, tmp_path / "aux", config, aux, progress=False)
    assert "train_auxiliary" not in plain["epochs"][0]
    assert with_aux["epochs"][0]["train_auxiliary"] > 0  # BCE of sampled clicks: never 0


# --- run directories --------------------------------------------------------------------------
def saved_din(run_dir: Path) -> tuple[DIN, BehaviorBatch]:
    vocabs = {
        "item": Vocabulary([f"i{k}" for k in range(20)]),
        "category": Vocabulary(["c0", "c1", "c2"]),
        "user": Vocabulary(["u0"]),
        "context_device": Vocabulary(["ios", "web"]),
    }
    config = DIN.config_class(embed_dim=4, context_dim=2, attention_hidden=(8,), mlp_hidden=(8,))
    torch.manual_seed(3)
    model = DIN(vocab_sizes(vocabs), config)
    model.train()(make_batch())  # moves Dice's running statistics away from their init
    save_run(
        run_dir,
        name="din",
        model=model,
        model_config=config,
        train_config=TrainConfig(),
        sizes=vocab_sizes(vocabs),
        spec=FeatureSpec(history_len=5, context_fields=["device"]),
        vocabs=vocabs,
        metrics={"valid": {"auc": 0.5}},
    )
    return model.eval(), make_batch()


def make_batch() -> BehaviorBatch:
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(2, 22, (8, 5), generator=g) * (torch.arange(5) < 3)
    return BehaviorBatch(
        user=torch.full((8,), 2),
        hist_items=hist,
        hist_cats=torch.where(hist == 0, 0, 2 + hist % 3),
        items=torch.randint(2, 22, (8,), generator=g),
        cats=torch.randint(2, 5, (8,), generator=g),
        context=torch.randint(2, 4, (8, 1), generator=g),
        label=torch.zeros(8),
    )


def test_round_trip_gives_identical_scores(tmp_path: Path) -> None:
    model, batch = saved_din(tmp_path)
    run = load_run(tmp_path)
    assert run.name == "din" and not run.model.training
    assert run.spec.context_fields == ["device"] and run.vocabs["item"].index("i4") == 6
    assert run.metrics == {"valid": {"auc": 0.5}}
    with torch.no_grad():
        assert torch.equal(run.model(batch), model(batch))
    dice = "attention.mlp.net.1.running_mean"  # a buffer, not a parameter: saved as well
    assert torch.equal(run.model.state_dict()[dice], model.state_dict()[dice])
    assert not torch.equal(model.state_dict()[dice], torch.zeros_like(model.state_dict()[dice]))


def test_weights_are_safetensors_and_load_without_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batch = saved_din(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header size, JSON header
    header = json.loads(raw[8 : 8 + header_len])
    assert "embed.item.weight" in header
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling during load_run")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with torch.no_grad():
        assert torch.equal(load_run(tmp_path).model(batch), model(batch))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 5), "model.safetensors"),
        (lambda d: _truncate(d / "model.safetensors"), "model.safetensors"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
        (lambda d: (d / "metrics.json").unlink(), "metrics.json is missing"),
        (lambda d: _edit_config(d, sizes={"item": 99}), "does not"),
        (lambda d: _edit_config(d, model="nope"), "config.json"),
        (lambda d: _edit_config(d, model_config={"heads": 2}), "config.json"),
        (lambda d: (d / "vocab_item.json").write_text("[]"), "vocabularies"),
    ],
)
def test_a_damaged_run_directory_raises_a_clear_error(
    tmp_path: Path, damage: Any, message: str
) -> None:
    saved_din(tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_run(tmp_path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _edit_config(run_dir: Path, **changes: Any) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (run_dir / "config.json").write_text(json.dumps(config))


def test_a_resume_checkpoint_is_safetensors_and_json_and_restores_adam_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batch = saved_din(tmp_path / "din")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def step(net: nn.Module, adam: torch.optim.Optimizer) -> None:
        adam.zero_grad()
        net.train()(batch).sum().backward()
        adam.step()

    for _ in range(3):
        step(model, optimizer)
    loop = LoopState(epoch=2, step=7, history=[{"epoch": 1, "valid_auc": 0.6}], best_epoch=1)
    rank = RankState(
        torch.get_rng_state(), None, {"sampler": {"state": 1}}, EpochSums({"loss": 2.5}, 64, 1.5)
    )
    snapshot = Snapshot(
        loop, model.state_dict(), None, optimizer.state_dict(), [rank], {"world": 1}
    )
    written = save_snapshot(tmp_path, snapshot)
    assert sorted(p.name for p in written.iterdir()) == ["state.json", "state.safetensors"]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling while loading a checkpoint")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_snapshot(tmp_path)
    assert loaded is not None and loaded.loop == loop and loaded.ranks[0].sums == rank.sums
    assert torch.equal(loaded.ranks[0].torch_rng, rank.torch_rng)
    again = load_run(tmp_path / "din").model  # the same architecture, its saved weights
    again.load_state_dict(loaded.model)
    adam = torch.optim.Adam(again.parameters(), lr=0.01)
    adam.load_state_dict(loaded.optimizer)
    step(model, optimizer)  # the interrupted run's next step and the resumed run's first one
    step(again, adam)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_embedding_l2_adds_its_weighted_squared_table_norm_to_the_loss(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    from models.training.behavior_task import build_behavior_task, embedding_norm

    config = TrainConfig(history_len=8, batch_size=64, embedding_l2=0.01, device="cpu")
    sizes, task, _, _ = build_behavior_task(
        *files, config, negatives=False, tasks=("ctr",), run_dir=tmp_path / "run"
    )
    model = DIN(sizes, config_from_dict(DIN.config_class, TINY_DIN))
    batch = next(iter(task.train_batches(1)))
    total, parts = task.loss(model, batch)
    tables = sum(
        float(m.weight.detach().pow(2).sum())
        for m in model.modules()
        if isinstance(m, nn.Embedding)
    )
    assert float(embedding_norm(model).detach()) == pytest.approx(tables, rel=1e-6)
    assert parts["embedding_l2"] == pytest.approx(0.01 * tables, rel=1e-5)
    assert float(total.detach()) == pytest.approx(sum(parts.values()), rel=1e-5)
    task.embedding_l2 = 0.0
    assert "embedding_l2" not in task.loss(model, batch)[1]


def test_ctr_train_set_sends_regularisation_to_training_and_the_rest_to_the_model(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import models.training.run
    from slatectr.cli import app

    seen: dict[str, Any] = {}

    def fake_train_run(model: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        seen["config"], seen["overrides"] = args[3], kwargs["model_overrides"]
        return {"best_epoch": 1, "valid": {"auc": 0.5}}

    monkeypatch.setattr(models.training.run, "train_run", fake_train_run)
    train, valid = files
    sets = ["--set", "weight_decay=1e-4", "--set", "embedding-l2=1e-6", "--set", "dropout=0.1"]
    command = ["train", "--model", "fat", "--train", str(train), "--valid", str(valid)]
    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "run"), *sets])
    assert result.exit_code == 0, result.output
    assert (seen["config"].weight_decay, seen["config"].embedding_l2) == (1e-4, 1e-6)
    assert seen["overrides"] == {"dropout": 0.1}
