"""Which rows each rank trains on in an epoch, and in which order, with bounded memory.

The order of an epoch is a function of (seed, epoch, world size, rank) and nothing else, so a
run is repeatable and a resumed run can start at any batch without replaying the ones before:

1. The rows are cut into blocks of `block_rows` consecutive rows; each epoch permutes the
   blocks with its own seed. Laid end to end, the permuted blocks are the epoch's sequence.
2. Rank r takes positions [r·P, (r+1)·P) of that sequence, P = rows // world: every rank gets
   the same number of rows (DDP needs the same number of steps everywhere); the rows % world
   positions at the end, different rows each epoch, sit the epoch out.
3. A rank's part is cut into windows of `window_rows` positions; each window's rows are read
   (one read per block run, `Shards.read_runs`) and permuted with a seed of (seed, epoch, rank,
   window). The window is the shuffle buffer: memory holds one window (and its permuted copy),
   never the data set. Batches are consecutive slices of the windows laid end to end.

Shuffle quality: a window mixes window_rows / block_rows blocks drawn from anywhere in the data
set, e.g. 128 blocks of 1,024 rows for the defaults. When the rows fit in one window, the epoch
is a full permutation, as the in-memory path's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from models.data.encode import BehaviorArrays, rebatch
from models.data.stream.shards import Shards

BLOCK_ROWS = 1024
WINDOW_ROWS = 131_072  # the shuffle buffer, in rows (`ctr train --shuffle-buffer`)


@dataclass(frozen=True)
class EpochOrder:
    """The epoch orders of `rows` rows for one rank (module docstring)."""

    rows: int
    seed: int = 0
    world: int = 1
    rank: int = 0
    block_rows: int = BLOCK_ROWS
    window_rows: int = WINDOW_ROWS

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")
        if self.block_rows < 1 or self.window_rows < 1:
            raise ValueError("block_rows and window_rows must be at least 1")

    @property
    def rank_rows(self) -> int:
        """Rows this rank trains on per epoch (the same on every rank)."""
        return self.rows // self.world

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.rank_rows / batch_size)

    def windows(self, epoch: int, skip: int = 0) -> Iterator[tuple[list[tuple[int, int]], int]]:
        """(row runs to read, 0-based window number) of every window holding a position at or
        after `skip` (0-based, within this rank's part)."""
        blocks = self._blocks(epoch)
        begin = self.rank * self.rank_rows
        for number in range(skip // self.window_rows, math.ceil(self.rank_rows / self.window_rows)):
            start = begin + number * self.window_rows
            stop = min(start + self.window_rows, begin + self.rank_rows)
            yield blocks.runs(start, stop), number

    def permutation(self, epoch: int, window: int, size: int) -> np.ndarray:
        """The shuffle of one window's `size` rows."""
        return np.random.default_rng([self.seed, epoch, self.rank, window]).permutation(size)

    def _blocks(self, epoch: int) -> _BlockSequence:
        count = math.ceil(self.rows / self.block_rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(count)
        return _BlockSequence(order, self.block_rows, self.rows)


@dataclass(frozen=True)
class _BlockSequence:
    """Blocks laid end to end in `order`; maps a range of positions to runs of rows."""

    order: np.ndarray  # [blocks] block numbers in sequence order
    block_rows: int
    rows: int

    def runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        sizes = np.minimum(self.block_rows, self.rows - self.order * self.block_rows)  # [blocks]
        ends = np.cumsum(sizes)  # [blocks] position after each block of the sequence
        out = []
        block = int(np.searchsorted(ends, start, side="right"))
        while start < stop:
            first = int(ends[block] - sizes[block])  # position of the block's first row
            take = min(stop, int(ends[block])) - start
            row = int(self.order[block]) * self.block_rows + (start - first)
            out.append((row, row + take))
            start += take
            block += 1
        return out


def train_rows(
    shards: Shards, order: EpochOrder, epoch: int, batch_size: int, skip_batches: int = 0
) -> Iterator[BehaviorArrays]:
    """This rank's rows of the epoch, `batch_size` at a time, from batch `skip_batches` on."""
    return rebatch(_windows(shards, order, epoch, skip_batches * batch_size), batch_size)


def _windows(shards: Shards, order: EpochOrder, epoch: int, skip: int) -> Iterator[BehaviorArrays]:
    """The shuffled windows of the epoch from position `skip` on."""
    for runs, number in order.windows(epoch, skip):
        window = shards.read_runs(runs)
        shuffled = window.take(order.permutation(epoch, number, len(window)))
        del window  # memory: one window and its shuffled copy, never two windows
        yield shuffled.take(slice(max(skip - number * order.window_rows, 0), None))


def rank_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous part [start, stop) of `rows` that rank evaluates (sizes differ by <= 1)."""
    return rows * rank // world, rows * (rank + 1) // world


def sequential_rows(
    shards: Shards, start: int, stop: int, batch_size: int
) -> Iterator[BehaviorArrays]:
    """Rows [start, stop) in order, `batch_size` at a time (evaluation)."""
    for first in range(start, stop, batch_size):
        yield shards.read(first, min(first + batch_size, stop))
