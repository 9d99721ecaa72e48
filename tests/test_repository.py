"""The versioned model repository: names, versions, atomic publication, integrity checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime.repository import (
    ModelIntegrityError,
    latest_version,
    list_models,
    model_dir,
    next_version,
    publish,
    read_manifest,
    verify_files,
    write_manifest,
)

BASE = {"name": "m", "kind": "behavior", "inputs": [], "outputs": [], "history_len": 5}


def _writer(payload: bytes = b"onnx-bytes"):  # type: ignore[no-untyped-def]
    def write(tmp: Path, version: int) -> None:
        (tmp / "model.onnx").write_bytes(payload)
        (tmp / "vocab_item.json").write_text('{"tokens": ["a"]}')
        write_manifest(tmp, {**BASE, "version": version})

    return write


def test_model_dir_accepts_good_names_and_refuses_escapes(tmp_path: Path) -> None:
    assert model_dir(tmp_path, "sarn-v2_a", 3) == (tmp_path / "sarn-v2_a" / "3").resolve()
    for bad in ["../x", "a/b", "", "A", "-lead", "x" * 65, ".hidden", "a b"]:
        with pytest.raises(ValueError, match="invalid model name"):
            model_dir(tmp_path, bad, 1)
    for bad_version in [0, -1, True, "1", 1.0]:
        with pytest.raises(ValueError, match="invalid model version"):
            model_dir(tmp_path, "m", bad_version)  # type: ignore[arg-type]


def test_a_symlinked_name_pointing_outside_the_repository_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(outside, repo / "evil")
    with pytest.raises(ValueError, match="outside the repository"):
        model_dir(repo, "evil", 1)


def test_versions_are_integers_in_numeric_order_and_default_to_the_next_free(
    tmp_path: Path,
) -> None:
    for version in (2, 10, 9):  # 10 > 9 numerically, not as strings
        publish(tmp_path, "m", version, _writer())
    assert list_models(tmp_path) == {"m": [2, 9, 10]}
    assert latest_version(tmp_path, "m") == 10
    path, version = publish(tmp_path, "m", None, _writer())
    assert (path.name, version) == ("11", 11)
    assert read_manifest(path)["version"] == 11


def test_an_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    path, _ = publish(tmp_path, "m", 1, _writer(b"first"))
    with pytest.raises(FileExistsError, match="immutable"):
        publish(tmp_path, "m", 1, _writer(b"second"))
    assert (path / "model.onnx").read_bytes() == b"first"


def test_a_failed_writer_publishes_nothing_and_leaves_no_temporary_directory(
    tmp_path: Path,
) -> None:
    def failing(tmp: Path, version: int) -> None:
        (tmp / "model.onnx").write_bytes(b"half")
        raise RuntimeError("parity failed")

    with pytest.raises(RuntimeError, match="parity failed"):
        publish(tmp_path, "m", None, failing)
    assert list_models(tmp_path) == {}
    assert list(tmp_path.iterdir()) == []  # no model directory, no temporary one
    with pytest.raises(RuntimeError, match="parity failed"):
        publish(tmp_path / "new-repo", "m", None, failing)
    assert not (tmp_path / "new-repo").exists()  # a repository it created is not left empty
    publish(tmp_path, "m", 1, _writer())
    with pytest.raises(RuntimeError, match="parity failed"):
        publish(tmp_path, "m", None, failing)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]  # the served one stays
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_incomplete_and_temporary_directories_are_invisible(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1, _writer())
    (tmp_path / "m" / "2").mkdir()  # no manifest: a half-copied directory
    (tmp_path / "m" / ".tmp-3-abcd").mkdir()
    (tmp_path / "Bad Name").mkdir()
    (tmp_path / "empty").mkdir()
    assert list_models(tmp_path) == {"m": [1]}
    assert latest_version(tmp_path, "m") == 1
    assert next_version(tmp_path, "m") == 3  # never reuses a number that is on disk
    with pytest.raises(LookupError):
        latest_version(tmp_path, "empty")
    assert list_models(tmp_path / "missing") == {}


def test_the_manifest_lists_every_file_with_its_sha256(tmp_path: Path) -> None:
    path, _ = publish(tmp_path, "m", 1, _writer(b"abc"))
    manifest = read_manifest(path)
    # sha256("abc") is the FIPS 180-2 test vector.
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert manifest["files"]["model.onnx"] == {"sha256": expected, "bytes": 3}
    assert set(manifest["files"]) == {"model.onnx", "vocab_item.json"}
    verify_files(path, manifest)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "truncated"),
        (lambda p: p.write_bytes(b"x" + p.read_bytes()[1:]), "altered"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_a_damaged_file_is_refused_with_a_clear_error(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = publish(tmp_path, "m", 1, _writer(b"0123456789"))
    damage(path / "model.onnx")
    with pytest.raises(ModelIntegrityError, match=message):
        verify_files(path, read_manifest(path))


def test_a_bad_manifest_is_refused(tmp_path: Path) -> None:
    path, _ = publish(tmp_path, "m", 1, _writer())
    manifest_path = path / "manifest.json"
    manifest_path.write_text("{not json")
    with pytest.raises(ModelIntegrityError, match="not valid JSON"):
        read_manifest(path)
    manifest_path.write_text(json.dumps({"name": "m"}))
    with pytest.raises(ModelIntegrityError, match="lacks required fields"):
        read_manifest(path)
    manifest_path.unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        read_manifest(path)


def test_a_concurrent_exporter_taking_the_number_first_pushes_this_one_to_the_next(
    tmp_path: Path,
) -> None:
    inner = _writer(b"other exporter")

    def racing(tmp: Path, version: int) -> None:
        publish(tmp_path, "m", version, inner)  # another process wins the same number
        _writer(b"this exporter")(tmp, version)

    path, version = publish(tmp_path, "m", None, racing)
    assert version == 2 and path.name == "2"
    assert read_manifest(path)["version"] == 2
    assert (tmp_path / "m" / "1" / "model.onnx").read_bytes() == b"other exporter"
    assert (path / "model.onnx").read_bytes() == b"this exporter"
    verify_files(path, read_manifest(path))
