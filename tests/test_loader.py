"""The torch-free loader: integrity checks, request encoding, scoring, and a torch-less import."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from export_support import HISTORY_LEN, make_run, write_data

from exporters.pipeline import ExportOptions, export_run
from models.data.batch import BehaviorBatch
from models.data.dataset import encode_behavior
from models.training.checkpoint import load_run
from runtime.features import OOV, PAD
from runtime.loader import ModelIntegrityError, ScoringRequest, open_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """-> (model directory of an exported DIN, its run directory)."""
    root = tmp_path_factory.mktemp("loader")
    behaviour, _ = write_data(root / "data")
    run = make_run(root / "run", "din", behaviour)
    result = export_run(run, root / "repo", ExportOptions(data=behaviour))
    return result.directory, run


@pytest.fixture(scope="module")
def exported_mt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """-> (model directory of an exported multi-task DIN, its run directory)."""
    root = tmp_path_factory.mktemp("loader-mt")
    behaviour, _ = write_data(root / "data")
    run = make_run(root / "run", "din", behaviour, tasks=("ctr", "cvr"))
    result = export_run(run, root / "repo", ExportOptions(data=behaviour))
    return result.directory, run


MULTI_TASK_OUTPUTS = ("scores", "conversion_scores", "ctcvr_scores")


def _rewrite_outputs(source: Path, target: Path, outputs: list[Any]) -> Path:
    """A copy of a model directory whose manifest declares `outputs` (the manifest is not in
    its own file table, so the copy still passes the sha256 checks)."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "outputs": outputs}))
    return target


def _requests() -> list[ScoringRequest]:
    long_history = [(f"i{i}", f"c{i % 7}") for i in range(3 * HISTORY_LEN)]
    return [
        ScoringRequest(
            "u1", [("i1", "c1"), ("i2", "c2")], [("i3", "c3"), ("i4", "c4")], {"device": "ios"}
        ),
        ScoringRequest("u2", [], [("i5", "c5")], {"device": "web"}),
        ScoringRequest(
            "nobody",
            long_history,
            [("i9", "c2"), ("zzz", "c1"), ("i7", "nope")],
            {"device": "toaster"},
        ),
        ScoringRequest("u3", [("i1", "c1")], [], {}),  # no candidates, no context
    ]


def _training_encoder_scores(run_dir: Path, requests: list[ScoringRequest]) -> list[np.ndarray]:
    """Independent reference: the training pipeline's encoder + the model's pairwise forward.
    -> per request [K, T]: the sigmoid of each task's logit (T = 1, or 2 for ctr + cvr)."""
    run = load_run(run_dir)
    rows = [
        {
            "user_id": r.user_id,
            "item_id": item,
            "category_id": cat,
            "hist_item_ids": [h[0] for h in r.history],
            "hist_category_ids": [h[1] for h in r.history],
            "label": 0,
            "context_device": r.context.get("device", "\x00absent"),
        }
        for r in requests
        for item, cat in r.candidates
    ]
    arrays = encode_behavior(pd.DataFrame(rows), run.vocabs, run.spec.history_len, ["device"])
    batch = BehaviorBatch(
        *(
            torch.from_numpy(getattr(arrays, f))
            for f in ("user", "hist_items", "hist_cats", "items", "cats", "context", "label")
        )
    )
    with torch.no_grad():
        flat = torch.sigmoid(run.model(batch)).numpy().reshape(len(rows), -1)  # [B, T]
    return list(np.split(flat, np.cumsum([len(r.candidates) for r in requests])[:-1]))


def test_scores_match_the_training_pipeline(exported: tuple[Path, Path]) -> None:
    model = open_model(exported[0], providers=["CPUExecutionProvider"])
    requests = _requests()
    scores = model.score(requests)
    reference = _training_encoder_scores(exported[1], requests)
    assert model.output_names == ("scores",)  # a single-task model: one column
    assert [s.shape for s in scores] == [(2, 1), (1, 1), (3, 1), (0, 1)]
    for got, want in zip(scores, reference, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert model.kind == "behavior" and model.history_len == HISTORY_LEN
    assert model.providers == ["CPUExecutionProvider"] and model.outputs == ["scores"]
    assert (model.name, model.version) == ("din", 1)


def test_a_multi_task_model_serves_pctr_pcvr_and_their_product(
    exported_mt: tuple[Path, Path],
) -> None:
    """Columns in `output_names` order: pCTR and pCVR equal the training model's two towers,
    and pCTCVR their product, all from one `run`."""
    model = open_model(exported_mt[0], providers=["CPUExecutionProvider"])
    assert model.output_names == MULTI_TASK_OUTPUTS
    requests = _requests()
    scores = model.score(requests)
    assert [s.shape for s in scores] == [(2, 3), (1, 3), (3, 3), (0, 3)]
    reference = _training_encoder_scores(exported_mt[1], requests)
    for got, want in zip(scores, reference, strict=True):
        assert want.shape[1] == 2  # the training model has a CTR and a CVR tower
        np.testing.assert_allclose(got[:, :2], want, atol=1e-5)
        np.testing.assert_allclose(got[:, 2], want[:, 0] * want[:, 1], atol=1e-5)
        np.testing.assert_allclose(got[:, 2], got[:, 0] * got[:, 1], rtol=0, atol=1e-6)
    flat = model.run(model.encode(requests))
    assert flat.shape == (6, 3) and flat.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(scores), flat)
    assert not np.allclose(flat[:, 0], flat[:, 1])  # two different towers


def test_the_manifest_decides_which_outputs_are_served(
    exported_mt: tuple[Path, Path], tmp_path: Path
) -> None:
    """Names may be given as plain strings; a manifest that lists only `scores` serves the
    multi-task graph as a single-task model (one column, equal to pCTR)."""
    full = open_model(exported_mt[0], providers=["CPUExecutionProvider"])
    named = _rewrite_outputs(exported_mt[0], tmp_path / "named", list(MULTI_TASK_OUTPUTS))
    assert open_model(named, providers=["CPUExecutionProvider"]).output_names == MULTI_TASK_OUTPUTS
    only = open_model(
        _rewrite_outputs(exported_mt[0], tmp_path / "only", ["scores"]),
        providers=["CPUExecutionProvider"],
    )
    assert only.output_names == ("scores",)
    requests = _requests()
    for one, three in zip(only.score(requests), full.score(requests), strict=True):
        assert one.shape == (len(three), 1)
        np.testing.assert_array_equal(one[:, 0], three[:, 0])


def test_a_manifest_naming_outputs_the_graph_lacks_is_refused(
    exported: tuple[Path, Path], exported_mt: tuple[Path, Path], tmp_path: Path
) -> None:
    cases: list[tuple[Path, list[Any], str]] = [
        # A single-task graph whose manifest claims the multi-task outputs.
        (exported[0], list(MULTI_TASK_OUTPUTS), "lacks: conversion_scores, ctcvr_scores"),
        (exported[0], [{"name": "scores"}, {"name": "conversion_scores"}], "conversion_scores"),
        (exported_mt[0], ["scores", "ctcvr"], "lacks: ctcvr"),
        # pCTR must be column 0: every caller reads it there.
        (exported_mt[0], ["conversion_scores", "scores", "ctcvr_scores"], "first output"),
        (exported_mt[0], ["scores", "scores"], "twice"),
        (exported_mt[0], [], "non-empty list"),
        (exported_mt[0], [{"dtype": "float32"}], "without a name"),
    ]
    for k, (source, outputs, message) in enumerate(cases):
        copy = _rewrite_outputs(source, tmp_path / f"case-{k}", outputs)
        with pytest.raises(ModelIntegrityError, match=message):
            open_model(copy, providers=["CPUExecutionProvider"])


def test_a_score_does_not_depend_on_the_rest_of_its_batch(exported: tuple[Path, Path]) -> None:
    model = open_model(exported[0], providers=["CPUExecutionProvider"])
    requests = _requests()
    together = model.score(requests)
    alone = [model.score([r])[0] for r in requests]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_encode_builds_the_ragged_layout(exported: tuple[Path, Path]) -> None:
    model = open_model(exported[0], providers=["CPUExecutionProvider"])
    feeds = model.encode(_requests())
    vocabs = model.vocabs
    assert feeds["hist_items"].shape == (4, HISTORY_LEN)  # L = longest kept history
    assert feeds["cand_user_index"].tolist() == [0, 0, 1, 2, 2, 2]
    assert feeds["context"].shape == (4, 1)
    # The long history keeps its LAST history_len items, oldest first.
    kept = [vocabs["item"].index(f"i{i}") for i in range(2 * HISTORY_LEN, 3 * HISTORY_LEN)]
    assert feeds["hist_items"][2].tolist() == kept
    assert feeds["hist_items"][1].tolist() == [PAD] * HISTORY_LEN  # empty history: all padding
    assert (
        feeds["user"][2] == OOV and feeds["cand_items"][4] == OOV and feeds["cand_cats"][5] == OOV
    )
    assert feeds["context"][2, 0] == OOV and feeds["context"][3, 0] == OOV  # unknown, absent


def test_truncated_or_altered_files_are_refused_before_onnx_runtime_reads_them(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    for name, damage, message in [
        ("model.onnx", lambda b: b[: len(b) // 2], "truncated"),
        ("model.onnx", lambda b: b[:-9] + bytes(9), "altered"),
        ("vocab_item.json", lambda b: b[:-1] + (b"X" if b[-1:] != b"X" else b"Y"), "altered"),
    ]:
        copy = tmp_path / f"copy-{name}-{message}"
        shutil.copytree(exported[0], copy)
        (copy / name).write_bytes(damage((copy / name).read_bytes()))
        with pytest.raises(ModelIntegrityError, match=message):
            open_model(copy, providers=["CPUExecutionProvider"])


def test_a_version_exported_before_history_len_had_its_name_still_serves(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    """Manifest format 1 said `max_history` and the feature spec `max_len`: a repository
    written then keeps serving, with the same scores."""
    directory, _ = exported
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["max_history"] = manifest.pop("history_len")
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    spec = json.loads((old / "feature_spec.json").read_text())
    spec["max_len"] = spec.pop("history_len")
    del spec["slate_size"]
    (old / "feature_spec.json").write_text(json.dumps(spec))
    manifest["files"]["feature_spec.json"] = {
        "sha256": hashlib.sha256((old / "feature_spec.json").read_bytes()).hexdigest(),
        "bytes": (old / "feature_spec.json").stat().st_size,
    }
    (old / "manifest.json").write_text(json.dumps(manifest))
    legacy, current = open_model(old), open_model(directory)
    assert legacy.history_len == current.history_len == HISTORY_LEN
    assert legacy.spec.history_len == HISTORY_LEN and legacy.spec.slate_size == 0
    request = ScoringRequest("u1", [("i1", "c1")] * (HISTORY_LEN + 3), [("i2", "c2"), ("x", "y")])
    np.testing.assert_array_equal(legacy.score([request])[0], current.score([request])[0])


def test_a_missing_variant_is_a_clear_error(exported: tuple[Path, Path]) -> None:
    with pytest.raises(ModelIntegrityError, match="no fp16 variant"):
        open_model(exported[0], precision="fp16")


def test_the_loader_imports_and_scores_where_torch_cannot_be_imported(
    exported: tuple[Path, Path],
) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this process")
        sys.meta_path.insert(0, NoTorch())
        from runtime.loader import ScoringRequest, open_model
        model = open_model({str(exported[0])!r}, providers=["CPUExecutionProvider"])
        requests = [ScoringRequest("u1", [("i1", "c1"), ("i2", "c2")],
                                   [("i3", "c3"), ("i4", "c4")], {{"device": "ios"}})]
        scores = model.score(requests)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print(json.dumps([s.tolist() for s in scores]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    in_process = open_model(exported[0], providers=["CPUExecutionProvider"]).score(_requests()[:1])
    np.testing.assert_allclose(
        json.loads(out.stdout.strip().splitlines()[-1])[0], in_process[0], atol=1e-7
    )


def test_nothing_to_score_never_reaches_onnx_runtime(tmp_path: Path) -> None:
    """ORT 1.31 dies with SIGFPE on FAT's graph at N = 0; the loader must not call it then.
    Run in a subprocess so that a regression fails this test instead of killing pytest."""
    behaviour, _ = write_data(tmp_path / "data")
    run = make_run(tmp_path / "run", "fat", behaviour)
    directory = export_run(run, tmp_path / "repo", ExportOptions()).directory
    script = textwrap.dedent(
        f"""
        from runtime.loader import ScoringRequest, open_model
        model = open_model({str(directory)!r}, providers=["CPUExecutionProvider"])
        empty = [ScoringRequest("u1", [("i1", "c1")], [], {{}})]
        assert model.run(model.encode(empty)).shape == (0, 1)
        assert model.run(model.encode([])).shape == (0, 1)
        assert [s.shape for s in model.score(empty)] == [(0, 1)] and model.score([]) == []
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr)
