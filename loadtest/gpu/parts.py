"""The offline bundle's parts: pack, split, stage, reassemble, verify, install, run.

Standard library only, and runnable as a script (`python3 ctr_bundle.py run ...`), because on
the air-gapped GPU host this file runs *before* anything of the project is installed: the
project itself is one of the wheels it installs.

Why parts: the host takes uploads of at most 64 MiB each. The wheels (onnxruntime-gpu alone
is about 255 MB) go into one uncompressed tar (wheels are zip files already), which is cut
into parts of at most `PART_BYTES`. `manifest.json` records the sha256 and size of every
part, of the whole archive and of every file in it, so a part that was truncated, corrupted
or taken from another bundle is refused by name before anything is installed.

Layout that `pack` writes (each part folder is self-describing, so any subset can travel):

    DIR/manifest.json                DIR/ctr_bundle.py   (this file)
    DIR/part-01/manifest.json        DIR/part-01/<archive>.01
    DIR/part-02/manifest.json        DIR/part-02/<archive>.02   ...

On the host: `stage` copies whatever parts an upload brought into one staging folder (run it
after every upload; it says which parts are still missing), and `run` reassembles, verifies,
installs with `pip install --no-index --no-deps --target SITE` and starts `ctr bench gpu`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PART_BYTES = 60 * 2**20  # under the host's 64 MiB upload limit, with room for the tree
MANIFEST = "manifest.json"
ARCHIVE = "slatectr-gpu-bundle.tar"
SCRIPT = "ctr_bundle.py"
FORMAT = 1
_CHUNK = 2**20


class BundleError(Exception):
    """A part or file is missing, truncated or altered; nothing was installed."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _describe(path: Path, name: str | None = None) -> dict[str, Any]:
    return {"name": name or path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _part_path(out: Path, index: int) -> Path:
    """DIR/part-NN/<archive>.NN: one folder per upload, named so that they sort."""
    return out / f"part-{index:02d}" / f"{ARCHIVE}.{index:02d}"


def _split(archive: Path, out: Path, part_bytes: int) -> list[Path]:
    """Cuts `archive` into part files of at most `part_bytes` each, in order."""
    paths: list[Path] = []
    with archive.open("rb") as source:
        while block := source.read(part_bytes):
            path = _part_path(out, len(paths) + 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(block)
            paths.append(path)
    return paths


def pack(
    files: Sequence[Path],
    out: Path,
    part_bytes: int = PART_BYTES,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tars `files` (flat, by name), splits the tar into parts and writes the manifests.
    -> the manifest. `meta` (what was bundled and why) is stored in it verbatim."""
    if part_bytes < 1:
        raise ValueError(f"part size must be at least one byte, not {part_bytes}")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(
            f"two files share a name: {sorted(n for n in names if names.count(n) > 1)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    archive = out / ARCHIVE
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            tar.add(path, arcname=path.name, recursive=False)
    part_paths = _split(archive, out, part_bytes)
    manifest = {
        "format": FORMAT,
        "archive": _describe(archive),
        "parts": [_describe(path) for path in part_paths],
        "files": [_describe(path) for path in files],
        "meta": meta or {},
    }
    archive.unlink()
    text = json.dumps(manifest, indent=2) + "\n"
    for folder in [out, *(path.parent for path in part_paths)]:
        (folder / MANIFEST).write_text(text)
    shutil.copyfile(Path(__file__), out / SCRIPT)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: upload a part folder (each holds the manifest)")
    manifest: dict[str, Any] = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def stage(uploads: Path, staging: Path) -> list[str]:
    """Copies every part (and the manifest) found under `uploads` into `staging`, refusing a
    part of another bundle. -> the names of the parts still missing."""
    staging.mkdir(parents=True, exist_ok=True)
    found = sorted(uploads.rglob(MANIFEST))
    if not found:
        raise BundleError(f"no {MANIFEST} under {uploads}: nothing of the bundle arrived")
    archive = read_manifest(found[0].parent)["archive"]["sha256"]
    if (staging / MANIFEST).is_file():
        archive = read_manifest(staging)["archive"]["sha256"]
    for path in found:
        manifest = read_manifest(path.parent)
        if manifest["archive"]["sha256"] != archive:
            raise BundleError(f"{path.parent} belongs to another bundle than {staging}")
        shutil.copyfile(path, staging / MANIFEST)
        for part in manifest["parts"]:
            source = path.parent / part["name"]
            if source.is_file():
                shutil.copyfile(source, staging / part["name"])
    parts = read_manifest(staging)["parts"]
    return [p["name"] for p in parts if not (staging / p["name"]).is_file()]


def _check(path: Path, expected: dict[str, Any], what: str) -> None:
    if not path.is_file():
        raise BundleError(f"{what} {expected['name']} is missing from {path.parent}")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise BundleError(
            f"{what} {expected['name']} has {size} bytes, the manifest says {expected['bytes']}: "
            "truncated or replaced; upload it again"
        )
    if sha256_file(path) != expected["sha256"]:
        raise BundleError(
            f"{what} {expected['name']} does not match its sha256 in the manifest: corrupted; "
            "upload it again"
        )


def assemble(staging: Path, dest: Path) -> list[Path]:
    """Verifies every part, joins them, verifies the archive, extracts it into `dest` and
    verifies every file. -> the extracted files. Raises `BundleError` before extracting
    anything when a part is missing or altered."""
    manifest = read_manifest(staging)
    for part in manifest["parts"]:
        _check(staging / part["name"], part, "part")
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / manifest["archive"]["name"]
    with archive.open("wb") as joined:
        for part in manifest["parts"]:
            with (staging / part["name"]).open("rb") as source:
                shutil.copyfileobj(source, joined, _CHUNK)
    _check(archive, manifest["archive"], "archive")
    expected = {entry["name"]: entry for entry in manifest["files"]}
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        unexpected = sorted({m.name for m in members} - set(expected))
        if unexpected or not all(m.isfile() for m in members):
            raise BundleError(f"the archive holds entries the manifest does not list: {unexpected}")
        tar.extractall(dest, members=members, filter="data")
    archive.unlink()
    for name, entry in expected.items():
        _check(dest / name, entry, "file")
    return [dest / name for name in expected]


def install(wheels: Iterable[Path], site: Path, python: str = sys.executable) -> None:
    """`pip install --no-index --no-deps --target SITE`: exactly these files, nothing
    resolved or fetched (the host has no package index)."""
    command = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile"]
    command += ["--disable-pip-version-check", "--upgrade", "--target", str(site)]
    command += [str(path) for path in wheels if path.suffix == ".whl"]
    subprocess.run(command, check=True)


def check_environment(site: Path, extras: Sequence[str] = ("serve", "loadtest")) -> list[str]:
    """What the installed distributions require but the Python (SITE first) lacks or has in
    another version: the host's own packages were not bundled, so their versions are its own.
    -> problems in words; empty when every requirement holds. Needs `packaging` (the
    reference host has it); without it the check is skipped and says so."""
    try:
        from importlib import metadata

        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:
        return ["not checked: the Python has no 'packaging' module"]
    search = [str(site), *sys.path]
    present = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in reversed(list(metadata.distributions(path=search)))
        if d.metadata["Name"]
    }  # reversed: the first on the path (SITE) wins
    problems = []
    for dist in metadata.distributions(path=[str(site)]):
        wanted = [""] + (list(extras) if dist.metadata["Name"] == "slatectr" else [])
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in wanted):
                continue
            version = present.get(canonicalize_name(requirement.name))
            if version is None:
                problems.append(f"{dist.metadata['Name']} needs {requirement}: not installed")
            elif not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {requirement}: found {version}")
    return sorted(set(problems))


def _environment(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(site / "bin"), env.get("PATH")]))
    return env


def run(staging: Path, site: Path, check_args: Sequence[str]) -> int:
    """assemble + install + the dependency check, then `ctr bench gpu CHECK_ARGS` from SITE.
    -> the check's exit code."""
    files = assemble(staging, staging / "files")
    _say(f"verified {len(files)} files; installing into {site}")
    install(files, site)
    problems = check_environment(site)
    for problem in problems:
        _say(f"warning: {problem}")
    (site / "bundle-check.json").write_text(json.dumps({"problems": problems}, indent=2) + "\n")
    command = [sys.executable, "-m", "slatectr.cli", "bench", "gpu", *check_args]
    _say("running " + " ".join(command))
    # From SITE, so that the check and the processes it starts import the installed project.
    return subprocess.run(command, env=_environment(site), cwd=site, check=False).returncode


def _say(message: str) -> None:
    print(f"[ctr-bundle] {message}", file=sys.stderr, flush=True)


def _absolute_paths(args: Sequence[str]) -> list[str]:
    """`run` changes directory: path options of the check must not depend on the old one."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in ("--out", "--work", "--repo", "--world"):
            out[i + 1] = str(Path(out[i + 1]).resolve())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    staged = commands.add_parser("stage", help="copy uploaded parts into the staging folder")
    staged.add_argument("uploads", type=Path)
    staged.add_argument("staging", type=Path)
    verify = commands.add_parser("verify", help="check every part and file, install nothing")
    verify.add_argument("staging", type=Path)
    ran = commands.add_parser(
        "run", help="verify, install, then `ctr bench gpu` with what follows --"
    )
    ran.add_argument("staging", type=Path)
    ran.add_argument("--site", type=Path, default=Path("/tmp/ctr-site"))
    given = list(sys.argv[1:] if argv is None else argv)
    cut = given.index("--") if "--" in given else len(given)  # after --: the check's own
    args = parser.parse_args(given[:cut])
    try:
        if args.command == "stage":
            missing = stage(args.uploads, args.staging)
            _say(f"staged in {args.staging}; missing: {', '.join(missing) or 'none'}")
            return 0
        if args.command == "verify":
            files = assemble(args.staging, args.staging / "files")
            _say(f"all parts and {len(files)} files match the manifest")
            return 0
        return run(args.staging, args.site.resolve(), _absolute_paths(given[cut + 1 :]))
    except BundleError as exc:
        _say(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
