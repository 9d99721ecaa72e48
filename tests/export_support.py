"""Helpers of the export tests: tiny data files and run directories for every model.

A run directory here is written by the project's own `save_run` (the format `ctr train`
writes) from a model whose every float parameter and buffer has been perturbed with seeded
noise: Dice α and running statistics, FAT's bases and routers, zero-initialised biases all
take non-trivial values, so the parity check exercises every path of the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.data.dataset import fit_vocabularies
from models.ncm.data import fit_slate_vocabs, longest_slate
from models.registry import BEHAVIOR_MODELS, is_slate_model, model_class
from models.training.checkpoint import config_from_dict, save_run
from models.training.loop import TrainConfig
from runtime.features import FeatureSpec, vocab_sizes

# Small configs keep export + parity of all eleven models within seconds on 2 shared cores.
TINY: dict[str, dict[str, Any]] = {
    "sarn": {
        "embedding_dim": 6,
        "relation_width": 8,
        "attention_hidden": 8,
        "hidden_dims": (8, 4),
        "recent_items": 2,
    },
    "fat": {
        "d": 8,
        "heads": 2,
        "layers": 2,
        "d_ff": 16,
        "num_bases": 4,
        "meta_dim": 4,
        "top_k": 2,
        "recent_tokens": 2,
        "history_recency": 3,
        "auxiliary_weight": 1.0,  # training only: the export must leave it out
        "tower_hidden": 8,
    },
    "din": {"embed_dim": 4, "context_dim": 4, "attention_hidden": (8, 4), "mlp_hidden": (8, 4)},
    "gru": {"embed_dim": 4, "context_dim": 4, "mlp_hidden": (8, 4)},
    "wdl": {
        "embed_dim": 4,
        "user_dim": 4,
        "context_dim": 4,
        "mlp_hidden": (8, 4),
        "cross_buckets": 101,
    },
}
SLATE_TINY: dict[str, Any] = {"dim": 8}
HISTORY_LEN = 8
DEVICES = ["ios", "android", "web"]


def behaviour_frame(n: int, seed: int, n_items: int = 40, n_users: int = 12) -> pd.DataFrame:
    """Rows in positive/negative pairs that share a user and a history (like the simulator)."""
    rng = np.random.default_rng(seed)
    rows = []
    for pair in range(n // 2):
        length = int(rng.integers(0, 2 * HISTORY_LEN))
        items = rng.integers(0, n_items, length)
        user, device = f"u{rng.integers(n_users)}", DEVICES[pair % 3]
        for label in (1, 0):
            target = int(rng.integers(n_items))
            rows.append(
                {
                    "user_id": user,
                    "item_id": f"i{target}",
                    "category_id": f"c{target % 7}",
                    "hist_item_ids": [f"i{i}" for i in items],
                    "hist_category_ids": [f"c{i % 7}" for i in items],
                    "label": label,
                    "context_device": device,
                }
            )
    frame = pd.DataFrame(rows)
    # A third of the clicks convert (own stream: the click columns do not depend on it).
    converted = np.random.default_rng(seed + 1).random(len(frame)) < 0.3
    frame["conversion"] = (converted & (frame["label"] == 1)).astype(np.int64)
    return frame


def slate_frame(sessions: int, seed: int, n_items: int = 40, k: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(sessions):
        for t in range(int(rng.integers(2, 6))):
            items = rng.integers(0, n_items, int(rng.integers(2, k + 1)))
            rows.append(
                {
                    "user_id": f"u{s % 9}",
                    "session_id": f"s{s}",
                    "slate_index": t,
                    "item_ids": [f"i{i}" for i in items],
                    "category_ids": [f"c{i % 5}" for i in items],
                    "clicks": [int(c) for c in rng.random(len(items)) < 0.3],
                }
            )
    return pd.DataFrame(rows)


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen) * scale
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith("click_threshold"):
                continue
            else:
                tensor.add_(noise)


def make_run(
    run_dir: Path, name: str, data: Path, seed: int = 0, tasks: tuple[str, ...] = ("ctr",)
) -> Path:
    """A run directory for `name` fitted on `data` (a parquet written by the frames above);
    `tasks` for a behaviour model's towers (("ctr", "cvr"): multi-task)."""
    frame = pd.read_parquet(data)
    cls = model_class(name)
    if is_slate_model(name):
        vocabs = fit_slate_vocabs(frame)
        spec = FeatureSpec(slate_size=longest_slate(frame))
        overrides = SLATE_TINY
    else:
        vocabs = fit_vocabularies(frame, ["device"])
        spec = FeatureSpec(history_len=HISTORY_LEN, context_fields=["device"])
        overrides = {**TINY[name], "tasks": tasks}
    model_config = config_from_dict(cls.config_class, dict(overrides))
    sizes = vocab_sizes(vocabs)
    torch.manual_seed(seed)
    model = cls(sizes, model_config)
    perturb(model, seed)
    save_run(
        run_dir,
        name=name,
        model=model.eval(),
        model_config=model_config,
        train_config=TrainConfig(history_len=spec.history_len),
        sizes=sizes,
        spec=spec,
        vocabs=vocabs,
        metrics={"valid": {"auc": 0.5}, "best_epoch": 1},
    )
    return run_dir


def write_data(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """-> (behaviour parquet, slates parquet)."""
    directory.mkdir(parents=True, exist_ok=True)
    behaviour, slates = directory / "behavior.parquet", directory / "slates.parquet"
    behaviour_frame(160, seed).to_parquet(behaviour)
    slate_frame(30, seed).to_parquet(slates)
    return behaviour, slates


ALL = [*BEHAVIOR_MODELS, "ncm-lr", "ncm-gru", "ncm", "ncm-adv", "scot", "ncm-tgru"]
