"""`ctr export` end to end on CPU: parity for every model, the manifest, versions, failures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_support import ALL, make_run, write_data

from exporters.parity import ParityError
from exporters.pipeline import ExportOptions, export_run
from models.registry import is_slate_model
from models.training.checkpoint import load_run
from runtime.loader import ScoringRequest, open_model
from runtime.repository import list_models, read_manifest

SLATE_HISTORY = 12  # two history slates of K = 6: small graphs, every layout path used


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    return write_data(tmp_path_factory.mktemp("data"))


def _export(name: str, root: Path, data: tuple[Path, Path], **options: object) -> Path:
    sample = data[1] if is_slate_model(name) else data[0]
    run = make_run(root / "runs" / name, name, sample)
    opts = ExportOptions(data=sample, slate_history=SLATE_HISTORY, **options)  # type: ignore[arg-type]
    return export_run(run, root / "repo", opts).directory


@pytest.mark.parametrize("name", ALL)
def test_every_model_exports_within_the_fp32_tolerance(
    name: str, data: tuple[Path, Path], tmp_path: Path
) -> None:
    directory = _export(name, tmp_path, data)
    parity = read_manifest(directory)["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-5
    names = {case["name"] for case in parity["cases"]}
    assert names >= {
        "empty_history",
        "history_of_one",
        "max_length",
        "longer_than_max",
        "one_candidate",
        "many_candidates",
        "mixed_slate_sizes",
        "unknown_ids",
        "real_0",
    }
    assert all(case["candidates"] > 0 for case in parity["cases"])
    if not is_slate_model(name):  # the slate-shared graph serves the pairwise training scores
        assert all(case["pairwise_max_abs_diff"] <= 1e-5 for case in parity["cases"])


def _reference_session(contract: dict[str, int], history: list[int], slate: list[int]) -> tuple:
    """A [1, S, K] session built by hand from the contract in docs/export.md."""
    k, s = contract["slate_size"], contract["slates"]
    items = torch.zeros(1, s, k, dtype=torch.long)
    chunks = [
        history[max(0, len(history) - (j + 1) * k) : len(history) - j * k]
        for j in range((len(history) + k - 1) // k)
    ]
    for j, chunk in enumerate(chunks):  # chunk 0 = the most recent K, in slate s − 2
        items[0, s - 2 - j, : len(chunk)] = torch.tensor(chunk)
    items[0, s - 1, : len(slate)] = torch.tensor(slate)
    mask = items != 0
    clicks = mask.float()
    clicks[0, s - 1] = 0.0
    return items, mask, clicks


@pytest.mark.parametrize("name", ["ncm", "scot", "ncm-tgru"])
def test_slate_models_serve_the_documented_session(
    name: str, data: tuple[Path, Path], tmp_path: Path
) -> None:
    directory = _export(name, tmp_path, data)
    model = open_model(directory, providers=["CPUExecutionProvider"])
    run = load_run(tmp_path / "runs" / name)
    item, cat = run.vocabs["item"], run.vocabs["category"]
    tokens = item.tokens[:9]
    request = ScoringRequest(
        "u", [(t, cat.tokens[0]) for t in tokens], [(t, cat.tokens[1]) for t in tokens[:4]]
    )
    items, mask, clicks = _reference_session(
        model.manifest["slate"],
        [item.index(t) for t in tokens],
        [item.index(t) for t in tokens[:4]],
    )
    cats = torch.where(mask, torch.full_like(items, cat.index(cat.tokens[0])), 0)
    cats[0, -1, :4] = cat.index(cat.tokens[1])
    with torch.no_grad():
        want = torch.sigmoid(run.model(items, cats, mask, clicks, torch.rand(items.shape)))[
            0, -1, :4
        ]
    np.testing.assert_allclose(model.score([request])[0][:, 0], want.numpy(), atol=1e-5)


def test_the_manifest_is_complete(data: tuple[Path, Path], tmp_path: Path) -> None:
    directory = _export("sarn", tmp_path, data)
    manifest = read_manifest(directory)
    session = ort.InferenceSession(
        str(directory / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert manifest["inputs"] == [
        {"name": i.name, "dtype": "int64", "shape": i.shape} for i in session.get_inputs()
    ]
    assert [o["name"] for o in manifest["outputs"]] == ["scores"]
    assert manifest["outputs"][0]["shape"] == ["N"] and manifest["outputs"][0]["dtype"] == "float32"
    sha = hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
    assert manifest["onnx"]["sha256"] == sha == manifest["files"]["model.onnx"]["sha256"]
    assert manifest["onnx"]["opset"] >= 17 and manifest["onnx"]["exporter"] == "torchscript"
    on_disk = {p.name for p in directory.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    run = load_run(tmp_path / "runs" / "sarn")
    assert manifest["vocabularies"]["item"]["size"] == len(run.vocabs["item"])
    assert {v["file"] for v in manifest["vocabularies"].values()} <= on_disk
    assert (manifest["name"], manifest["version"], manifest["model_type"]) == ("sarn", 1, "sarn")
    assert manifest["kind"] == "behavior" and manifest["history_len"] == run.spec.history_len
    assert manifest["context_fields"] == ["device"]
    assert manifest["training_metrics"]["valid"] == {"auc": 0.5}
    assert manifest["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert manifest["session_options"]["execution_mode"] == "ORT_SEQUENTIAL"
    assert manifest["created_at"].endswith("+00:00")


def test_versions_default_to_the_next_free_and_are_never_overwritten(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    run = make_run(tmp_path / "run", "wdl", data[0])
    repo = tmp_path / "repo"
    first = export_run(run, repo, ExportOptions())
    second = export_run(run, repo, ExportOptions())
    pinned = export_run(run, repo, ExportOptions(version=7, name="wdl-b"))
    assert (first.version, second.version, pinned.version) == (1, 2, 7)
    with pytest.raises(FileExistsError):
        export_run(run, repo, ExportOptions(version=2))
    assert list_models(repo) == {"wdl": [1, 2], "wdl-b": [7]}


def test_a_failed_parity_check_publishes_nothing(data: tuple[Path, Path], tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "gru", data[0])
    with pytest.raises(ParityError, match="not published"):
        export_run(run, tmp_path / "repo", ExportOptions(tolerance=-1.0))  # nothing can pass
    assert list_models(tmp_path / "repo") == {}
    assert not (tmp_path / "repo" / "gru").exists()  # no temporary or empty directory left


def test_fp16_variant_is_validated_and_loadable(data: tuple[Path, Path], tmp_path: Path) -> None:
    directory = _export("fat", tmp_path, data, fp16=True)
    variant = read_manifest(directory)["variants"]["fp16"]
    assert variant["max_abs_diff_vs_fp32"] <= variant["tolerance"] == 2e-3
    assert variant["valid_auc_abs_diff"] <= variant["auc_tolerance"] and variant["valid_n"] == 160
    fp32 = open_model(directory, providers=["CPUExecutionProvider"])
    fp16 = open_model(directory, providers=["CPUExecutionProvider"], precision="fp16")
    requests = [
        ScoringRequest("u1", [("i1", "c1")], [("i2", "c2"), ("i3", "c3")], {"device": "ios"})
    ]
    a, b = fp32.score(requests)[0], fp16.score(requests)[0]
    assert np.abs(a - b).max() <= 2e-3 and not np.array_equal(a, b)  # it is a different graph


def test_the_cli_exports_a_trained_run(data: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from models.training.loop import train_config_for
    from models.training.run import train_run
    from slatectr.cli import app

    run_dir = tmp_path / "run"
    train_run(
        "din",
        data[0],
        data[0],
        run_dir,
        train_config_for("din", epochs=1, history_len=8),
        model_overrides={"embed_dim": 4, "attention_hidden": (8,), "mlp_hidden": (8,)},
        progress=False,
    )
    result = CliRunner().invoke(
        app,
        [
            "export",
            "--run",
            str(run_dir),
            "--repo",
            str(tmp_path / "repo"),
            "--data",
            str(data[0]),
            "--name",
            "din-cli",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["name"] == "din-cli" and summary["version"] == 1
    assert summary["max_abs_diff"] <= 1e-5
    bad = CliRunner().invoke(
        app, ["export", "--run", str(tmp_path / "nope"), "--repo", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "not a complete run directory" in bad.output


def test_the_dynamo_exporter_passes_the_same_gate(data: tuple[Path, Path], tmp_path: Path) -> None:
    directory = _export("wdl", tmp_path, data, exporter="dynamo")
    manifest = read_manifest(directory)
    assert manifest["onnx"]["exporter"] == "dynamo" and manifest["onnx"]["opset"] >= 18
    assert manifest["parity"]["max_abs_diff"] <= 1e-5
    model = open_model(directory, providers=["CPUExecutionProvider"])
    assert "user" in model.input_names  # Wide&Deep uses the user id
    request = ScoringRequest("u1", [("i1", "c1")], [("i2", "c2")], {"device": "ios"})
    assert model.score([request])[0].shape == (1, 1)  # one candidate, one output
