"""Slate sessions -> tensors, the evaluation protocol, the slate metrics, training end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from models.data.schema import load_slates, write_table
from models.ncm.data import encode_sessions, fit_slate_vocabs, iter_batches, make_batch
from models.ncm.metrics import THRESHOLD_GRID, f1_accuracy, f1_curve, fit_threshold
from models.ncm.models import SlateLogReg
from models.ncm.task import SlateTask, masked_bce, predict_targets
from models.training.loop import TrainConfig
from models.training.run import train_run
from runtime.features import OOV, PAD

torch.set_num_threads(1)


def slate(user: str, session: str, index: int, items: str, cats: str, clicks: str) -> dict:
    return {
        "user_id": user,
        "session_id": session,
        "slate_index": index,
        "item_ids": items.split(),
        "category_ids": cats.split(),
        "clicks": [int(c) for c in clicks.split()],
    }


def small_frame() -> pd.DataFrame:
    """Two sessions, rows out of order: u1/s1 has 5 slates, u2/s2 has 3 (one of 4 items)."""
    rows = [
        slate("u1", "s1", 4, "a b", "x x", "0 1"),
        slate("u2", "s2", 0, "a c", "x y", "1 0"),
        slate("u1", "s1", 0, "a b c", "x x y", "1 0 0"),
        slate("u1", "s1", 1, "c", "y", "0"),
        slate("u1", "s1", 2, "b a", "x x", "0 0"),
        slate("u1", "s1", 3, "c a b", "y x x", "0 0 1"),
        slate("u2", "s2", 1, "b", "x", "0"),
        slate("u2", "s2", 2, "d b a c", "y x x y", "0 1 0 1"),
    ]
    return pd.DataFrame(rows)


def test_batches_are_sorted_padded_and_masked() -> None:
    frame = small_frame()
    vocabs = fit_slate_vocabs(frame)
    sessions = encode_sessions(frame, vocabs, max_slate=3)  # the 4-item slate is cut to 3
    assert list(sessions.counts) == [5, 3]
    batch = make_batch(sessions, np.arange(2), evaluation=False)
    assert batch.items.shape == (2, 5, 3)
    item = vocabs["item"].index
    # session u1/s1 in slate_index order; slate 1 holds one item, then padding.
    assert batch.items[0, 1].tolist() == [item("c"), PAD, PAD]
    assert batch.items[0, 3].tolist() == [item("c"), item("a"), item("b")]
    assert batch.mask[0, :, :].sum(1).tolist() == [3, 1, 2, 3, 2]
    # session u2/s2 has 3 slates: slates 3 and 4 are padding; its last slate was cut to 3.
    assert batch.mask[1].sum(1).tolist() == [2, 1, 3, 0, 0]
    assert batch.items[1, 2].tolist() == [item("d"), item("b"), item("a")]
    assert batch.clicks[1, 2].tolist() == [0.0, 1.0, 0.0]
    assert torch.equal(batch.target, batch.mask)
    assert torch.equal(batch.hist_clicks, batch.clicks)


def test_evaluation_targets_the_last_fifth_and_hides_their_clicks() -> None:
    frame = small_frame()
    sessions = encode_sessions(frame, fit_slate_vocabs(frame), max_slate=4)
    batch = make_batch(sessions, np.arange(2), evaluation=True)
    target_slates = batch.target.any(-1)
    # ⌊0.8·5⌋ = 4 context slates for u1/s1; ⌊0.8·3⌋ = 2 for u2/s2.
    assert target_slates.tolist() == [[False] * 4 + [True], [False, False, True, False, False]]
    assert batch.hist_clicks[target_slates].sum() == 0
    assert batch.clicks[target_slates].sum() == 3  # the labels are still there
    assert torch.equal(batch.hist_clicks[~target_slates], batch.clicks[~target_slates])


def test_unseen_ids_are_oov(tmp_path: Path) -> None:
    train = small_frame()
    test = pd.DataFrame([slate("u9", "s9", 0, "a zzz", "x qqq", "0 1")])
    sessions = encode_sessions(test, fit_slate_vocabs(train), max_slate=3)
    assert sessions.items[0, :2].tolist() == [fit_slate_vocabs(train)["item"].index("a"), OOV]
    assert sessions.cats[0, 1] == OOV


def test_parquet_and_csv_give_the_same_batches(tmp_path: Path) -> None:
    frame = small_frame()
    vocabs = fit_slate_vocabs(frame)
    batches = []
    for suffix in ("parquet", "csv"):
        write_table(frame, tmp_path / f"slates.{suffix}")
        sessions = encode_sessions(load_slates(tmp_path / f"slates.{suffix}"), vocabs, 4)
        batches.append(make_batch(sessions, np.arange(2), evaluation=True))
    for name in ("items", "cats", "mask", "clicks", "hist_clicks", "target"):
        assert torch.equal(getattr(batches[0], name), getattr(batches[1], name)), name


def test_target_slate_clicks_never_reach_a_prediction() -> None:
    """Changing the clicks of the evaluated slates changes the labels, not the scores."""
    frame = small_frame()
    vocabs = fit_slate_vocabs(frame)
    last = ((frame["user_id"] == "u1") & (frame["slate_index"] == 4)) | (
        (frame["user_id"] == "u2") & (frame["slate_index"] == 2)
    )
    flipped = frame.copy()
    flipped["clicks"] = [
        [1 - c for c in row] if is_last else row
        for row, is_last in zip(frame["clicks"], last, strict=True)
    ]
    torch.manual_seed(0)
    model = SlateLogReg({"item": len(vocabs["item"]), "category": len(vocabs["category"])})
    results = [
        predict_targets(model, iter_batches(encode_sessions(f, vocabs, 4), 8, evaluation=True))
        for f in (frame, flipped)
    ]
    assert np.array_equal(results[0][1], results[1][1])
    assert not np.array_equal(results[0][0], results[1][0])


# ---------------------------------------------------------------------------- metrics


def test_f1_curve_matches_sklearn_on_every_threshold() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(0.3 * labels + rng.random(300) * 0.7, 0, 1).round(2)  # ties on the grid
    curve = f1_curve(labels, probs)
    expected = [f1_score(labels, probs >= t, zero_division=0.0) for t in THRESHOLD_GRID]
    assert np.allclose(curve, expected)


def test_threshold_is_fitted_then_applied() -> None:
    labels = np.array([0, 0, 1, 1, 0])
    probs = np.array([0.1, 0.2, 0.35, 0.8, 0.6])
    # ≥0.35 gives TP 2, FP 1 -> F1 0.8; ≥0.61 gives 2/3; ≥0.21..0.35 is the best run.
    assert fit_threshold(labels, probs) == pytest.approx(0.21)
    f1, accuracy = f1_accuracy(labels, probs, 0.5)  # predicts 0.8 and 0.6: TP 1, FP 1, FN 1
    assert f1 == pytest.approx(0.5)
    assert accuracy == pytest.approx(3 / 5)


def test_bce_counts_target_positions_only() -> None:
    logits = torch.tensor([[[2.0, -1.0, 5.0]]])
    clicks = torch.tensor([[[1.0, 0.0, 0.0]]])
    target = torch.tensor([[[True, True, False]]])
    expected = F.binary_cross_entropy_with_logits(logits[0, 0, :2], clicks[0, 0, :2])
    assert torch.allclose(masked_bce(logits, clicks, target), expected)


def test_evaluate_fits_the_threshold_on_training_sessions() -> None:
    frame = small_frame()
    vocabs = fit_slate_vocabs(frame)
    sessions = encode_sessions(frame, vocabs, 4)
    torch.manual_seed(0)
    model = SlateLogReg({"item": len(vocabs["item"]), "category": len(vocabs["category"])})
    task = SlateTask(train=sessions, valid=sessions, eval_batch_size=1)
    with torch.no_grad():
        metrics = task.evaluate(model, task.valid_batches())
    labels, probs = predict_targets(model, iter_batches(sessions, 4, evaluation=True))
    assert float(model.click_threshold) == pytest.approx(fit_threshold(labels, probs))
    assert metrics["threshold"] == pytest.approx(fit_threshold(labels, probs))
    f1, accuracy = f1_accuracy(labels, probs, metrics["threshold"])
    assert (metrics["f1"], metrics["accuracy"]) == pytest.approx((f1, accuracy))
    assert metrics["n"] == 6  # target items: u1's last slate (2) and u2's last slate (4)


# ---------------------------------------------------------------------------- end to end


def learnable_world(n_sessions: int, seed: int) -> pd.DataFrame:
    """Items i0..i19 are clicked with probability 0.9, i20..i39 with 0.05; 6 slates of 4."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        for t in range(6):
            items = rng.choice(40, 4, replace=False)
            clicks = (rng.random(4) < np.where(items < 20, 0.9, 0.05)).astype(int)
            rows.append(
                {
                    "user_id": f"u{s}",
                    "session_id": f"s{s}",
                    "slate_index": t,
                    "item_ids": [f"i{i}" for i in items],
                    "category_ids": [f"c{i % 5}" for i in items],
                    "clicks": clicks.tolist(),
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("name", ["ncm", "scot"])
def test_train_then_evaluate_a_slate_run(tmp_path: Path, name: str) -> None:
    from models.training.evaluate import evaluate_run  # `ctr evaluate`'s code path

    write_table(learnable_world(120, seed=1), tmp_path / "train.parquet")
    write_table(learnable_world(40, seed=2), tmp_path / "valid.csv")
    config = TrainConfig(epochs=4, batch_size=16, lr=0.02, device="cpu", grad_clip=1.0)
    metrics = train_run(
        name,
        tmp_path / "train.parquet",
        tmp_path / "valid.csv",
        tmp_path / "run",
        config,
        progress=False,
    )
    assert metrics["valid"]["auc"] > 0.85  # the item effect is learnt (oracle ≈ 0.93)
    again = evaluate_run(tmp_path / "run", tmp_path / "valid.csv", device="cpu")
    json.dumps(again)
    assert again["model"] == name
    for key in ("auc", "logloss", "f1", "accuracy", "n"):
        assert again[key] == pytest.approx(metrics["valid"][key]), key
    assert 0.01 <= again["threshold"] <= 0.99
    assert again["f1"] > 0.7
