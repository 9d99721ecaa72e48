"""Why a slate model scores what it scores: one run, the same target positions, more protocols.

The benchmark protocol (`ctr evaluate`) hides every click of the evaluated slates: a model
predicts the *marginal* click probability of each position. The simulator's oracle instead
uses the true probability given everything that happened before the click (the clicks above
it in the slate, and those of the earlier evaluated slate). To see which information a
model uses, the target positions are scored under:

* `protocol`: as `ctr evaluate` (NCM: its default soft readout);
* `history`: the clicks of earlier evaluated slates are visible too (the session state);
* `informed`: `history` plus, for the readout models, the true clicks above each position
  (teacher-forced readout): the oracle's information;
* `sampled` (readout models): the protocol's information, but the marginal is the mean of
  σ(y_k) over `samples` free-running sampled readouts instead of the soft plug-in.

`python -m models.ncm.diagnose --run RUN --data FILE` prints one JSON line of AUCs.

For a world written by `ctr simulate`, `--world DIR` prints the ceilings beside the oracle of
`oracle.json` (which conditions on the clicks above): `marginal_oracle`, the AUC of the true
probabilities with the clicks *inside* each evaluated slate marginalised out, which is the
best any model can do under the protocol up to the session term of the earlier evaluated slate.
The slate rows carry the true conditional probabilities p_k = a_k · satisfaction^(clicks above)
(`models.simulate.slates`); a_k is recovered from them and the clicks, and the marginal
P(click_k) = Σ_n P(n clicks above) · a_k · satisfaction^n follows by dynamic programming.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from models.data.schema import load_slates
from models.ncm.base import SlateModel
from models.ncm.data import SlateBatch, context_lengths, encode_sessions, iter_batches
from models.ncm.readout import NCM
from models.training.checkpoint import load_run
from models.training.metrics import auc

Scorer = Callable[[SlateModel, SlateBatch], Tensor]  # -> click probabilities [B, S, K]


def protocol(model: SlateModel, batch: SlateBatch) -> Tensor:
    noise = torch.rand(batch.clicks.shape)
    return torch.sigmoid(model(batch.items, batch.cats, batch.mask, batch.hist_clicks, noise))


def history(model: SlateModel, batch: SlateBatch) -> Tensor:
    return protocol(model, replace(batch, hist_clicks=batch.clicks))


def informed(model: SlateModel, batch: SlateBatch) -> Tensor:
    if not isinstance(model, NCM):
        return history(model, batch)
    emb, user, _ = model.inputs(batch.items, batch.cats, batch.mask, batch.clicks)
    teach = torch.ones_like(batch.clicks)
    logits, _ = model.unroll(emb, user, batch.mask, "soft", None, batch.clicks, teach)
    return torch.sigmoid(logits)


def sampled(model: SlateModel, batch: SlateBatch, samples: int) -> Tensor:
    assert isinstance(model, NCM)
    emb, user, _ = model.inputs(batch.items, batch.cats, batch.mask, batch.hist_clicks)
    total = torch.zeros_like(batch.clicks)
    for _ in range(samples):
        noise = torch.rand(batch.clicks.shape)
        logits, _ = model.unroll(emb, user, batch.mask, "sample", noise)
        total += torch.sigmoid(logits)
    return total / samples


def target_auc(model: SlateModel, batches: Iterable[SlateBatch], score: Scorer) -> float:
    """AUC of `score` over the target positions of all batches (model in eval mode)."""
    model.eval()
    labels, probs = [], []
    with torch.no_grad():
        for batch in batches:
            probs.append(score(model, batch)[batch.target].numpy())
            labels.append(batch.clicks[batch.target].numpy())
    return auc(np.concatenate(labels), np.concatenate(probs))


def diagnose(model: SlateModel, batches: list[SlateBatch], samples: int) -> dict[str, float]:
    """-> {"protocol": auc, "history": .., "informed": .., ["sampled": ..]}."""
    torch.manual_seed(0)  # the sampling readouts are reproducible
    scorers: dict[str, Scorer] = {"protocol": protocol, "history": history, "informed": informed}
    if isinstance(model, NCM):
        scorers["sampled"] = lambda m, b: sampled(m, b, samples)
    return {name: target_auc(model, batches, score) for name, score in scorers.items()}


def within_slate_marginals(
    probs: np.ndarray, clicks: np.ndarray, satisfaction: float
) -> np.ndarray:
    """True conditional probabilities and clicks [M, K] -> marginal click probabilities [M, K]."""
    m, k = probs.shape
    above = np.cumsum(clicks, axis=1) - clicks
    base = probs / satisfaction**above  # a_k, the probability with no click above
    discount = satisfaction ** np.arange(k + 1)  # [n]
    dist = np.zeros((m, k + 1))  # P(n clicks above position j)
    dist[:, 0] = 1.0
    marginal = np.zeros((m, k))
    for j in range(k):
        moved = dist * base[:, j : j + 1] * discount  # P(n above) · P(click_j | n above)
        marginal[:, j] = moved.sum(axis=1)
        dist = dist - moved
        dist[:, 1:] += moved[:, :-1]
    return marginal


def world_ceilings(world: Path) -> dict[str, float]:
    """-> {"oracle": oracle.json's slate AUC, "marginal_oracle": see the module docstring}."""
    oracle = json.loads((world / "oracle.json").read_text())
    frame = pq.read_table(world / "slates" / "test.parquet").to_pandas()
    frame = frame.sort_values(["user_id", "session_id", "slate_index"], kind="stable")
    per_session = frame.groupby(["user_id", "session_id"], sort=False)["slate_index"]
    rank, count = per_session.cumcount().to_numpy(), per_session.transform("size").to_numpy()
    targets = frame[rank >= context_lengths(count)]
    probs = np.stack(targets["click_probs"].to_list())  # [M, K], M evaluated slates
    clicks = np.stack(targets["clicks"].to_list())
    marginal = within_slate_marginals(probs, clicks, oracle["config"]["satisfaction"])
    return {"oracle": oracle["slates"]["auc"], "marginal_oracle": auc(clicks, marginal)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="AUC of a slate run under several protocols.")
    parser.add_argument("--run", type=Path, help="a slate run directory (with --data)")
    parser.add_argument("--data", type=Path, help="slate sessions to score")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--world", type=Path, help="a `ctr simulate` directory: the ceilings")
    args = parser.parse_args(argv)
    if args.world is not None:
        print(json.dumps(world_ceilings(args.world)))
    if args.run is not None and args.data is not None:
        run = load_run(args.run)
        assert isinstance(run.model, SlateModel), f"{run.name} is not a slate model"
        sessions = encode_sessions(load_slates(args.data), run.vocabs, run.spec.slate_size)
        batches = list(iter_batches(sessions, 512, evaluation=True))
        print(json.dumps({"model": run.name, **diagnose(run.model, batches, args.samples)}))


if __name__ == "__main__":
    main()
