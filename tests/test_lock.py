"""The dependency lock (requirements/*.txt, written by `make lock`) against what it must cover.

Independent of the lock's own content: pyproject.toml says what the project asks for, the
installed distributions' metadata say what those pull in, the Makefile and the Dockerfile say
what gets installed from which file. A lock that misses a package, pins one outside its range
or disagrees with another lock fails here, not in a user's Docker build next month.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest
import tomllib
from deploy_support import ROOT, parse_dockerfile
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from loadtest.gpu.bundle import Pin
from loadtest.gpu.bundle import read_lock as read_pins

LOCKS = ROOT / "requirements"
# The extras `make test` installs (bench has a venv of its own: nvidia-pytriton pins numpy<2).
DEV_EXTRAS = ("train", "serve", "tracing", "dev", "loadtest")


def read_lock(path: Path) -> dict[str, Pin]:
    """name -> the pin that applies to this interpreter (universal locks carry markers); the
    reader refuses a line that is not an exact, hashed pin and a package pinned twice."""
    return {pin.name: pin for pin in read_pins(path)}


def requested(extras: Iterable[str]) -> list[Requirement]:
    """The project's base requirements plus those of `extras`, from pyproject.toml."""
    meta: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lists = [meta["dependencies"], *(meta["optional-dependencies"][e] for e in extras)]
    return [Requirement(text) for group in lists for text in group]


def closure(requirements: Iterable[Requirement]) -> set[str]:
    """Every distribution these requirements pull in on this interpreter, from the installed
    metadata (the venv `make test` built from the lock, plus torch)."""
    seen: set[str] = set()
    pending = [(r, frozenset(r.extras)) for r in requirements]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen and not extras:
            continue
        seen.add(name)
        for text in distribution(name).requires or []:
            child = Requirement(text)
            wanted = [{**default_environment(), "extra": e} for e in extras or {""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in wanted):
                pending.append((child, frozenset(child.extras)))
    return seen


@pytest.fixture(scope="module")
def dev() -> dict[str, Pin]:
    return read_lock(LOCKS / "dev.txt")


def test_every_pin_is_exact_and_hashed() -> None:
    for lock in ("dev.txt", "serve.txt", "train.txt", "gpu-check.txt"):
        pins = read_lock(LOCKS / lock)
        assert len(pins) > 20, lock
        assert all(pin.hashes for pin in pins.values()), lock


def test_the_dev_lock_satisfies_pyproject(dev: dict[str, Pin]) -> None:
    """Changed pyproject.toml without `make lock`: a missing package or a pin out of range."""
    for requirement in requested(DEV_EXTRAS):
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in dev, "torch stays out of the dev lock (the Makefile's TORCH)"
            continue
        assert name in dev, f"{name} is in pyproject.toml but not in requirements/dev.txt"
        assert requirement.specifier.contains(dev[name].version, prereleases=True), (
            requirement,
            dev[name].version,
        )


def test_the_venv_is_the_dev_lock(dev: dict[str, Pin]) -> None:
    """What `make test` installed, every package the extras pull in, is the locked version."""
    wanted = closure(r for r in requested(DEV_EXTRAS) if r.name != "torch")
    torch_requires = closure([Requirement("torch")]) - {"torch"}
    for name in sorted(wanted | torch_requires):
        assert name in dev, f"{name} is installed through the extras but not locked"
        assert distribution(name).version == dev[name].version, name


def test_torchs_own_requirements_are_locked(dev: dict[str, Pin]) -> None:
    """torch is installed outside the lock; what its wheel requires must not be."""
    try:
        requires = distribution("torch").requires or []
    except PackageNotFoundError:
        pytest.fail("torch is not installed: `make test` installs it after the lock")
    for text in requires:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # an optional extra (optree, opt-einsum, pyyaml) or another platform
        name = canonicalize_name(requirement.name)
        if name.startswith(("nvidia-", "cuda-")) or name == "triton":
            continue  # a CUDA build's libraries: whoever picks that build gets them
        assert name in dev, f"torch requires {name}: add it to requirements/torch-deps.in"
        assert requirement.specifier.contains(dev[name].version, prereleases=True), text


def test_locks_agree_on_shared_packages(dev: dict[str, Pin]) -> None:
    for lock in ("serve.txt", "train.txt", "gpu-check.txt"):
        for name, pin in read_lock(LOCKS / lock).items():
            if name in dev:
                assert pin.version == dev[name].version, (lock, name, pin, dev[name])


def test_the_gpu_check_lock_pins_everything_the_check_installs() -> None:
    """`ctr bench gpu --bundle` carries the pins of requirements/gpu-check.txt: every package
    the base, serve and loadtest extras pull in must be there (this Python's view)."""
    gpu = read_lock(LOCKS / "gpu-check.txt")
    missing = closure(requested(["serve", "loadtest"])) - set(gpu)
    assert not missing, f"the GPU bundle would lack: {sorted(missing)}"
    assert "torch" not in gpu  # the host's CUDA build, never the bundle's
    makefile = (ROOT / "Makefile").read_text()
    assert "--extra serve --extra loadtest -c requirements/dev.txt" in makefile


def _pip_installs(runs: Iterable[str]) -> list[list[str]]:
    commands = [shlex.split(part) for run in runs for part in run.split("&&")]
    return [c for c in commands if c[:2] == ["pip", "install"]]


def _installs_only_the_lock(stage: str, lock: str) -> None:
    dockerfile = parse_dockerfile()
    steps = dockerfile.stage(stage)
    copies = [c.split() for c in steps.all("COPY")]
    assert [f"requirements/{lock}", "/tmp/requirements.txt"] in copies, copies
    installs = _pip_installs(steps.all("RUN"))
    assert installs, f"stage {stage} installs nothing"
    for command in installs:
        if "-r" in command:  # the dependencies: every one pinned with a hash, nothing resolved
            assert {"--require-hashes", "--no-deps"} <= set(command), command
            assert command[command.index("-r") + 1] == "/tmp/requirements.txt", command
        else:  # the project itself: its dependencies are already there
            assert command[2:] == ["--no-deps", "--no-build-isolation", "."], command


def test_the_serving_image_installs_exactly_the_serve_lock() -> None:
    _installs_only_the_lock("serve-builder", "serve.txt")
    serve = read_lock(LOCKS / "serve.txt")
    # Every package the base + serve + tracing extras pull in is pinned there (this Python's
    # view; the lock is universal, so the image's Python has its own lines), and no torch.
    missing = closure(requested(["serve", "tracing"])) - set(serve)
    assert not missing, f"the serving image would install these unpinned: {sorted(missing)}"
    assert {"onnxruntime-gpu", "fastapi", "uvicorn", "redis", "prometheus-client"} <= set(serve)
    assert not {"torch", "safetensors", "scikit-learn"} & set(serve)
    dockerfile = parse_dockerfile()
    assert serve["onnxruntime-gpu"].version == dockerfile.global_args["ORT_VERSION"]


def test_the_training_image_installs_the_train_lock_with_the_tested_torch() -> None:
    _installs_only_the_lock("train", "train.txt")
    train = read_lock(LOCKS / "train.txt")
    missing = closure(r for r in requested(["train", "serve"]) if r.name != "torch") - set(train)
    assert not missing, sorted(missing)
    makefile = (ROOT / "Makefile").read_text()
    (torch,) = re.findall(r"^TORCH \?= torch==(\S+)$", makefile, re.MULTILINE)
    assert train["torch"].version == torch, "the image's torch is the one CI tests"


def test_make_installs_from_the_lock_with_hashes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements/dev.txt" in makefile
    assert "pip install -q --require-hashes --no-deps -r $(LOCK)" in makefile
    assert '-e ".[' not in makefile, "an install that resolves from pyproject ranges"
