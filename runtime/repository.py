"""The versioned model repository: `REPO/<name>/<version>/` (torch-free; the service imports it).

A version directory holds `model.onnx`, `manifest.json`, `feature_spec.json` and the vocabulary
files (optionally `model_fp16.onnx`). It is self-sufficient: the service needs nothing else
from training. Versions are positive integers; the highest complete one is served unless the
routing config pins another.

Atomicity: a version is written into a hidden temporary directory beside its final place
(`REPO/<name>/.tmp-...`) and appears with a single `os.rename`, so a reader either sees no
directory or a complete one. Temporary directories are invisible to `list_models`.

Integrity: the manifest records the sha256 and byte size of every file in the directory;
`verify_files` recomputes them and raises `ModelIntegrityError` on any difference.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
# 2: `history_len` (was `max_history`) and `slate.slate_size` (was `max_slate_size`); format 1
# manifests are read under the new names (`_rename_legacy_keys`).
# 3: `graphs`, the serving layouts in order of preference (`graph_entries`); a format 1 or 2
# manifest has none and serves `model.onnx` (its `onnx.file`) as one slate-shared graph.
MANIFEST_FORMAT = 3
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class ModelIntegrityError(Exception):
    """A model directory that must not be served: a bad manifest, or a missing, truncated or
    altered file."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}: must match {NAME_PATTERN.pattern}")
    return name


def validate_version(version: int) -> int:
    # bool is an int subclass; `True` as a version is a caller bug, not version 1.
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"invalid model version {version!r}: must be a positive integer")
    return version


def model_dir(repo: Path, name: str, version: int) -> Path:
    """`repo/name/version`, refusing names and versions that could escape the repository."""
    validate_name(name)
    validate_version(version)
    root = Path(repo).resolve()
    path = (root / name / str(version)).resolve()
    if not path.is_relative_to(root):  # a symlinked name pointing elsewhere
        raise ValueError(f"model directory {path} resolves outside the repository {root}")
    return path


def _versions(name_dir: Path) -> list[int]:
    """Complete versions only: integer directory names that hold a manifest."""
    found = []
    for child in name_dir.iterdir():
        numbered = child.name.isdigit() and not child.name.startswith("0")
        if numbered and (child / MANIFEST).is_file():
            found.append(int(child.name))
    return sorted(found)


def list_models(repo: Path) -> dict[str, list[int]]:
    """Model name -> its complete versions in ascending order (names without one are left out)."""
    repo = Path(repo)
    if not repo.is_dir():
        return {}
    models: dict[str, list[int]] = {}
    for child in sorted(repo.iterdir()):
        if child.is_dir() and NAME_PATTERN.fullmatch(child.name):
            versions = _versions(child)
            if versions:
                models[child.name] = versions
    return models


def latest_version(repo: Path, name: str) -> int:
    """The highest complete version of `name`; `LookupError` if there is none."""
    validate_name(name)
    name_dir = Path(repo) / name
    versions = _versions(name_dir) if name_dir.is_dir() else []
    if not versions:
        raise LookupError(f"no version of model {name!r} in repository {repo}")
    return versions[-1]


def next_version(repo: Path, name: str) -> int:
    """One above the highest version directory present, complete or not (never reuses a number)."""
    validate_name(name)
    name_dir = Path(repo) / name
    if not name_dir.is_dir():
        return 1
    taken = [int(c.name) for c in name_dir.iterdir() if c.name.isdigit()]
    return max(taken, default=0) + 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in `directory` except the manifest itself."""
    return {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST
    }


def read_manifest(directory: Path) -> dict[str, Any]:
    """Parses `manifest.json`; `ModelIntegrityError` if it is missing, not JSON or incomplete."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelIntegrityError(f"{path} is missing: not a model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelIntegrityError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(manifest, dict):
        _rename_legacy_keys(manifest)
    required = ("name", "version", "kind", "files", "inputs", "outputs", "history_len")
    missing = [key for key in required if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise ModelIntegrityError(f"{path} lacks required fields: {', '.join(missing)}")
    if not isinstance(manifest["files"], dict) or MODEL_FILE not in manifest["files"]:
        raise ModelIntegrityError(f"{path} does not list {MODEL_FILE} with its sha256")
    graph_entries(manifest, path)  # a malformed `graphs` is refused here, not at first use
    return dict(manifest)


def graph_entries(manifest: dict[str, Any], where: Path | str = MANIFEST) -> list[dict[str, Any]]:
    """The serving graphs, in order of preference: each `{"file", "layout", "providers",
    "requires", "parity"}`. A manifest without `graphs` (format 1 and 2) has one: its
    `onnx.file` (`model.onnx`) for every provider, the slate-shared layout it was written in.
    Every file must be listed in `files` (so its sha256 is checked before ORT reads it)."""
    graphs = manifest.get("graphs")
    if graphs is None:
        layout = "slate" if manifest.get("kind") == "slate" else "slate-shared"
        file_name = manifest.get("onnx", {}).get("file", MODEL_FILE)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return [{"file": file_name, "layout": layout, "providers": providers, "requires": {}}]
    if not isinstance(graphs, list) or not graphs:
        raise ModelIntegrityError(f"{where}: 'graphs' must be a non-empty list")
    for entry in graphs:
        ok = isinstance(entry, dict) and isinstance(entry.get("layout"), str)
        ok = ok and isinstance(entry.get("providers"), list) and entry.get("providers")
        if not ok or entry.get("file") not in manifest["files"]:
            raise ModelIntegrityError(
                f"{where}: a 'graphs' entry needs a layout, providers and a file listed in "
                f"'files': {entry!r}"
            )
    return [{"requires": {}, **entry} for entry in graphs]


def _rename_legacy_keys(manifest: dict[str, Any]) -> None:
    """Manifests exported before the history length had one name say `max_history` (and a slate
    model's `slate.max_slate_size`); read them under today's names so old versions still serve.
    """
    if "max_history" in manifest and "history_len" not in manifest:
        manifest["history_len"] = manifest.pop("max_history")
    slate = manifest.get("slate")
    if isinstance(slate, dict) and "max_slate_size" in slate and "slate_size" not in slate:
        slate["slate_size"] = slate.pop("max_slate_size")


def verify_files(directory: Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Recomputes size and sha256 of the listed files (default: all); raises on any difference."""
    directory = Path(directory)
    for file_name in names if names is not None else list(manifest["files"]):
        expected = manifest["files"].get(file_name)
        if expected is None:
            raise ModelIntegrityError(f"{file_name} is not listed in {directory / MANIFEST}")
        path = directory / Path(file_name).name  # the manifest cannot point outside the directory
        if not path.is_file():
            raise ModelIntegrityError(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise ModelIntegrityError(
                f"{path} has {size} bytes, the manifest says {expected['bytes']}: "
                "truncated or replaced; re-export the model"
            )
        actual = sha256_file(path)
        if actual != expected["sha256"]:
            raise ModelIntegrityError(
                f"{path} sha256 {actual[:12]}… does not match the manifest's "
                f"{expected['sha256'][:12]}…: the file was altered; re-export the model"
            )


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Adds the file table (sha256 + size of everything present) and writes `manifest.json`."""
    manifest = {**manifest, "format_version": MANIFEST_FORMAT, "files": describe_files(directory)}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _fsync_tree(directory: Path) -> None:
    """Flushes the files and the directory entry so a crash after rename leaves no empty file."""
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(
    repo: Path, name: str, version: int | None, write: Callable[[Path, int], None]
) -> tuple[Path, int]:
    """Writes a new version atomically and returns (its directory, its number).

    `write(tmp_dir, version)` fills a fresh temporary directory (and must call
    `write_manifest` last). With `version=None` the next free number is taken; if another
    exporter publishes the same number first, the next one is tried. An explicit version
    that already exists is refused with `FileExistsError`.
    """
    validate_name(name)
    name_dir = Path(repo) / name
    chosen = next_version(repo, name) if version is None else validate_version(version)
    if (name_dir / str(chosen)).exists():
        raise FileExistsError(f"{name_dir / str(chosen)} already exists; versions are immutable")
    # Staged beside the model directories (a dot name is never a model), so that a refused
    # export creates no model directory, and one is never removed under a concurrent reader.
    tmp = Path(repo) / f"{_TMP_PREFIX}{name}-{chosen}-{uuid.uuid4().hex[:8]}"
    new_repo = not Path(repo).exists()
    tmp.mkdir(parents=True)
    try:
        write(tmp, chosen)
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError("the writer did not produce a manifest")
        _fsync_tree(tmp)
        name_dir.mkdir(exist_ok=True)
        return _rename_into_place(tmp, name_dir, chosen, retry=version is None)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if new_repo and not name_dir.exists():  # refused: leave no empty repository behind
            with contextlib.suppress(OSError):  # not empty: another exporter published there
                Path(repo).rmdir()


def _rename_into_place(tmp: Path, name_dir: Path, version: int, retry: bool) -> tuple[Path, int]:
    while True:
        target = name_dir / str(version)
        try:
            if target.exists():  # rename() would silently replace an empty directory
                raise FileExistsError(errno.EEXIST, "exists", str(target))
            os.rename(tmp, target)
            return target, version
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not retry:
                raise FileExistsError(f"{target} already exists; versions are immutable") from exc
            version += 1
            _set_manifest_version(tmp, version)


def _set_manifest_version(directory: Path, version: int) -> None:
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
