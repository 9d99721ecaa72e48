"""What `ctr bench gpu` measures and at which sizes: the GPU run's sizes, and the dry run's.

Both use the models' default configurations, the ones the targets speak of (a throughput
target met by a shrunken SARN would say nothing) and the ones the service runs. The GPU sizes
are the issue's: K = 100 and 500, L = 50, 1 to 128 users per call, a 1,000-user world. The
dry run keeps the architectures and shrinks everything else — a 100-user world, L = 10, a
2 × 2 grid, 2 s of load — so that every step runs on two CPU cores in about a minute.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

Precision = Literal["fp32", "fp16"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
MODELS = ("sarn", "fat", "din", "ncm")
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16")


@dataclass(frozen=True)
class CheckConfig:
    out: Path  # report.json and report.md
    work: Path | None = None  # world, runs, repository, load-test reports; default OUT/work
    dry_run: bool = False  # CPU provider everywhere; GPU figures reported absent
    repo: Path | None = None  # take the models from this repository (needs `world`)
    world: Path | None = None  # the world those models were trained on
    models: tuple[str, ...] = MODELS
    # --- the models the check builds: a small world, a few hundred steps each ---------------
    world_users: int = 1000
    world_items: int = 1000
    world_categories: int = 50
    world_events: int = 50  # clicks per user
    world_sessions: int = 10  # slate sessions per user (NCM's training samples)
    epochs: int = 2
    batch_size: int = 512  # behaviour rows per step
    slate_batch_size: int = 64  # sessions per step: a session holds S·K slots
    # --- parity -----------------------------------------------------------------------------
    parity_tolerance: float = 1e-4  # fp32, ORT on the device vs ORT CPU and vs PyTorch
    auc_rows: int = 20_000  # validation rows for the fp16 AUC
    # --- raw ONNX Runtime throughput ---------------------------------------------------------
    slates: tuple[int, ...] = (100, 500)  # K, candidates per user
    users: tuple[int, ...] = (1, 8, 32, 128)  # users per call
    history: int = 50  # L, history items per user (also the models' history_len)
    precisions: tuple[Precision, ...] = PRECISIONS
    repeats: int = 20  # timed calls per cell at most ...
    cell_seconds: float = 0.3  # ... fewer once they take longer than this (at least 5):
    # 128 cells (4 models × 2 precisions × 2 K × 4 U × 2 bindings) must fit a short lease
    # --- the service under load ---------------------------------------------------------------
    service_model: str = "sarn"
    service_slate: int = 100  # K of the load test's requests
    concurrency: int = 64  # closed-loop locust users at saturation
    load_seconds: float = 10.0  # per measurement (saturation, then half of it)
    settle_s: float = 2.0  # left out of each measurement's window
    locust_workers: int = 4  # locust processes (0: one); the GPU host has 16 cores
    seed: int = 0

    @property
    def work_dir(self) -> Path:
        return self.work if self.work is not None else self.out / "work"

    @property
    def provider(self) -> str:
        """The execution provider the device figures are measured on."""
        return CPU if self.dry_run else CUDA

    @property
    def providers(self) -> list[str]:
        """What device sessions ask for: CUDA with the CPU for the ops CUDA lacks (as the
        service does), or the CPU alone in the dry run."""
        return [CUDA, CPU] if self.provider == CUDA else [CPU]


def dry_run_config(config: CheckConfig) -> CheckConfig:
    """`config` at the dry run's sizes (see the module docstring), on the CPU provider."""
    return replace(
        config,
        dry_run=True,
        world_users=100,
        world_items=100,
        world_categories=8,
        world_events=12,
        world_sessions=6,
        epochs=2,
        batch_size=64,
        slate_batch_size=32,
        auc_rows=2_000,
        slates=(8, 16),
        users=(1, 4),
        history=10,
        repeats=3,
        cell_seconds=0.05,
        service_slate=8,
        concurrency=2,
        load_seconds=2.0,
        settle_s=0.5,
        locust_workers=0,
    )


def make_config(out: Path, dry_run: bool, **given: Any) -> CheckConfig:
    """The GPU sizes, or the dry run's, then whatever the command line gave (None: not
    given), so that `--dry-run --users 1,2` keeps the dry run's other sizes."""
    config = CheckConfig(out=out)
    if dry_run:
        config = dry_run_config(config)
    return replace(config, **{key: value for key, value in given.items() if value is not None})


def failure(exc: BaseException) -> str:
    """An exception as the report records it: its type and message, cut to a readable size."""
    return f"{type(exc).__name__}: {exc}"[:1000]
