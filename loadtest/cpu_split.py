"""Which CPUs the service and the load generator run on (`ctr bench overhead --service-cpus
... --generator-cpus ...`).

On one set of cores the generator takes CPU from the service when the service is busiest, and
what the bench reports is the pair of them. On a host with cores to spare, the service is
measured alone by giving each its own: the service process (and the embedded redis-server it
starts) on one set, the bench's process, which sends the load and scores the model alone at
concurrency 1, on the other. The lists use the kernel's CPU-list format (`0-7,12`, as
`taskset -c` and cpusets take them). The service sizes its inference workers from the CPUs it
is given (`service.scoring.cpus`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8}; CPUs this process may not use are an error that names them."""
    cpus: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            low, high = int(first), int(last or first)
            if low < 0 or high < low:
                raise ValueError(part)
            cpus.update(range(low, high + 1))
    except ValueError:
        raise ValueError(f"expected a CPU list like 0-3,8, got {text!r}") from None
    if not cpus:
        raise ValueError("the CPU list is empty")
    if missing := cpus - os.sched_getaffinity(0):
        usable = format_cpu_list(os.sched_getaffinity(0))
        raise ValueError(f"CPUs {format_cpu_list(missing)} are not usable here (only {usable})")
    return cpus


def format_cpu_list(cpus: set[int]) -> str:
    """{0, 1, 2, 3, 8} -> '0-3,8'."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


@contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """The calling thread on `cpus` for the block (and the processes and threads it starts
    meanwhile, for good: they inherit the mask); None leaves it where it is."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
