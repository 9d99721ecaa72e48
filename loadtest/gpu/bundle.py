"""`ctr bench gpu --bundle DIR`: every wheel the GPU check needs and the GPU host lacks, in
upload-sized parts (docs/gpu.md "Air-gapped hosts").

What goes in, and why those versions:
* the pins of `requirements/gpu-check.txt` (`make lock`: base + `serve` + `loadtest` extras,
  resolved against the development lock) that hold on the host: the lock is universal, so
  its markers are evaluated for the host's interpreter (`HOST_ENVIRONMENT`: CPython 3.12 on
  Linux x86_64), not for the Python that builds the bundle;
* less every package the host already has (`reference_host.txt`, or `--host-packages`): the
  host's torch, numpy, onnx... are what its CUDA build was made with; the installer checks on
  the host that their versions satisfy what the bundled packages require;
* plus the project itself, built with `pip wheel --no-deps` from this checkout.

Each wheel is fetched with `pip download --only-binary=:all: --no-deps --require-hashes` for
the host's tags, so pip checks every file against the lock's sha256 before it is packed; the
parts and the manifest are written by `loadtest.gpu.parts`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from loadtest.gpu import parts

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "gpu-check.txt"
REFERENCE_HOST = Path(__file__).with_name("reference_host.txt")
# The reference host's interpreter (KINDS.md: Python 3.12.3, Linux x86_64), every marker
# variable given so that nothing of the building machine leaks into the evaluation.
HOST_ENVIRONMENT = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}
# manylinux tags pip may take (it matches each tag exactly): glibc 2.17 up to 2.35, which a
# current Ubuntu or RHEL-family image has; pip on the host refuses a wheel it cannot load.
PLATFORMS = [
    *(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)),
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


@dataclass(frozen=True)
class Pin:
    """One line of a lock: `name==version ; marker --hash=sha256:...`."""

    name: str  # canonical
    version: str
    hashes: tuple[str, ...]  # "sha256:<hex>"

    def requirement_line(self) -> str:
        return " ".join([f"{self.name}=={self.version}", *(f"--hash={h}" for h in self.hashes)])


def read_lock(path: Path, environment: Mapping[str, str] | None = None) -> list[Pin]:
    """The pins of a `uv pip compile --universal` lock that apply in `environment` (marker
    variables; None: this interpreter). Refuses a line that is not an exact, hashed pin or a
    package pinned twice for one environment: either would make the install ambiguous."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins: dict[str, Pin] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = line.split(" --hash=")
        requirement = Requirement(spec)
        if requirement.marker is not None and not requirement.marker.evaluate(
            dict(environment) if environment is not None else None
        ):
            continue
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==" or not hashes:
            raise ValueError(f"{path.name}: not an exact, hashed pin: {line[:120]}")
        name = canonicalize_name(requirement.name)
        if name in pins:
            raise ValueError(f"{path.name}: {name} is pinned twice for this environment")
        pins[name] = Pin(name, specifiers[0].version, tuple(h.strip() for h in hashes))
    return list(pins.values())


def read_host_packages(path: Path) -> set[str]:
    """Canonical names from a list of names or a `pip freeze` (`name==1.2`, `name @ url`)."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(re.split(r"[\s=<>!~;@\[]", line, maxsplit=1)[0]))
    return names


def split_pins(pins: Iterable[Pin], host: set[str]) -> tuple[list[Pin], list[Pin]]:
    """-> (pins to bundle, pins the host provides itself)."""
    chosen = sorted(pins, key=lambda p: p.name)
    return [p for p in chosen if p.name not in host], [p for p in chosen if p.name in host]


def download(pins: list[Pin], dest: Path, python: str = sys.executable) -> list[Path]:
    """The host's wheels of `pins` into the new folder `dest`, each checked by pip against its
    lock hashes. -> one wheel per pin (a pin without one is an error that names it)."""
    dest.mkdir(parents=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("".join(pin.requirement_line() + "\n" for pin in pins))
    command = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--require-hashes", "--disable-pip-version-check", "--progress-bar", "off"]
    command += ["--python-version", HOST_ENVIRONMENT["python_version"], "--implementation", "cp"]
    command += [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    command += ["--dest", str(dest), "--requirement", handle.name]
    try:  # pip's progress goes to stderr: stdout is the command's one JSON line
        subprocess.run(command, check=True, stdout=sys.stderr)
    finally:
        Path(handle.name).unlink()
    wheels = sorted(dest.glob("*.whl"))
    got = {canonicalize_name(w.name.split("-", 1)[0]) for w in wheels}
    missing = sorted(p.name for p in pins if p.name not in got)
    if missing or len(wheels) != len(pins):
        raise RuntimeError(
            f"pip download gave {len(wheels)} wheels for {len(pins)} pins: {missing}"
        )
    return wheels


def project_wheel(dest: Path, python: str = sys.executable) -> Path:
    """This checkout as a wheel (`pip wheel --no-deps`: its dependencies are the pins)."""
    command = [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--disable-pip-version-check", "--wheel-dir", str(dest), str(ROOT)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    built = sorted(dest.glob("slatectr-*.whl"))
    if len(built) != 1:
        raise RuntimeError(f"pip wheel wrote {len(built)} slatectr wheels into {dest}: {built}")
    return built[0]


def _source() -> dict[str, Any]:
    """The commit the project wheel was built from (and whether the tree had changes)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--short"))}


def build_bundle(
    out: Path,
    lock: Path = LOCK,
    host_packages: Path = REFERENCE_HOST,
    part_bytes: int = parts.PART_BYTES,
) -> dict[str, Any]:
    """Downloads, builds and packs the bundle into `out`, which must be new or empty (parts
    of an older bundle beside the new ones would be refused on the host). -> its manifest."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: remove it, or give a new folder")
    bundled, provided = split_pins(
        read_lock(lock, HOST_ENVIRONMENT), read_host_packages(host_packages)
    )
    wheels_dir = out / "wheels"
    _say(f"downloading {len(bundled)} wheels for the host (the host has {len(provided)} more)")
    wheels = download(bundled, wheels_dir)
    _say("building the project wheel")
    wheels.append(project_wheel(wheels_dir))
    meta = {
        "lock": {"file": str(lock.relative_to(ROOT)), "sha256": parts.sha256_file(lock)},
        "host_environment": HOST_ENVIRONMENT,
        "host_packages": {"file": host_packages.name, "sha256": parts.sha256_file(host_packages)},
        "bundled": [{"name": p.name, "version": p.version} for p in bundled],
        "host_provides": [{"name": p.name, "lock_version": p.version} for p in provided],
        "source": _source(),
    }
    _say(f"packing {len(wheels)} wheels into parts of at most {part_bytes / 2**20:g} MiB")
    manifest = parts.pack(wheels, out, part_bytes, meta)
    for wheel in wheels:
        wheel.unlink()
    wheels_dir.rmdir()
    return manifest


def _say(message: str) -> None:
    print(f"[gpu-bundle] {message}", file=sys.stderr, flush=True)
