"""The CPU count the service sizes its inference workers from (affinity capped by the cgroup
CPU quota), and the workers it sizes.

Setting a real quota needs root and a writable cgroup filesystem, which a CI container does not
give, so these tests lay out the files the kernel shows (/proc/self/mountinfo, /proc/self/cgroup
and the cgroup directories, with the formats of the kernel's cgroup-v1 and cgroup-v2 docs) under
a temporary directory. (Checked by hand with a real cgroup-v1 quota: docs/service.md.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.engine import batcher_config
from service.scoring.cpus import cgroup_cpu_limit, usable_cores
from service.settings import Settings

V1_MOUNT = "35 25 0:30 {root} {point} rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
V2_MOUNT = "30 25 0:26 {root} {point} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
OTHER_MOUNTS = "25 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"


def _proc(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(OTHER_MOUNTS + mountinfo)
    (proc / "cgroup").write_text(cgroup)
    return proc


def _write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text + "\n")


@pytest.mark.parametrize(
    ("cpu_max", "cgroup", "expected"),
    [
        ({"kubepods/pod1": "150000 100000"}, "/kubepods/pod1", 1.5),
        # a parent's limit binds a child without one
        ({"kubepods": "200000 100000", "kubepods/pod1": "max 100000"}, "/kubepods/pod1", 2.0),
        # the smallest limit on the way up wins
        ({"a": "50000 100000", "a/b": "300000 100000"}, "/a/b", 0.5),
        # a container with its own cgroup namespace sees its cgroup as "/" at the mount point
        ({".": "250000 100000"}, "/", 2.5),
    ],
)
def test_v2_quota(tmp_path: Path, cpu_max: dict[str, str], cgroup: str, expected: float) -> None:
    mount = tmp_path / "cgroup2"
    for directory, limit in cpu_max.items():
        _write(mount / directory, cpu_max=limit)
    proc = _proc(tmp_path, V2_MOUNT.format(root="/", point=mount), f"0::{cgroup}\n")
    assert cgroup_cpu_limit(proc) == expected


def test_v1_quota_under_a_mount_of_a_subtree(tmp_path: Path) -> None:
    """Docker without a cgroup namespace mounts the container's own subtree: the mount's root
    (/docker/abc) is cut from the path /proc/self/cgroup gives."""
    mount = tmp_path / "cpu,cpuacct"
    _write(mount, cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    proc = _proc(
        tmp_path,
        V1_MOUNT.format(root="/docker/abc", point=mount),
        "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
    )
    assert cgroup_cpu_limit(proc) == 3.0


def test_v1_without_a_quota(tmp_path: Path) -> None:
    mount = tmp_path / "cpu,cpuacct"
    _write(mount / "user", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    _write(mount, cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    proc = _proc(tmp_path, V1_MOUNT.format(root="/", point=mount), "3:cpu,cpuacct:/user\n")
    assert cgroup_cpu_limit(proc) is None


def test_a_cgroup_outside_the_mount_is_not_read(tmp_path: Path) -> None:
    """The mount shows /docker/abc; a process in /other cannot see its limit there."""
    mount = tmp_path / "cgroup2"
    _write(mount, cpu_max="100000 100000")
    proc = _proc(tmp_path, V2_MOUNT.format(root="/docker/abc", point=mount), "0::/other\n")
    assert cgroup_cpu_limit(proc) is None


def test_unreadable_or_malformed_files_mean_no_limit(tmp_path: Path) -> None:
    mount = tmp_path / "cgroup2"
    _write(mount / "a", cpu_max="garbage")
    proc = _proc(tmp_path, V2_MOUNT.format(root="/", point=mount), "0::/a\n")
    assert cgroup_cpu_limit(proc) is None
    assert cgroup_cpu_limit(tmp_path / "no-such-proc") is None


def test_a_line_of_proc_cgroup_it_cannot_read_is_passed_over(tmp_path: Path) -> None:
    mount = tmp_path / "cgroup2"
    _write(mount / "a", cpu_max="100000 100000")
    proc = _proc(tmp_path, V2_MOUNT.format(root="/", point=mount), "not a cgroup line\n0::/a\n")
    assert cgroup_cpu_limit(proc) == 1.0


def test_usable_cores_rounds_a_fractional_quota_up_and_never_exceeds_the_affinity(
    tmp_path: Path,
) -> None:
    affinity = len(os.sched_getaffinity(0))
    mount = tmp_path / "cgroup2"
    _write(mount / "half", cpu_max="50000 100000")
    _write(mount / "huge", cpu_max=f"{(affinity + 8) * 100000} 100000")
    mounts = V2_MOUNT.format(root="/", point=mount)
    (tmp_path / "half").mkdir()
    (tmp_path / "huge").mkdir()
    assert usable_cores(_proc(tmp_path / "half", mounts, "0::/half\n")) == 1
    assert usable_cores(_proc(tmp_path / "huge", mounts, "0::/huge\n")) == affinity


def test_workers_fill_the_usable_cores_on_cpu_and_are_two_on_a_device() -> None:
    """README: CTR_INFER_WORKERS defaults to the usable cores less the event loop's; on a GPU,
    whose runs serialise on the session's stream, to 2, with the queued work not shared."""
    cpu = batcher_config(Settings(), on_device=False)
    gpu = batcher_config(Settings(), on_device=True)
    assert (cpu.workers, cpu.parallel_runs) == (max(1, usable_cores() - 1), None)
    assert (gpu.workers, gpu.parallel_runs) == (2, 1)
    pinned = batcher_config(Settings(infer_workers=3), on_device=True)
    assert (pinned.workers, pinned.parallel_runs) == (3, 1)
