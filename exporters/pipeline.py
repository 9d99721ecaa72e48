"""`ctr export`: a training run -> a verified, versioned model directory (torch).

Order of work, all inside the repository's temporary directory so a failure publishes nothing:
feature spec + vocabularies -> ONNX graphs (every serving layout of the model,
`exporters.layouts`) -> parity gate of each graph (fp32, 1e-5) -> optional fp16 variant of
`model.onnx` and its gate -> manifest (`graphs` in order of preference, sha256 of every file)
-> atomic rename to `REPO/<name>/<version>`. A `cpu-fused` graph is written only where the
custom-op library is built, since its parity cannot be checked without it.
Afterwards the published directory is opened once through the torch-free loader, so the file
the service will read is the file that was checked.
"""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import torch

from exporters import cases as case_lib
from exporters import fp16
from exporters.layouts import SLATE, GraphFile, export_layouts, has_fused_layout
from exporters.onnx_export import Exporter, describe_graph
from exporters.parity import FP32_TOLERANCE, Encoder, Flatten, ParityReport, check_parity
from exporters.slate_export import export_slate
from models.data.schema import load_behavior, load_slates
from models.nets.base import BehaviorModel
from models.registry import ALL_MODELS, is_slate_model
from models.training.checkpoint import LoadedRun, load_run
from runtime.features import DEFAULT_HISTORY_LEN
from runtime.feeds import BEHAVIOR_INPUTS, ScoringRequest, encode_behavior
from runtime.loader import DEFAULT_SESSION_OPTIONS, open_model, register_ops, session_options
from runtime.ortops import library_path
from runtime.repository import (
    MODEL_FILE,
    ModelIntegrityError,
    latest_version,
    model_dir,
    publish,
    read_manifest,
    sha256_file,
    write_manifest,
)
from runtime.slate_feeds import SLATE_INPUTS, SlateContract, encode_slates, flatten_slate_scores

SLATE_HISTORY = DEFAULT_HISTORY_LEN  # history items a slate model's serving graph holds


@dataclass
class ExportOptions:
    name: str | None = None  # default: the run's --model name
    version: int | None = None  # default: the next free one
    data: Path | None = None  # labelled samples for real-data parity and the fp16 AUC check
    fp16: bool = False
    exporter: Exporter = "torchscript"
    intra_op_threads: int = 1  # recorded default; the service may override per process
    slate_history: int = SLATE_HISTORY  # slate models: history items in the serving graph
    parity_rows: int = 512  # data rows used as real parity batches
    auc_rows: int = 20_000  # data rows used for the fp16 validation AUC
    tolerance: float = FP32_TOLERANCE  # max |ONNX − PyTorch| accepted in fp32


@dataclass
class ExportResult:
    directory: Path
    name: str
    version: int
    parity: ParityReport  # model.onnx's
    fp16: dict[str, Any] | None
    warnings: list[str]  # for stderr: what changes for clients once this version is served
    graphs: list[dict[str, Any]] = field(default_factory=list)  # the manifest's `graphs`

    def summary(self) -> dict[str, Any]:
        """`max_abs_diff`: the worst graph's; `layouts`: each graph's, in order of preference."""
        layouts = {g["layout"]: g["parity"]["max_abs_diff"] for g in self.graphs}
        return {
            "name": self.name,
            "version": self.version,
            "dir": str(self.directory),
            "max_abs_diff": max([self.parity.max_abs_diff, *layouts.values()]),
            "tolerance": self.parity.tolerance,
            "layouts": layouts,
            "fp16": self.fp16,
        }


@dataclass
class _Plan:
    """How one run is encoded, traced and checked (behaviour vs slate differ only here)."""

    kind: str
    history_len: int
    encode: Encoder
    flatten: Flatten | None
    inputs: Sequence[str]
    contract: SlateContract | None
    labelled: tuple[list[ScoringRequest], np.ndarray] | None
    edge: case_lib.Cases


def _plan(run: LoadedRun, options: ExportOptions, frame: pd.DataFrame | None) -> _Plan:
    spec, vocabs = run.spec, run.vocabs
    if is_slate_model(run.name):
        contract = SlateContract.for_history(spec.slate_size, options.slate_history)

        def encode_s(requests: Sequence[ScoringRequest]) -> dict[str, np.ndarray]:
            return encode_slates(requests, spec, vocabs, contract.history_len, contract, seed=0)

        labelled = case_lib.slate_requests(frame) if frame is not None else None
        edge = case_lib.edge_cases(spec, vocabs, contract.history_len, contract.slate_size)
        return _Plan(
            "slate",
            contract.history_len,
            encode_s,
            flatten_slate_scores,
            SLATE_INPUTS,
            contract,
            labelled,
            edge,
        )

    def encode_b(requests: Sequence[ScoringRequest]) -> dict[str, np.ndarray]:
        return encode_behavior(requests, spec, vocabs, spec.history_len)

    labelled = case_lib.behavior_requests(frame, spec.context_fields) if frame is not None else None
    edge = case_lib.edge_cases(spec, vocabs, spec.history_len, max_slate=100)
    return _Plan(
        "behavior", spec.history_len, encode_b, None, BEHAVIOR_INPUTS, None, labelled, edge
    )


def _load_frame(run: LoadedRun, path: Path | None, rows: int) -> pd.DataFrame | None:
    if path is None:
        return None
    frame = load_slates(path) if is_slate_model(run.name) else load_behavior(path)
    return frame.head(rows)


def _export(run: LoadedRun, plan: _Plan, directory: Path, exporter: Exporter) -> list[GraphFile]:
    """Every serving graph of the run, written into `directory`, in order of preference."""
    if plan.contract is not None:
        module, _ = export_slate(run.model, directory / MODEL_FILE, plan.contract, exporter)
        return [GraphFile(SLATE, MODEL_FILE, module)]
    assert isinstance(run.model, BehaviorModel)
    fused = library_path() is not None
    return export_layouts(run.model, directory, len(run.spec.context_fields), exporter, fused)


def _opset(path: Path) -> int:
    """The default-domain opset a written graph imports."""
    imports = onnx.load(str(path), load_external_data=False).opset_import
    return next(o.version for o in imports if o.domain in ("", "ai.onnx"))


def export_run(run_dir: Path, repo: Path, options: ExportOptions | None = None) -> ExportResult:
    """Exports `run_dir` into `repo`; raises ParityError / Fp16Error (nothing published)."""
    options = options or ExportOptions()
    torch.set_num_threads(max(1, options.intra_op_threads))
    run = load_run(run_dir)
    plan = _plan(run, options, _load_frame(run, options.data, options.parity_rows))
    cases = dict(plan.edge)
    if plan.labelled is not None:
        cases.update(case_lib.real_cases(plan.labelled[0]))
    job = _Job(Path(run_dir), run, options, plan, cases)
    name = options.name or run.name
    before = _latest_outputs(repo, name)
    directory, version = publish(repo, name, options.version, job.write)
    _smoke_test(directory, cases)
    assert job.parity is not None and job.graphs is not None
    after = _output_names(read_manifest(directory))
    return ExportResult(
        directory,
        name,
        version,
        job.parity,
        job.fp16,
        job.notes + _output_change(name, before, (version, after)),
        job.graphs,
    )


def _latest_outputs(repo: Path, name: str) -> tuple[int, list[str]] | None:
    """(version, output names) of the name's highest version; None when there is none or it
    cannot be read (a warning must never stop the export that would replace it)."""
    try:
        version = latest_version(repo, name)
        return version, _output_names(read_manifest(model_dir(repo, name, version)))
    except (LookupError, ModelIntegrityError, OSError, ValueError):
        return None


def _output_names(manifest: dict[str, Any]) -> list[str]:
    return [output["name"] for output in manifest.get("outputs", [])]


def _output_change(
    name: str, before: tuple[int, list[str]] | None, after: tuple[int, list[str]]
) -> list[str]:
    """A warning when the new version changes the fields of the name's /v1/score answers."""
    if before is None or set(before[1]) == set(after[1]):
        return []
    changes = [
        f"{verb} {', '.join(names)}"
        for verb, names in (
            ("gain", [n for n in after[1] if n not in before[1]]),
            ("lose", [n for n in before[1] if n not in after[1]]),
        )
        if names
    ]
    return [
        f"{name} version {after[0]} outputs {', '.join(after[1])} where version {before[0]} "
        f"outputs {', '.join(before[1])}: once it is served, /v1/score answers for {name} "
        f"{' and '.join(changes)}"
    ]


@dataclass
class _Job:
    """One export, written into the repository's temporary directory by `write`."""

    run_dir: Path
    run: LoadedRun
    options: ExportOptions
    plan: _Plan
    cases: case_lib.Cases
    parity: ParityReport | None = None  # model.onnx's (the manifest's top-level `parity`)
    graphs: list[dict[str, Any]] | None = None  # the manifest's `graphs`, each with its parity
    fp16: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # for stderr

    @property
    def session_options(self) -> dict[str, Any]:
        return {**DEFAULT_SESSION_OPTIONS, "intra_op_num_threads": self.options.intra_op_threads}

    def write(self, tmp: Path, version: int) -> None:
        self.run.spec.save(tmp, self.run.vocabs)
        graphs = _export(self.run, self.plan, tmp, self.options.exporter)
        if not any(g.needs_ops for g in graphs) and has_fused_layout(self.run.model):
            self.notes.append(
                "the custom-op library is not built here (no C compiler at install, or "
                "SLATECTR_ORTOPS): the model directory has no cpu-fused graph"
            )
        reports = [self._check_parity(tmp / g.file, g) for g in graphs]
        self.graphs = [_graph_entry(g, r) for g, r in zip(graphs, reports, strict=True)]
        self.parity = reports[[g.file for g in graphs].index(MODEL_FILE)]
        variants = {}
        if self.options.fp16:  # of model.onnx: the portable layout, which the GPU runs
            layout = {"layout": graphs[-1].layout}
            variants["fp16"] = {**self._fp16_variant(tmp), **layout}
        self.fp16 = variants.get("fp16")
        opset = _opset(tmp / MODEL_FILE)
        write_manifest(tmp, self._manifest(version, opset, variants, tmp / MODEL_FILE))

    def _check_parity(self, path: Path, graph: GraphFile) -> ParityReport:
        options = session_options(self.session_options)
        if graph.needs_ops and (why := register_ops(options)) is not None:
            raise RuntimeError(f"{path.name}: {why}")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        pairwise = self.run.model if isinstance(self.run.model, BehaviorModel) else None
        report = check_parity(
            session,
            graph.module,
            self.plan.inputs,
            self.cases,
            self.plan.encode,
            self.plan.flatten,
            pairwise,
            self.options.tolerance,
        )
        report.raise_if_failed()
        return report

    def _fp16_variant(self, tmp: Path) -> dict[str, Any]:
        if self.options.data is None:
            raise ValueError("--fp16 needs --data: the fp16 variant is accepted on validation AUC")
        fp16.convert(tmp / MODEL_FILE, tmp / fp16.FP16_FILE)
        frame = _load_frame(self.run, self.options.data, self.options.auc_rows)
        assert frame is not None
        labelled = (
            case_lib.slate_requests(frame)
            if self.plan.kind == "slate"
            else case_lib.behavior_requests(frame, self.run.spec.context_fields)
        )
        options = session_options({**self.session_options, **fp16.SESSION_OVERRIDES})
        report = fp16.validate(
            tmp / MODEL_FILE,
            tmp / fp16.FP16_FILE,
            options,
            self.cases,
            self.plan.encode,
            self.plan.flatten,
            labelled,
        )
        report.raise_if_failed()
        return report.to_json()

    def _manifest(
        self, version: int, opset: int, variants: dict[str, Any], onnx_path: Path
    ) -> dict[str, Any]:
        run, options, plan = self.run, self.options, self.plan
        assert self.parity is not None
        manifest: dict[str, Any] = {
            "name": options.name or run.name,
            "version": version,
            "model_type": run.name,
            "model_class": ALL_MODELS[run.name],
            "kind": plan.kind,
            "tasks": list(getattr(run.model, "tasks", ("ctr",))),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source_run": str(self.run_dir.resolve()),
            "onnx": _onnx_info(onnx_path, opset, options.exporter),
            **describe_graph(onnx_path),  # "inputs", "outputs"
            "history_len": plan.history_len,
            "context_fields": list(run.spec.context_fields),
            "vocabularies": {
                vocab: {"file": run.spec.vocab_files[vocab], "size": len(v)}
                for vocab, v in run.vocabs.items()
            },
            "feature_spec": "feature_spec.json",
            "training_metrics": {
                k: run.metrics.get(k) for k in ("valid", "best_epoch", "stopped_early")
            },
            "model_config": run.config.get("model_config", {}),
            "session_options": self.session_options,
            "parity": {
                **self.parity.to_json(),
                "data": str(options.data) if options.data else None,
            },
            "graphs": self.graphs,
            "variants": variants,
        }
        if plan.contract is not None:
            manifest["slate"] = plan.contract.to_manifest()
        return manifest


def _graph_entry(graph: GraphFile, report: ParityReport) -> dict[str, Any]:
    """One `graphs` entry of the manifest (runtime.repository.graph_entries reads it)."""
    return {
        "file": graph.file,
        "layout": graph.layout,
        "providers": list(graph.providers),
        "requires": graph.requires(),
        "parity": report.to_json(),
    }


def _onnx_info(path: Path, opset: int, exporter: str) -> dict[str, Any]:
    versions = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }
    return {
        "file": MODEL_FILE,
        "sha256": sha256_file(path),
        "opset": opset,
        "exporter": exporter,
        "versions": versions,
    }


def _smoke_test(directory: Path, cases: case_lib.Cases) -> None:
    """The published directory opens through the torch-free loader and scores a request."""
    model = open_model(directory, providers=["CPUExecutionProvider"])
    scores = model.score(cases["mixed_slate_sizes"])
    if not all(np.isfinite(s).all() for s in scores):
        raise RuntimeError(f"{directory}: the loader produced non-finite scores")
