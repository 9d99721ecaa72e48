"""Checkpoints to resume an unfinished run from, loaded without executing code.

A snapshot is everything that decides the rest of a run: the model, the best epoch's model,
the optimizer's state (Adam's moments and step counts), where the loop is (epoch, batches done
in it, the partial sums of its loss), the epochs so far and the best one, and every rank's
random streams (torch's generator, the CUDA one, and the task's own, e.g. the negative
sampler's). The data order needs no state: it is a function of (seed, epoch, rank), see
`models.data.stream.order`. So a resumed run continues with the very batch, weights and random
draws the interrupted one would have used next, and ends where it would have ended.

Tensors go to `state.safetensors`, everything else to `state.json`; neither format runs code
when read (torch.save's pickle would). `RUN/resume/` holds numbered snapshot directories and
`latest.json`, which names the newest complete one and is replaced atomically after that
snapshot is fully written: a run killed while writing resumes from the one before.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

RESUME_DIR = "resume"
LATEST = "latest.json"
KEEP = 2  # snapshot directories kept: the newest and the one before


@dataclass
class LoopState:
    """Where the training loop is; JSON."""

    epoch: int = 1  # the epoch being trained, from 1
    step: int = 0  # batches of it already trained (on every rank)
    history: list[dict[str, Any]] = field(default_factory=list)  # finished epochs' records
    best_epoch: int = 0
    best_score: float = -math.inf
    best_valid: dict[str, float] = field(default_factory=dict)
    finished: bool = False  # all epochs done, or stopped early


@dataclass
class EpochSums:
    """One rank's running totals of the epoch being trained; JSON."""

    losses: dict[str, float] = field(default_factory=dict)  # loss parts summed over its steps
    samples: int = 0
    seconds: float = 0.0  # training time (a resumed epoch adds the time before the stop)


@dataclass
class RankState:
    """One rank's random streams and epoch totals."""

    torch_rng: Tensor  # torch.get_rng_state()
    cuda_rng: Tensor | None  # torch.cuda.get_rng_state() on a CUDA rank
    task_rng: dict[str, Any]  # TrainingTask.rng_state(), JSON
    sums: EpochSums


@dataclass
class Snapshot:
    loop: LoopState
    model: dict[str, Tensor]
    best_model: dict[str, Tensor] | None
    optimizer: dict[str, Any]  # torch.optim.Optimizer.state_dict()
    ranks: list[RankState]
    fingerprint: dict[str, Any]  # what the run is (model, configs, data, world size)


def save_snapshot(run_dir: Path, snapshot: Snapshot) -> Path:
    """Writes a new snapshot directory, then points latest.json at it; keeps the last KEEP."""
    root = run_dir / RESUME_DIR
    name = f"step-{_next_number(root):06d}"
    directory = root / name
    directory.mkdir(parents=True)
    tensors, meta = _split(snapshot)
    save_file(tensors, str(directory / "state.safetensors"))
    (directory / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    temporary = root / f"{LATEST}.tmp"
    temporary.write_text(json.dumps({"snapshot": name}) + "\n")
    os.replace(temporary, root / LATEST)
    for old in sorted(p for p in root.iterdir() if p.is_dir())[:-KEEP]:
        shutil.rmtree(old)
    return directory


def load_snapshot(run_dir: Path) -> Snapshot | None:
    """The newest complete snapshot of the run, None when it has none."""
    root = run_dir / RESUME_DIR
    try:
        name = json.loads((root / LATEST).read_text())["snapshot"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    meta = json.loads((root / name / "state.json").read_text())
    tensors = load_file(str(root / name / "state.safetensors"))
    return _join(tensors, meta)


def clear_snapshots(run_dir: Path) -> None:
    shutil.rmtree(run_dir / RESUME_DIR, ignore_errors=True)


def _next_number(root: Path) -> int:
    numbers = [int(p.name.split("-")[1]) for p in root.glob("step-*") if p.is_dir()]
    return max(numbers, default=0) + 1


def _split(snapshot: Snapshot) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors under flat names for safetensors, the rest as JSON."""
    tensors = {f"model.{k}": v for k, v in snapshot.model.items()}
    tensors.update({f"best.{k}": v for k, v in (snapshot.best_model or {}).items()})
    optimizer_json, optimizer_tensors = _split_optimizer(snapshot.optimizer)
    tensors.update(optimizer_tensors)
    ranks = []
    for rank, state in enumerate(snapshot.ranks):
        tensors[f"rng.{rank}.torch"] = state.torch_rng
        if state.cuda_rng is not None:
            tensors[f"rng.{rank}.cuda"] = state.cuda_rng
        ranks.append({"task_rng": state.task_rng, "sums": asdict(state.sums)})
    meta = {
        "loop": asdict(snapshot.loop),
        "has_best": snapshot.best_model is not None,
        "optimizer": optimizer_json,
        "ranks": ranks,
        "fingerprint": snapshot.fingerprint,
    }
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta


def _join(tensors: dict[str, Tensor], meta: dict[str, Any]) -> Snapshot:
    def under(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    ranks = [
        RankState(
            torch_rng=tensors[f"rng.{rank}.torch"],
            cuda_rng=tensors.get(f"rng.{rank}.cuda"),
            task_rng=state["task_rng"],
            sums=EpochSums(**state["sums"]),
        )
        for rank, state in enumerate(meta["ranks"])
    ]
    return Snapshot(
        loop=LoopState(**meta["loop"]),
        model=under("model."),
        best_model=under("best.") if meta["has_best"] else None,
        optimizer=_join_optimizer(meta["optimizer"], under("optimizer.")),
        ranks=ranks,
        fingerprint=meta["fingerprint"],
    )


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """optimizer.state_dict() -> (JSON: param_groups and per-parameter non-tensor values,
    tensors named optimizer.<param>.<name>)."""
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for param, values in state["state"].items():
        plain[str(param)] = {}
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{param}.{name}"] = value
            else:
                plain[str(param)][name] = value
    return {"param_groups": state["param_groups"], "state": plain}, tensors


def _join_optimizer(meta: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(p): dict(v) for p, v in meta["state"].items()}
    for key, value in tensors.items():
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
