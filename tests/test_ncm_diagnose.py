"""The diagnostics behind docs/ncm.md: within-slate marginals, and what the readout learns."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from models.ncm.data import encode_sessions, fit_slate_vocabs, iter_batches
from models.ncm.diagnose import diagnose, within_slate_marginals
from models.ncm.models import NCM, NCMConfig
from models.ncm.task import SlateTask
from models.training.loop import TrainConfig, fit

torch.set_num_threads(1)


def test_within_slate_marginals_match_enumeration() -> None:
    base = np.array([0.6, 0.3, 0.8])  # a_k: click probability with no click above
    sat = 0.4
    expected = np.zeros(3)
    for seq in itertools.product([0, 1], repeat=3):  # every click sequence and its probability
        prob, above = 1.0, 0
        for k, c in enumerate(seq):
            p = base[k] * sat**above
            prob *= p if c else 1 - p
            above += c
        expected += prob * np.array(seq)
    # The function sees one observed slate: its clicks and the conditional probabilities.
    clicks = np.array([[1, 0, 1]])
    conditional = base * sat ** np.array([0, 1, 1])
    marginal = within_slate_marginals(conditional[None], clicks, sat)
    assert np.allclose(marginal[0], expected)


def cascade_world(n_sessions: int, seed: int) -> pd.DataFrame:
    """At most one click per slate: the first attractive item examined is clicked, and then
    the user leaves the slate. Knowing the clicks above settles every position below."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        for t in range(5):
            items = rng.choice(30, 5, replace=False)
            attractive = rng.random(5) < np.where(items < 10, 0.9, 0.15)
            clicks = np.zeros(5, dtype=int)
            if attractive.any():
                clicks[int(np.argmax(attractive))] = 1
            rows.append(
                {
                    "user_id": f"u{s}",
                    "session_id": f"s{s}",
                    "slate_index": t,
                    "item_ids": [f"i{i}" for i in items],
                    "category_ids": ["c"] * 5,
                    "clicks": clicks.tolist(),
                }
            )
    return pd.DataFrame(rows)


def test_the_readout_pays_when_the_clicks_above_are_known() -> None:
    train, test = cascade_world(150, seed=1), cascade_world(50, seed=2)
    vocabs = fit_slate_vocabs(train)
    task = SlateTask(
        encode_sessions(train, vocabs, 5), encode_sessions(test, vocabs, 5), batch_size=20
    )
    torch.manual_seed(0)
    model = NCM({n: len(v) for n, v in vocabs.items()}, NCMConfig(dim=16))
    fit(model, task, TrainConfig(epochs=4, lr=0.02, device="cpu"), progress=False)
    batches = list(iter_batches(task.valid, 64, evaluation=True))
    aucs = diagnose(model, batches, samples=4)
    assert set(aucs) == {"protocol", "history", "informed", "sampled"}
    # A click above means no click below: with the true clicks above the model is far better.
    assert aucs["informed"] > aucs["protocol"] + 0.02
    assert aucs["sampled"] == pytest.approx(aucs["protocol"], abs=0.05)
