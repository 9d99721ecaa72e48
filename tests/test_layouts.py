"""Serving layouts (exporters/layouts, runtime/ortops, the loader's choice): every graph a model
directory holds passes the parity gate, and the loader picks one per provider and falls back
to the pure-ONNX graphs when the custom-op library is missing, disabled or broken.

Real ONNX Runtime sessions on the files the export wrote; tiny configs with two context
fields, single- and multi-task. No mocks: a broken library is a real file that is not one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_support import behaviour_frame, make_run, perturb

from exporters.cases import edge_cases
from exporters.layouts import BATCHED, FUSED, LOOP, GraphFile, export_layouts
from exporters.parity import check_parity, run_eager, run_session
from exporters.pipeline import ExportOptions, export_run
from models.nets.base import BehaviorModel
from models.registry import model_class
from models.training.checkpoint import config_from_dict
from runtime.features import FeatureSpec, Vocabulary
from runtime.feeds import BEHAVIOR_INPUTS, encode_behavior
from runtime.loader import open_model, register_ops, session_options
from runtime.ortops import ISA_ENV, LIBRARY_ENV, library_path
from runtime.repository import read_manifest

ROOT = Path(__file__).resolve().parents[1]
HISTORY = 6
CONTEXTS = ("device", "site")
TINY = {
    "sarn": {"embedding_dim": 4, "relation_width": 6, "attention_hidden": 6, "hidden_dims": (6, 4)},
    "din": {"embed_dim": 4, "context_dim": 3, "attention_hidden": (6, 5), "mlp_hidden": (6, 4)},
    "fat": {"d": 8, "heads": 2, "d_ff": 8, "num_bases": 4, "meta_dim": 4, "top_k": 2,
            "attention_hidden": 6, "tower_hidden": 6},
}  # fmt: skip
LAYOUTS = {"sarn": [FUSED, LOOP, BATCHED], "din": [FUSED, LOOP, BATCHED], "fat": [LOOP, BATCHED]}


def _vocabs() -> dict[str, Vocabulary]:
    return {
        "item": Vocabulary([f"i{i}" for i in range(30)]),
        "category": Vocabulary([f"c{i}" for i in range(5)]),
        "user": Vocabulary([f"u{i}" for i in range(6)]),
        **{f"context_{c}": Vocabulary(["a", "b", "c"]) for c in CONTEXTS},
    }


def _model(name: str, tasks: tuple[str, ...]) -> BehaviorModel:
    cls = model_class(name)
    config = config_from_dict(cls.config_class, {**TINY[name], "tasks": tasks})
    sizes = {key: len(v) + 2 for key, v in _vocabs().items()}  # + PAD and OOV
    torch.manual_seed(0)
    model: BehaviorModel = cls(sizes, config)
    perturb(model, seed=1, scale=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[GraphFile]]]:
    """Every layout of every (model, tasks) pair, written once for the module."""
    torch.set_num_threads(1)
    out = {}
    for name in LAYOUTS:
        for tasks in (("ctr",), ("ctr", "cvr")):
            key = f"{name}-{'-'.join(tasks)}"
            directory = tmp_path_factory.mktemp(key)
            out[key] = (directory, export_layouts(_model(name, tasks), directory, len(CONTEXTS)))
    return out


def _session(path: Path, fused: bool) -> ort.InferenceSession:
    options = session_options()
    assert not fused or register_ops(options) is None
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_make_venv_built_the_custom_op_library() -> None:
    """gcc is on every machine: `make venv` (pip install -e .) must have compiled it."""
    os.environ.pop(LIBRARY_ENV, None)
    library = library_path()
    assert library is not None and library.is_file(), "runtime/ortops was not built"


@pytest.mark.parametrize("key", ["sarn-ctr", "sarn-ctr-cvr", "din-ctr", "din-ctr-cvr", "fat-ctr",
                                 "fat-ctr-cvr"])  # fmt: skip
def test_every_layout_passes_the_parity_gate(
    key: str, written: dict[str, tuple[Path, list[GraphFile]]]
) -> None:
    directory, graphs = written[key]
    assert [g.layout for g in graphs] == LAYOUTS[key.split("-")[0]]
    assert graphs[-1].file == "model.onnx"
    spec = FeatureSpec(history_len=HISTORY, context_fields=list(CONTEXTS))
    vocabs = _vocabs()
    cases = edge_cases(spec, vocabs, HISTORY, max_slate=20)

    def encode(requests: object) -> dict[str, np.ndarray]:
        return encode_behavior(requests, spec, vocabs, HISTORY)  # type: ignore[arg-type]

    model = graphs[0].module.model  # type: ignore[union-attr]
    for graph in graphs:
        session = _session(directory / graph.file, graph.needs_ops)
        report = check_parity(session, graph.module, BEHAVIOR_INPUTS, cases, encode, None, model)
        assert report.passed, (graph.layout, report.max_abs_diff)
        assert {c.name for c in report.cases} >= {"empty_history", "unknown_ids", "many_candidates"}


def _ragged_feeds(seed: int) -> dict[str, np.ndarray]:
    """Four users, candidates shuffled across them, user 2 with none, user 3 without history."""
    rng = np.random.default_rng(seed)
    hist = rng.integers(2, 32, (4, HISTORY))
    hist[1, 3:] = 0
    hist[3] = 0
    index = rng.permutation(np.array([0] * 7 + [1] * 5 + [3] * 3))
    return {
        "user": rng.integers(0, 8, 4),
        "hist_items": hist,
        "hist_cats": np.where(hist > 0, hist % 5 + 2, 0),
        "context": rng.integers(0, 5, (4, len(CONTEXTS))),
        "cand_items": rng.integers(0, 32, index.size),
        "cand_cats": rng.integers(0, 7, index.size),
        "cand_user_index": index,
    }


@pytest.mark.parametrize("key", ["sarn-ctr", "din-ctr-cvr", "fat-ctr"])
def test_shuffled_candidates_and_a_user_without_any(
    key: str, written: dict[str, tuple[Path, list[GraphFile]]]
) -> None:
    directory, graphs = written[key]
    feeds = _ragged_feeds(seed=3)
    want = run_eager(graphs[-1].module, BEHAVIOR_INPUTS, feeds)
    for graph in graphs:
        got = run_session(_session(directory / graph.file, graph.needs_ops), feeds)
        assert np.abs(got - want).max() <= 1e-5, graph.layout


def test_the_sse2_kernels_match_too(written: dict[str, tuple[Path, list[GraphFile]]]) -> None:
    """The baseline (pre-AVX2) kernels, forced in a fresh process: the ISA is picked once."""
    feeds = _ragged_feeds(seed=4)
    jobs = {}
    for key in ("sarn-ctr", "din-ctr-cvr"):
        directory, graphs = written[key]
        want = run_eager(graphs[0].module, BEHAVIOR_INPUTS, feeds)
        jobs[key] = (str(directory / graphs[0].file), want.tolist())
    code = (
        "import json, sys, numpy as np, onnxruntime as ort\n"
        "from runtime.loader import register_ops, session_options\n"
        "feeds = {k: np.asarray(v, dtype=np.int64) for k, v in json.loads(sys.argv[1]).items()}\n"
        "for path, want in json.loads(sys.argv[2]).values():\n"
        "    options = session_options(); assert register_ops(options) is None\n"
        "    s = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])\n"
        "    names = [i.name for i in s.get_inputs()]\n"
        "    got = np.stack(s.run(None, {n: feeds[n] for n in names}), axis=-1).squeeze()\n"
        "    assert np.abs(got - np.asarray(want).squeeze()).max() <= 1e-5, path\n"
        "import ctypes, runtime.ortops as o\n"
        "print(ctypes.CDLL(str(o.library_path())).slatectr_ops_isa())\n"
    )
    args = [json.dumps({k: v.tolist() for k, v in feeds.items()}), json.dumps(jobs)]
    env = {**os.environ, ISA_ENV: "sse2"}
    env.pop(LIBRARY_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "0"  # the baseline path ran


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SARN model directory written by `ctr export`'s pipeline, with its fp16 variant."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "behavior.parquet"
    behaviour_frame(120, seed=0).to_parquet(data)
    run = make_run(root / "run", "sarn", data)
    return export_run(run, root / "repo", ExportOptions(data=data, fp16=True)).directory


def test_the_manifest_lists_every_graph_with_its_parity(repo: Path) -> None:
    manifest = read_manifest(repo)
    graphs = manifest["graphs"]
    assert manifest["format_version"] == 3
    assert [g["layout"] for g in graphs] == [FUSED, LOOP, BATCHED]
    assert [g["file"] for g in graphs] == [
        "model.cpu-fused.onnx",
        "model.cpu-loop.onnx",
        "model.onnx",
    ]
    assert graphs[0]["requires"] == {"custom_op_domain": "slatectr", "custom_op_version": 1}
    assert graphs[0]["providers"] == ["CPUExecutionProvider"]
    assert graphs[2]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    for graph in graphs:
        assert graph["file"] in manifest["files"]
        assert graph["parity"]["passed"] and graph["parity"]["max_abs_diff"] <= 1e-5
        assert any(c["name"] == "real_0" for c in graph["parity"]["cases"])


@pytest.mark.parametrize(
    ("setting", "layout"),
    [(None, FUSED), ("off", LOOP), ("/nonexistent/lib.so", LOOP), ("broken", LOOP)],
)
def test_the_loader_falls_back_to_pure_onnx_without_the_library(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None, layout: str
) -> None:
    if setting == "broken":  # a real file that is no shared object: registration fails
        setting = str(tmp_path / "libslatectr_ops.so")
        Path(setting).write_bytes(b"\x7fELF not really")
    if setting is None:
        monkeypatch.delenv(LIBRARY_ENV, raising=False)
    else:
        monkeypatch.setenv(LIBRARY_ENV, setting)
    model = open_model(repo, providers=["CPUExecutionProvider"])
    assert model.layout == layout
    monkeypatch.setenv(LIBRARY_ENV, "off")
    reference = open_model(repo, providers=["CPUExecutionProvider"])
    requests = edge_cases(model.spec, model.vocabs, model.history_len, 20)["mixed_slate_sizes"]
    got, want = model.score(requests), reference.score(requests)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True)) <= 1e-5


def test_a_graph_for_another_op_set_version_is_not_opened(repo: Path, tmp_path: Path) -> None:
    """ORT does not compare custom-domain versions; the loader does (runtime.ortops)."""
    newer = tmp_path / "newer"
    newer.mkdir()
    for path in repo.iterdir():
        (newer / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["graphs"][0]["requires"]["custom_op_version"] = 2
    (newer / "manifest.json").write_text(json.dumps(manifest))
    assert open_model(newer, providers=["CPUExecutionProvider"]).layout == LOOP


def test_the_loader_picks_the_graph_of_the_provider(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LIBRARY_ENV, raising=False)
    # CUDA asked for first: this box's ORT has no usable CUDA, the session falls back to the
    # CPU, and the loader chooses again for the CPU (the fused graph, not the GPU layout).
    gpu_first = open_model(repo, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu_first.providers == ["CPUExecutionProvider"] and gpu_first.layout == FUSED
    # A manifest without `graphs` (format 2) serves model.onnx as before.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for path in repo.iterdir():
        (legacy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["graphs"]
    manifest["format_version"] = 2
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    assert open_model(legacy, providers=["CPUExecutionProvider"]).layout == "slate-shared"


def test_the_fp16_variant_is_the_gpu_layout_converted(repo: Path) -> None:
    variant = read_manifest(repo)["variants"]["fp16"]
    assert variant["layout"] == BATCHED and variant["max_abs_diff_vs_fp32"] <= 2e-3
    fp16 = open_model(repo, providers=["CPUExecutionProvider"], precision="fp16")
    assert fp16.layout == BATCHED


def test_an_empty_batch_never_reaches_a_graph(repo: Path) -> None:
    """N = 0 is legal but some graphs cannot run it (docs/export.md): the loader answers it."""
    model = open_model(repo, providers=["CPUExecutionProvider"])
    feeds = model.encode([])
    assert model.run(feeds).shape == (0, 1)


@pytest.mark.parametrize("contexts", [CONTEXTS, ()], ids=["with-context", "no-user-field"])
def test_fat_without_a_user_token_passes_the_parity_gate(
    contexts: tuple[str, ...], tmp_path: Path
) -> None:
    """`--set user_token=false` (FAT's docstring: the MovieLens runs) changes the field count;
    without context fields the first block has no user field at all."""
    cls = model_class("fat")
    config = config_from_dict(cls.config_class, {**TINY["fat"], "user_token": False})
    vocabs = {
        key: vocab
        for key, vocab in _vocabs().items()
        if not key.startswith("context_") or key.removeprefix("context_") in contexts
    }
    torch.manual_seed(0)
    model: BehaviorModel = cls({key: len(v) + 2 for key, v in vocabs.items()}, config)
    perturb(model, seed=1, scale=0.2)
    graphs = export_layouts(model.eval(), tmp_path, len(contexts))
    spec = FeatureSpec(history_len=HISTORY, context_fields=list(contexts))
    cases = edge_cases(spec, vocabs, HISTORY, max_slate=20)

    def encode(requests: object) -> dict[str, np.ndarray]:
        return encode_behavior(requests, spec, vocabs, HISTORY)  # type: ignore[arg-type]

    assert [g.layout for g in graphs] == LAYOUTS["fat"]
    for graph in graphs:
        session = _session(tmp_path / graph.file, graph.needs_ops)
        report = check_parity(session, graph.module, BEHAVIOR_INPUTS, cases, encode, None, model)
        assert report.passed, (graph.layout, report.max_abs_diff)
