"""How many CPUs this process may use: its CPU affinity, capped by its cgroup's CPU quota.

`os.sched_getaffinity` sees a container's cpuset but not the CFS quota that `docker run --cpus`
and a Kubernetes `limits.cpu` set: a pod limited to 3 CPUs on a 64-core node has all 64 in its
affinity. Sized from that, the service would run 63 inference workers that the quota throttles
to 3 CPUs' worth of time, and its admission estimate, which shares the queued work over the
workers, would expect the queue to drain 21 times faster than it can.

The quota is read the way Go's runtime (1.25), the JVM and .NET read it: from the cgroups that
/proc/self/cgroup names for the process, under their mounts in /proc/self/mountinfo, `cpu.max`
(cgroup v2) or `cpu.cfs_quota_us` / `cpu.cfs_period_us` (v1), the smallest over the process's
cgroup and its ancestors (a limit on a parent binds its children), rounded up to whole CPUs.
Anything unreadable counts as no limit: the affinity then decides, as before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

PROC_SELF = Path("/proc/self")
LimitReader = Callable[[Path], "float | None"]  # a cgroup directory -> its CPU limit


def usable_cores(proc: Path = PROC_SELF) -> int:
    """The CPUs this process may run on, capped by its cgroup CPU quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    limit = cgroup_cpu_limit(proc)
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def cgroup_cpu_limit(proc: Path = PROC_SELF) -> float | None:
    """CPUs' worth of time per period that the process's cgroups allow (the smallest over its
    cgroup and its ancestors), or None where no quota is set or none can be read."""
    try:
        mountinfo = (proc / "mountinfo").read_text()
        memberships = (proc / "cgroup").read_text()
    except OSError:
        return None
    limits = [
        limit
        for mount_point, directory, read_limit in _cpu_cgroups(mountinfo, memberships)
        for limit in map(read_limit, _up_to(directory, mount_point))
        if limit is not None
    ]
    return min(limits, default=None)


def _cpu_cgroups(mountinfo: str, memberships: str) -> Iterator[tuple[Path, Path, LimitReader]]:
    """(mount point, the process's cgroup directory under it, how to read its limit) for each
    mounted hierarchy with the cpu controller that the process belongs to."""
    paths: dict[str, str] = {}  # "" for the v2 hierarchy, "cpu" for the v1 cpu controller
    for line in memberships.splitlines():
        if len(parts := line.split(":", 2)) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        elif "cpu" in controllers.split(","):
            paths["cpu"] = path
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        root, mount_point = fields[3], Path(fields[4])
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype == "cgroup2" and "" in paths:
            key, read_limit = "", _v2_limit
        elif fstype == "cgroup" and "cpu" in options and "cpu" in paths:
            key, read_limit = "cpu", _v1_limit
        else:
            continue
        relative = os.path.relpath(paths[key], root)
        if relative.startswith(".."):  # the process's cgroup is outside what this mount shows
            continue
        yield mount_point, Path(os.path.normpath(mount_point / relative)), read_limit


def _up_to(directory: Path, mount_point: Path) -> Iterator[Path]:
    """`directory` and its parents, up to and including `mount_point`."""
    yield directory
    for parent in directory.parents:
        if not parent.is_relative_to(mount_point):
            return
        yield parent


def _v2_limit(directory: Path) -> float | None:
    """`cpu.max` holds "QUOTA PERIOD", QUOTA being "max" where there is no limit."""
    fields = _read(directory / "cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_limit(directory: Path) -> float | None:
    """`cpu.cfs_quota_us` is -1 where there is no limit."""
    return _ratio(_read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us"))


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
