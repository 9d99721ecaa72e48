"""This process's place in a data-parallel run, and the few collectives training needs.

A run started by `torchrun` (or `ctr train --nproc N`, which starts torchrun) finds RANK,
WORLD_SIZE and LOCAL_RANK in its environment and joins a process group: NCCL when it trains on
CUDA (one GPU per local rank), gloo on CPU. Any other run is one rank of a world of one, and
every collective below is then a no-op, so the training code has one path.

Two groups, because they wait differently:

* the default group (NCCL or gloo) carries DDP's gradient all-reduce, with torch's default
  timeout, so a hung peer is noticed;
* a gloo group on the CPU carries everything else (stop flags, epoch sums, gathered
  predictions, objects), with a timeout long enough for rank 0 to prepare the data while the
  others wait at a barrier (counting and encoding 100M rows takes the better part of an hour).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

PREPARE_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """rank / world of this process, its device, and the CPU group for collectives."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cpu_group: Any = None  # a gloo ProcessGroup when world > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that prepares data, prints and writes."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.cpu_group)

    def any(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag OR-ed over the ranks."""
        return [value > 0 for value in self._reduce([float(f) for f in flags], dist.ReduceOp.MAX)]

    def sum(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def gather_rows(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each array concatenated over the ranks along axis 0, in rank order; the ranks'
        arrays may differ in length (not in their other axes)."""
        if self.world == 1:
            return list(arrays)
        lengths = [int(n) for n in self._all_gather(torch.tensor([len(arrays[0])]))]
        longest = max(lengths)
        out = []
        for array in arrays:
            padded = torch.zeros((longest, *array.shape[1:]), dtype=torch.float64)
            padded[: len(array)] = torch.from_numpy(array.astype(np.float64))
            parts = self._all_gather(padded).reshape(self.world, longest, *array.shape[1:])
            joined = torch.cat([parts[r, : lengths[r]] for r in range(self.world)])
            out.append(joined.numpy().astype(array.dtype))
        return out

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value, group=self.cpu_group)
        return gathered

    def share_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (e.g. running statistics) copied to every rank. DDP copies them
        at the start of each forward, so after the last step each rank holds its own update;
        evaluating with one set makes every rank score with the model rank 0 saves."""
        if self.world == 1:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` under DistributedDataParallel when there are several ranks."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(tensor, op=op, group=self.cpu_group)
        return [float(v) for v in tensor]

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.cpu_group)
        return torch.stack(parts)


def launched_world() -> int:
    """WORLD_SIZE set by torchrun, 1 when this process was not started by it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Joins the process group of a torchrun launch for the run's duration (a world of one
    needs none). `device`: the device asked for; under torchrun a CUDA device becomes
    cuda:LOCAL_RANK."""
    if launched_world() == 1:
        yield Ranks(device=device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        cpu_group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
        yield Ranks(dist.get_rank(), dist.get_world_size(), device, cpu_group)
    finally:
        dist.destroy_process_group()
