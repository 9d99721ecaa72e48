"""Peer benchmark: DeepCTR-Torch 0.3.0's DIN, Wide&Deep and DIEN, and a popularity floor, on
behaviour sample files (train / valid / test Parquet in the project's schema, e.g. written by
`ctr data movielens`); docs/models.md "MovieLens-100k" has the table it produced.

Like the Triton peer (loadtest/triton/peer.py), it runs in its own venv, by path, and imports
nothing from the project: `make venv-peers` builds .venv-peers from
requirements/peers-deepctr.txt, then

    nice -n 10 .venv-peers/bin/python models/bench/peer_deepctr.py --data data/movielens \
        --out reports/peers.jsonl --models pop,wdl,din,dien --seeds 0,1,2 --epochs 30

one thread, one run at a time; one JSON line is appended per run (the learning curve, the
environment and the data files' sha256 in every line).

Protocol (same for every model): embedding 18, Adam lr 2e-3, batch 256, DeepCTR's own
`fit` loop (sum-reduced BCE + its L2 terms), one epoch per `fit` call; after each epoch the
validation AUC is measured and the best epoch's weights are kept (a copy of the state dict);
training stops after `--epochs` epochs or `--patience` epochs without a better validation
AUC; the kept weights are scored once on the test file.

Inputs given to the peers: target item and category (SparseFeat), history items and
categories (VarLenSparseFeat, max length L, `seq_length` length column), and for DIEN with
negative sampling the sampled non-clicked history (`neg_hist_*`). No user id: the split is by
user, so every validation and test user is out of vocabulary and a user embedding carries
nothing to test time. Vocabularies are fitted on the training split only (index 0 padding,
1 out of vocabulary), as the project's `models/data/dataset.py` does.

DeepCTR-Torch's `__init__` starts a thread that asks pypi.python.org for the latest release
(and imports `requests`, which it does not declare: the requirements file adds it). There is no
switch for it; this script puts a no-op `deepctr_torch.utils` module into `sys.modules` before
the import, so `check_version` is never called and nothing is sent, and it also replaces
`requests`' request functions with ones that raise (nothing here uses `requests`; if anything
tried, the run fails loudly instead of calling out).

DIEN: with DeepCTR's default `init_std=1e-4` (far below Adam's first steps of about lr) some
seeds end with every unit of the DNN's last hidden layer dead: constant predictions, AUC 0.5,
the "one seed never left 0.5" of issue 21. `--init-std 0.01` (DeepCTR's own constructor
argument) is the setting for DIEN runs. Every epoch logs the prediction sd (`valid_pred_sd`), so
a collapse shows in the output instead of being averaged into a mean.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sklearn.metrics import log_loss, roc_auc_score

# ----------------------------------------------------------------------------- no calling home


def _no_network(*args: object, **kwargs: object) -> None:
    raise RuntimeError("peers.py: network access is disabled in this process")


def import_deepctr() -> types.ModuleType:
    """deepctr_torch without its PyPI version check (see the module docstring)."""
    stub = types.ModuleType("deepctr_torch.utils")
    stub.check_version = lambda version: None  # type: ignore[attr-defined]
    sys.modules["deepctr_torch.utils"] = stub
    import requests  # deepctr-torch 0.3.0 imports it without declaring it

    requests.get = requests.post = requests.request = _no_network  # type: ignore[assignment]
    requests.Session.request = _no_network  # type: ignore[assignment,method-assign]
    import deepctr_torch

    return deepctr_torch


# ----------------------------------------------------------------------------- data

PAD, OOV = 0, 1


class Vocab:
    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = np.sort(np.unique(tokens))
        self.index = {t: i + 2 for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens) + 2

    def encode(self, values: np.ndarray) -> np.ndarray:
        get = self.index.get
        return np.fromiter((get(v, OOV) for v in values), dtype=np.int64, count=len(values))


def read_split(path: Path) -> pd.DataFrame:
    table = pq.read_table(
        path,
        columns=[
            "user_id",
            "item_id",
            "category_id",
            "hist_item_ids",
            "hist_category_ids",
            "label",
        ],
    )
    return table.to_pandas()


def padded(vocab: Vocab, lists: pd.Series, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> [n, max_len] int64 left-aligned, 0-padded (the newest max_len kept),
    and [n] lengths."""
    kept = [x[-max_len:] for x in lists]
    lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
    flat = vocab.encode(np.concatenate(kept)) if lengths.sum() else np.zeros(0, np.int64)
    out = np.zeros((len(kept), max_len), dtype=np.int64)
    rows = np.repeat(np.arange(len(kept)), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out, lengths


class Encoded:
    def __init__(self, df: pd.DataFrame, items: Vocab, cats: Vocab, max_len: int) -> None:
        self.df = df
        self.item = items.encode(df["item_id"].to_numpy())
        self.cat = cats.encode(df["category_id"].to_numpy())
        self.hist_item, self.length = padded(items, df["hist_item_ids"], max_len)
        self.hist_cat, _ = padded(cats, df["hist_category_ids"], max_len)
        self.label = df["label"].to_numpy().astype(np.float32)


def negative_histories(
    enc: Encoded, item_cat: np.ndarray, n_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """DIEN's auxiliary-loss negatives: for each history position, an item (uniform over the
    training vocabulary) that the row's user never clicked in this file, and its category.
    A user's clicks are all their positive targets and history items (every rating of a user
    is in their split's file: the first as history, the rest as targets)."""
    df = enc.df
    users, user_code = np.unique(df["user_id"].to_numpy(), return_inverse=True)
    clicked = np.zeros((users.size, n_items), dtype=bool)
    pos = enc.label == 1
    clicked[user_code[pos], enc.item[pos]] = True
    rows = np.repeat(user_code, enc.length)
    clicked[rows, enc.hist_item[enc.hist_item > 0]] = True  # row-major: matches the repeat
    clicked[:, :2] = True  # never PAD or OOV
    mask = np.arange(enc.hist_item.shape[1])[None, :] < enc.length[:, None]
    owner = np.broadcast_to(user_code[:, None], mask.shape)[mask]
    draw = rng.integers(2, n_items, owner.size)
    redo = clicked[owner, draw]
    while redo.any():
        draw[redo] = rng.integers(2, n_items, int(redo.sum()))
        redo[redo] = clicked[owner[redo], draw[redo]]
    neg_item = np.zeros_like(enc.hist_item)
    neg_item[mask] = draw
    neg_cat = np.where(mask, item_cat[neg_item], 0)
    return neg_item, neg_cat


# ----------------------------------------------------------------------------- models


def feature_columns(
    n_items: int, n_cats: int, max_len: int, dim: int, negatives: bool
) -> list[object]:
    """Target item and category; history items and categories as VarLenSparseFeat sharing the
    target's tables (combiner mean: what WDL pools with; DIN and DIEN attend over them
    instead); DIEN's negative histories likewise."""
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

    cols: list[object] = [
        SparseFeat("item_id", n_items, embedding_dim=dim),
        SparseFeat("cate_id", n_cats, embedding_dim=dim),
    ]
    prefixes = ["hist_"] + (["neg_hist_"] if negatives else [])
    for prefix in prefixes:
        for name, size in (("item_id", n_items), ("cate_id", n_cats)):
            cols.append(
                VarLenSparseFeat(
                    SparseFeat(prefix + name, size, embedding_dim=dim, embedding_name=name),
                    maxlen=max_len,
                    combiner="mean",
                    length_name="seq_length",
                )
            )
    return cols


def model_inputs(enc: Encoded, neg: tuple[np.ndarray, np.ndarray] | None) -> dict[str, np.ndarray]:
    x = {
        "item_id": enc.item,
        "cate_id": enc.cat,
        "hist_item_id": enc.hist_item,
        "hist_cate_id": enc.hist_cat,
        "seq_length": enc.length,
    }
    if neg is not None:
        x["neg_hist_item_id"], x["neg_hist_cate_id"] = neg
    return x


def build_model(name: str, cols: list[object], seed: int, args: argparse.Namespace) -> Any:
    from deepctr_torch.models import DIEN, DIN, WDL

    behavior = ["item_id", "cate_id"]
    init = {"init_std": args.init_std}  # DeepCTR's default for all three is 1e-4
    if name == "din":
        return DIN(cols, behavior, seed=seed, device="cpu", **init)
    if name == "wdl":
        return WDL(cols, cols, seed=seed, device="cpu", **init)
    if name == "dien":
        return DIEN(
            cols,
            behavior,
            gru_type=args.dien_gru,
            use_negsampling=args.dien_negatives,
            seed=seed,
            device="cpu",
            **init,
        )
    raise ValueError(name)


def clipped_adam(params: Any, lr: float, max_norm: float | None) -> Any:
    """torch Adam; with max_norm, the gradient is clipped to that global L2 norm (of the
    sum-reduced loss DeepCTR minimises) before every step."""
    import torch

    class ClippedAdam(torch.optim.Adam):
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in self.param_groups for p in g["params"]], max_norm
                )
            return super().step(closure)

    return ClippedAdam(params, lr=lr)


def predict(model: Any, x: dict[str, np.ndarray], batch: int) -> np.ndarray:
    return model.predict({k: v.copy() for k, v in x.items()}, batch).reshape(-1)


def train_one(
    name: str,
    seed: int,
    data: dict[str, Encoded],
    vocabs: tuple[Vocab, Vocab],
    item_cat: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, object]:
    import torch

    torch.set_num_threads(1)
    import_deepctr()
    items, cats = vocabs
    negatives = name == "dien" and args.dien_negatives
    cols = feature_columns(len(items), len(cats), args.max_len, args.embedding_dim, negatives)
    rng = np.random.default_rng([seed, 2])
    neg = {
        s: negative_histories(data[s], item_cat, len(items), rng) if negatives else None
        for s in ("train", "valid", "test")
    }
    x = {s: model_inputs(data[s], neg[s]) for s in data}
    y_train = data["train"].label
    model = build_model(name, cols, seed, args)
    model.compile(
        clipped_adam(model.parameters(), args.lr, args.clip_norm),
        "binary_crossentropy",
        metrics=[],
    )
    curve, best, best_state, since_best = [], -1.0, None, 0
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        e0 = time.perf_counter()
        hist = model.fit(
            {k: v.copy() for k, v in x["train"].items()},
            y_train,
            batch_size=args.batch_size,
            epochs=epoch + 1,
            initial_epoch=epoch,
            verbose=0,
            shuffle=True,
        )
        train_s = time.perf_counter() - e0
        p_valid = predict(model, x["valid"], 4096)
        auc = float(roc_auc_score(data["valid"].label, p_valid))
        spread = float(np.std(p_valid))
        curve.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(hist.history["loss"][-1]),
                "valid_auc": round(auc, 6),
                "valid_pred_sd": round(spread, 6),
                "train_s": round(train_s, 1),
                "epoch_s": round(time.perf_counter() - e0, 1),
            }
        )
        print(
            f"  {name} seed {seed} epoch {epoch + 1}: valid AUC {auc:.4f} "
            f"(pred sd {spread:.4f}), loss {curve[-1]['train_loss']:.4f}, "
            f"{curve[-1]['epoch_s']:.0f}s",
            flush=True,
        )
        if auc > best:
            best, best_state, since_best = auc, copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            if since_best >= args.patience:
                break
    wall = time.perf_counter() - t0
    model.load_state_dict(best_state)
    p_test = predict(model, x["test"], 4096)
    y_test = data["test"].label
    best_epoch = max(curve, key=lambda c: c["valid_auc"])["epoch"]
    return {
        "test_auc": round(float(roc_auc_score(y_test, p_test)), 6),
        "test_logloss": round(float(log_loss(y_test, np.clip(p_test, 1e-7, 1 - 1e-7))), 6),
        "test_pred_sd": round(float(np.std(p_test)), 6),
        "valid_auc": round(best, 6),
        "best_epoch": best_epoch,
        "epochs_run": len(curve),
        "train_wall_s": round(wall, 1),
        "curve": curve,
        "config": {
            "embedding_dim": args.embedding_dim,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "max_epochs": args.epochs,
            "patience": args.patience,
            "clip_norm": args.clip_norm,
            "init_std": args.init_std,
            **(
                {"gru_type": args.dien_gru, "use_negsampling": args.dien_negatives}
                if name == "dien"
                else {}
            ),
        },
    }


def popularity(data: dict[str, pd.DataFrame], grid: list[float]) -> dict[str, object]:
    """Target item's click rate on the training split, smoothed towards the training CTR p0 with
    m pseudo-impressions: (clicks + m·p0) / (impressions + m); m picked on validation AUC.
    An item with no training impression scores p0."""
    t0 = time.perf_counter()
    train = data["train"]
    stats = train.groupby("item_id")["label"].agg(["sum", "count"])
    p0 = float(train["label"].mean())
    scores = {}
    for m in grid:
        rate = (stats["sum"] + m * p0) / (stats["count"] + m)
        p = data["valid"]["item_id"].map(rate).fillna(p0).to_numpy()
        scores[m] = float(roc_auc_score(data["valid"]["label"], p))
    m = max(grid, key=lambda k: (scores[k], -k))
    rate = (stats["sum"] + m * p0) / (stats["count"] + m)
    p = data["test"]["item_id"].map(rate).fillna(p0).to_numpy()
    y = data["test"]["label"].to_numpy()
    return {
        "test_auc": round(float(roc_auc_score(y, p)), 6),
        "test_logloss": round(float(log_loss(y, p)), 6),
        "valid_auc": round(scores[m], 6),
        "best_epoch": None,
        "epochs_run": 0,
        "train_wall_s": round(time.perf_counter() - t0, 1),
        "config": {
            "smoothing": "(clicks + m*p0) / (impressions + m)",
            "m": m,
            "p0": p0,
            "valid_auc_by_m": {str(k): round(v, 6) for k, v in scores.items()},
        },
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="JSONL, one line appended per run")
    p.add_argument("--models", default="pop,wdl,din,dien")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10, help="most epochs per run")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--embedding-dim", type=int, default=18)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--clip-norm",
        type=float,
        default=None,
        help="clip the gradient's global norm before each Adam step (default off)",
    )
    p.add_argument(
        "--init-std",
        type=float,
        default=1e-4,
        help="std of the normal init of embeddings, DNN, GRU weights (DeepCTR: 1e-4)",
    )
    p.add_argument("--dien-gru", default="AUGRU", choices=["GRU", "AIGRU", "AGRU", "AUGRU"])
    p.add_argument(
        "--dien-negatives",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="DIEN's auxiliary loss with sampled negative histories (default on)",
    )
    p.add_argument("--train-rows", type=int, default=None, help="debug: first N train rows")
    p.add_argument("--tag", default="", help="free text stored with every row")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    t0 = time.perf_counter()
    frames = {s: read_split(args.data / f"{s}.parquet") for s in ("train", "valid", "test")}
    if args.train_rows:
        frames["train"] = frames["train"].iloc[: args.train_rows].reset_index(drop=True)
    train = frames["train"]
    items = Vocab(
        np.concatenate(
            [train["item_id"].to_numpy(), np.concatenate(train["hist_item_ids"].to_numpy())]
        )
    )
    cats = Vocab(
        np.concatenate(
            [train["category_id"].to_numpy(), np.concatenate(train["hist_category_ids"].to_numpy())]
        )
    )
    data = {s: Encoded(f, items, cats, args.max_len) for s, f in frames.items()}
    item_cat = np.zeros(len(items), dtype=np.int64)  # item index -> category index (train)
    for enc in data.values():
        item_cat[enc.item] = enc.cat
        m = enc.hist_item > 0
        item_cat[enc.hist_item[m]] = enc.hist_cat[m]
    item_cat[:2] = 0
    print(
        f"data: {', '.join(f'{s} {len(f)}' for s, f in frames.items())} rows; "
        f"{len(items)} items, {len(cats)} categories (with PAD, OOV); "
        f"{time.perf_counter() - t0:.1f}s",
        flush=True,
    )

    manifest_path = args.data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    import sklearn

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepctr_torch": import_deepctr().__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.processor()}",
        "nice": os.nice(0),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            print(f"{name} seed {seed}", flush=True)
            if name == "pop":
                result = popularity(frames, [0.1, 1, 3, 10, 30, 100])
            else:
                result = train_one(name, seed, data, (items, cats), item_cat, args)
            row = {
                "model": name,
                "seed": seed,
                **result,
                "tag": args.tag,
                "data": str(args.data),
                "data_seed": manifest.get("protocol", {}).get("seed"),
                "data_sha256": {k: v["sha256"] for k, v in manifest.get("files", {}).items()},
                "env": env,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(
                f"{name} seed {seed}: test AUC {row['test_auc']:.4f} (valid "
                f"{row['valid_auc']:.4f}, epoch {row['best_epoch']}/{row['epochs_run']}, "
                f"{row['train_wall_s']:.0f}s)",
                flush=True,
            )
            if name == "pop":
                break  # deterministic: one row stands for every seed
    return 0


if __name__ == "__main__":
    sys.exit(main())
