"""The torch-free loader: integrity checks, request encoding, scoring, and a torch-less import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from export_support import MAX_LEN, make_run, write_data

from exporters.loader import ModelIntegrityError, ScoringRequest, open_model
from exporters.pipeline import ExportOptions, export_run
from models.batch import BehaviorBatch
from models.checkpoint import load_run
from models.dataset import encode_behavior
from models.features import OOV, PAD

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """-> (model directory of an exported DIN, its run directory)."""
    root = tmp_path_factory.mktemp("loader")
    behaviour, _ = write_data(root / "data")
    run = make_run(root / "run", "din", behaviour)
    result = export_run(run, root / "repo", ExportOptions(data=behaviour))
    return result.directory, run


def _requests() -> list[ScoringRequest]:
    long_history = [(f"i{i}", f"c{i % 7}") for i in range(3 * MAX_LEN)]
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
    """Independent reference: the training pipeline's encoder + the model's pairwise forward."""
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
    arrays = encode_behavior(pd.DataFrame(rows), run.vocabs, run.spec.max_len, ["device"])
    batch = BehaviorBatch(
        *(
            torch.from_numpy(getattr(arrays, f))
            for f in ("user", "hist_items", "hist_cats", "items", "cats", "context", "label")
        )
    )
    with torch.no_grad():
        flat = torch.sigmoid(run.model(batch)).numpy()
    return list(np.split(flat, np.cumsum([len(r.candidates) for r in requests])[:-1]))


def test_scores_match_the_training_pipeline(exported: tuple[Path, Path]) -> None:
    model = open_model(exported[0], providers=["CPUExecutionProvider"])
    requests = _requests()
    scores = model.score(requests)
    reference = _training_encoder_scores(exported[1], requests)
    assert [len(s) for s in scores] == [2, 1, 3, 0]
    for got, want in zip(scores, reference, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert model.kind == "behavior" and model.max_history == MAX_LEN
    assert model.providers == ["CPUExecutionProvider"] and model.outputs == ["scores"]
    assert (model.name, model.version) == ("din", 1)


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
    assert feeds["hist_items"].shape == (4, MAX_LEN)  # L = longest kept history
    assert feeds["cand_user_index"].tolist() == [0, 0, 1, 2, 2, 2]
    assert feeds["context"].shape == (4, 1)
    # The long history keeps its LAST max_history items, oldest first.
    kept = [vocabs["item"].index(f"i{i}") for i in range(2 * MAX_LEN, 3 * MAX_LEN)]
    assert feeds["hist_items"][2].tolist() == kept
    assert feeds["hist_items"][1].tolist() == [PAD] * MAX_LEN  # empty history: all padding
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
        from exporters.loader import ScoringRequest, open_model
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
        from exporters.loader import ScoringRequest, open_model
        model = open_model({str(directory)!r}, providers=["CPUExecutionProvider"])
        empty = [ScoringRequest("u1", [("i1", "c1")], [], {{}})]
        assert model.run(model.encode(empty)).shape == (0,)
        assert model.run(model.encode([])).shape == (0,)
        assert [s.shape for s in model.score(empty)] == [(0,)] and model.score([]) == []
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr)
