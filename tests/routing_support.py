"""Shared helpers of the routing, shadow and reload tests.

`ab_repo` is a private copy of a repository holding two really different SARN versions (v1 from
the session's fixture, v2 trained with another seed and a longer history) and the NCM, built
once per session through the real pipeline. `start_server` launches `ctr serve` as a real
uvicorn process (torch made unimportable, as in test_service_e2e), optionally with the shadow
fault injection of `shadow_fault`. `publish_copy` publishes an existing version again under a
new number through the repository's atomic publish, optionally altered on the way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.repository import MANIFEST, publish, write_manifest
from service.processes import NotReady, free_port, http_ok, stop_process, wait_until

TESTS = Path(__file__).resolve().parent
ADMIN = "routing-admin"
LAUNCH = (
    f"import os, sys; sys.modules['torch'] = None; sys.path.insert(0, {str(TESTS)!r})\n"
    "if os.environ.get('SLATECTR_TEST_FAULT_FILE'):\n"
    "    import shadow_fault; shadow_fault.install(__import__('pathlib').Path("
    "os.environ['SLATECTR_TEST_FAULT_FILE']))\n"
    "sys.argv = ['ctr', 'serve']\n"
    "from slatectr.cli import main; main()\n"
)


@pytest.fixture(scope="session")
def ab_template(service_model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sarn v1 (the session's), sarn v2 (seed 1, history_len 14), ncm v1."""
    import torch

    from exporters.pipeline import ExportOptions, export_run
    from models.training.loop import train_config_for
    from models.training.run import train_run

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ab-template")
    shutil.copytree(service_model_repo, root / "repo")
    world = service_model_repo.parent / "world" / "behavior"
    config = train_config_for("sarn", epochs=1, batch_size=64, history_len=14, device="cpu", seed=1)
    tiny = {
        "embedding_dim": 4,
        "relation_width": 4,
        "attention_hidden": 4,
        "hidden_dims": (8,),
        "regression_hidden": 4,
    }
    train_run(
        "sarn",
        world / "train.parquet",
        world / "test.parquet",
        root / "sarn2",
        config,
        tiny,
        progress=False,
    )
    export_run(root / "sarn2", root / "repo", ExportOptions(name="sarn", version=2))
    return root / "repo"


@pytest.fixture
def ab_repo(ab_template: Path, tmp_path: Path) -> Path:
    shutil.copytree(ab_template, tmp_path / "repo")
    return tmp_path / "repo"


def publish_copy(
    repo: Path,
    name: str,
    source: Path,
    version: int,
    alter: Callable[[Path], None] | None = None,
    damage: Callable[[Path], None] | None = None,
) -> Path:
    """Publishes the version directory `source` as `name` v`version` (atomic rename);
    `alter(dir)` may change the files first (the manifest's hashes are recomputed after it: a
    consistent but different model); `damage(dir)` changes them after the manifest is written
    (files that no longer fit it, e.g. `corrupt`). Either way the version appears complete."""

    def write(tmp: Path, number: int) -> None:
        for path in source.iterdir():
            shutil.copy2(path, tmp / path.name)
        if alter is not None:
            alter(tmp)
        manifest = json.loads((tmp / MANIFEST).read_text())
        write_manifest(tmp, {**manifest, "version": number})
        if damage is not None:
            damage(tmp)

    directory, _ = publish(repo, name, version, write)
    return directory


def corrupt(directory: Path) -> None:
    """Flips bytes in the middle of model.onnx: its sha256 no longer fits the manifest."""
    path = directory / "model.onnx"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def nan_weights(directory: Path) -> None:
    """Every float initializer of every graph (each serving layout) becomes NaN: a model that
    loads but cannot warm up, whichever graph the loader picks."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    for path in directory.glob("*.onnx"):
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            values = numpy_helper.to_array(init)
            if values.dtype == np.float32:
                init.CopyFrom(numpy_helper.from_array(np.full_like(values, np.nan), init.name))
        onnx.save(model, str(path))


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def admin(self, path: str, **kwargs: Any) -> httpx.Response:
        with self.client() as client:
            return client.post(path, headers={"X-API-Key": ADMIN}, **kwargs)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with self.client() as client:
            return parse_metrics(client.get("/metrics").text)

    def stop(self) -> None:
        stop_process(self.process, 20)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and wanted <= set(lab))


def launch(repo: Path, log: Path, **env: str) -> Server:
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
    environment |= {
        "CTR_REPO": str(repo),
        "CTR_PORT": str(port),
        "CTR_DEFAULT_MODEL": "sarn",
        "CTR_ADMIN_API_KEYS": ADMIN,
        "CTR_REQUEST_TIMEOUT_MS": "5000",
        "CTR_INTRA_OP_THREADS": "1",
        **env,
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH], env=environment, stdout=sink, stderr=sink
        )
    return Server(process, f"http://127.0.0.1:{port}", log)


def wait_ready(server: Server, timeout_s: float = 90) -> Server:
    try:
        url = f"{server.url}/readyz"
        wait_until(lambda: http_ok(url, 1), timeout_s, server.process, 0.1, "ctr serve")
    except NotReady as exc:
        server.stop()
        raise AssertionError(f"{exc}:\n{server.log.read_text()[-4000:]}") from None
    return server


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """`start_server(repo, **env)` -> a ready server, stopped after the test."""
    started: list[Server] = []

    def start(repo: Path, **env: str) -> Server:
        server = launch(repo, tmp_path / f"server-{len(started)}.log", **env)
        started.append(server)
        return wait_ready(server)

    yield start
    for server in started:
        server.stop()


def wait_for(condition: Callable[[], bool], timeout_s: float = 15, what: str = "") -> None:
    try:
        wait_until(condition, timeout_s, interval_s=0.02, what=what)
    except NotReady:
        raise AssertionError(f"timed out waiting for {what}") from None


def items(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"item_id": i, "category_id": c} for i, c in pairs]
