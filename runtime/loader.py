"""Opens an exported model directory for serving, without torch.

`open_model(dir)` reads the manifest, verifies the sha256 of every file it lists *before* the
ONNX Runtime session exists (a truncated or altered model is refused with
`ModelIntegrityError`), loads the vocabularies, and creates the session with the options the
exporter recorded in the manifest. `LoadedModel.score(requests)` maps raw string ids to
indices, runs the graph and splits the flat scores back per request.

Which graph: a model directory may hold several layouts of the same weights (manifest
`graphs`, in order of preference; `runtime.repository.graph_entries`). The loader opens the
first one that lists the session's first provider and whose requirements this process meets:
a `cpu-fused` graph needs the custom-op library (`runtime.ortops.library_path()`) to register
and its session to open; otherwise the next entry is taken, so the same directory serves with
the pure-ONNX graph when the library is absent, disabled or broken. When CUDA was asked for
and the session came back without it (a GPU build without CUDA libraries), the choice is made
again for the providers that remain. `LoadedModel.layout` says which graph runs.

Outputs: every model has `scores` (the click probability); a multi-task model adds
`conversion_scores` (pCVR) and `ctcvr_scores` (pCTCVR = pCTR x pCVR, computed in the graph).
`LoadedModel.output_names` lists them, `scores` first, and `run`/`score` return one column per
name ([N, O] float32), so a caller that wants pCTR alone takes column 0 and stays correct for
either kind of model. All outputs come from one `session.run`: the towers share the user side,
and a second run would compute it again.

Imports: numpy, onnxruntime, runtime.features and the torch-free exporters modules only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import onnxruntime as ort

from runtime.features import FeatureSpec
from runtime.feeds import (
    CONVERSION_SCORES,
    CTCVR_SCORES,
    SCORES,
    ScoringRequest,
    encode_behavior,
    slate_sizes,
)
from runtime.ortops import DOMAIN_VERSION, library_path, library_version
from runtime.repository import ModelIntegrityError, graph_entries, read_manifest, verify_files
from runtime.slate_feeds import SlateContract, encode_slates, flatten_slate_scores

__all__ = [
    "CONVERSION_SCORES",
    "CTCVR_SCORES",
    "SCORES",
    "LoadedModel",
    "ModelIntegrityError",
    "ScoringRequest",
    "manifest_output_names",
    "open_model",
    "session_options",
]

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Recorded in every manifest by the exporter; see docs/export.md for why each value.
DEFAULT_SESSION_OPTIONS: dict[str, Any] = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "execution_mode": "ORT_SEQUENTIAL",
    "intra_op_num_threads": 1,
    "inter_op_num_threads": 1,
    "allow_spinning": False,
}
_LEVELS = {
    "ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "ORT_ENABLE_BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "ORT_ENABLE_EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_MODES = {
    "ORT_SEQUENTIAL": ort.ExecutionMode.ORT_SEQUENTIAL,
    "ORT_PARALLEL": ort.ExecutionMode.ORT_PARALLEL,
}


def session_options(
    recorded: dict[str, Any] | None = None, intra_op_threads: int | None = None
) -> ort.SessionOptions:
    """ORT SessionOptions from the manifest's `session_options` (defaults above), with an
    optional thread-count override (the service sets cores ÷ workers)."""
    config = {**DEFAULT_SESSION_OPTIONS, **(recorded or {})}
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[config["graph_optimization_level"]]
    options.execution_mode = _MODES[config["execution_mode"]]
    threads = intra_op_threads if intra_op_threads is not None else config["intra_op_num_threads"]
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = int(config["inter_op_num_threads"])
    if not config["allow_spinning"]:
        # Spinning workers steal the cores that uvicorn and the Redis client need (SERVING §3.1).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def default_providers() -> list[str]:
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def _create_session(
    path: Path, options: ort.SessionOptions, providers: list[str], quiet: bool = False
) -> ort.InferenceSession:
    """An ORT session; `ModelIntegrityError` when ORT cannot load the file. `quiet`: the
    providers were not asked for, so CUDA is only tried (see below)."""
    if quiet:
        # A GPU build on a host without CUDA libraries logs a loud error before falling back
        # to the CPU; that fallback is expected here and reported once through `logging`.
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for corrupt protobufs
        raise ModelIntegrityError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    finally:
        ort.set_default_logger_severity(2)
    if CUDA in providers and CUDA not in session.get_providers():
        log.warning("CUDA execution provider unavailable; %s runs on the CPU", path)
    return session


def manifest_output_names(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The served outputs the manifest declares, in column order.

    `"outputs"` is either a list of names (`["scores", "conversion_scores", "ctcvr_scores"]`)
    or the exporter's graph description (`[{"name": ..., "dtype": ..., "shape": ...}]`); a
    manifest without the key is a single-task model from before multi-task existed.
    """
    entries = manifest.get("outputs")
    if entries is None:
        return (SCORES,)
    if not isinstance(entries, list) or not entries:
        raise ModelIntegrityError(f"manifest 'outputs' must be a non-empty list, not {entries!r}")
    names = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not name:
            raise ModelIntegrityError(f"manifest 'outputs' has an entry without a name: {entry!r}")
        names.append(name)
    return tuple(names)


def _check_outputs(names: tuple[str, ...], session: ort.InferenceSession, where: Path) -> None:
    """Refuses a manifest that promises outputs the graph does not have (or lists one twice),
    or that puts anything but pCTR first: callers read column 0 as the click probability."""
    graph = {o.name for o in session.get_outputs()}
    missing = [name for name in names if name not in graph]
    if missing:
        raise ModelIntegrityError(
            f"{where}: the manifest lists outputs the graph lacks: {', '.join(missing)} "
            f"(graph outputs: {', '.join(sorted(graph))})"
        )
    if len(set(names)) != len(names):
        raise ModelIntegrityError(f"{where}: the manifest lists an output twice: {list(names)}")
    if names[0] != SCORES:
        raise ModelIntegrityError(
            f"{where}: the first output must be {SCORES!r}, not {names[0]!r} ({list(names)})"
        )


def _candidate_count(feeds: dict[str, np.ndarray]) -> int:
    """N for the behaviour layout, B·K slots for the slate layout (0 when nothing to score)."""
    return int(feeds["cand_items"].size if "cand_items" in feeds else feeds["items"].size)


class LoadedModel:
    """One served model version: ORT session + vocabularies + the request encoder."""

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        session: ort.InferenceSession,
        layout: str = "slate-shared",
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.session = session
        self.layout = layout  # the serving layout this session runs (manifest `graphs`)
        self.name: str = manifest["name"]
        self.version: int = int(manifest["version"])
        self.kind: Literal["behavior", "slate"] = manifest["kind"]
        self.history_len: int = int(manifest["history_len"])
        self.providers: list[str] = list(session.get_providers())
        self.outputs: list[str] = [o.name for o in session.get_outputs()]
        # The columns of `run`/`score`, `scores` first (checked against the graph here).
        self.output_names: tuple[str, ...] = manifest_output_names(manifest)
        _check_outputs(self.output_names, session, directory)
        self.input_names: list[str] = [i.name for i in session.get_inputs()]
        self.spec, self.vocabs = FeatureSpec.load(directory, slate=self.kind == "slate")
        self.slate = SlateContract.from_manifest(manifest) if self.kind == "slate" else None

    @property
    def on_device(self) -> bool:
        """Runs on an accelerator (CUDA, TensorRT), not the CPU provider."""
        return self.providers[0] != CPU

    def encode(self, requests: Sequence[ScoringRequest]) -> dict[str, np.ndarray]:
        """Raw requests -> the graph's feeds (vocabulary mapping, OOV, truncation, layout)."""
        if self.slate is not None:
            return encode_slates(requests, self.spec, self.vocabs, self.history_len, self.slate)
        return encode_behavior(requests, self.spec, self.vocabs, self.history_len)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Probabilities [N, O] float32: one row per candidate of every request, in request
        order; column j is `output_names[j]` (column 0 the click probability)."""
        if _candidate_count(feeds) == 0:
            # Never hand ORT an empty batch: some CPU kernels divide by the batch size
            # (ORT 1.31 kills the process with SIGFPE on FAT's graph at N = 0).
            return np.zeros((0, len(self.output_names)), dtype=np.float32)
        # The exporter may have pruned inputs a model ignores (e.g. SARN has no user id).
        graph_feeds = {name: feeds[name] for name in self.input_names}
        outputs = self.session.run(list(self.output_names), graph_feeds)
        columns = []
        for output in outputs:
            values = np.asarray(output, dtype=np.float32)
            if self.slate is not None:
                values = flatten_slate_scores(values, feeds)  # [B, K] -> [N]
            columns.append(values.reshape(-1))  # [N]
        return cast(np.ndarray, np.stack(columns, axis=1))  # [N, O]

    def split(self, requests: Sequence[ScoringRequest], flat: np.ndarray) -> list[np.ndarray]:
        """[N, O] -> one [K_i, O] block per request (rows in candidate order)."""
        bounds = np.cumsum(slate_sizes(requests))[:-1]
        return list(np.split(flat, bounds))

    def score(self, requests: Sequence[ScoringRequest]) -> list[np.ndarray]:
        """encode + run + split: one [K_i, O] array of probabilities per request."""
        if sum(slate_sizes(requests)) == 0:
            width = len(self.output_names)
            return [np.zeros((0, width), dtype=np.float32) for _ in requests]
        return self.split(requests, self.run(self.encode(requests)))


NO_LIBRARY = "the custom-op library is not built here or is disabled (SLATECTR_ORTOPS)"


def register_ops(options: ort.SessionOptions, version: int = DOMAIN_VERSION) -> str | None:
    """Registers the custom-op library on `options`; None, or why it cannot be used (`version`:
    the op-set version the graph was exported for)."""
    library = library_path()
    if library is None:
        return NO_LIBRARY
    found = library_version(library)
    if found != version:
        what = "is no slatectr library" if found is None else f"implements op set {found}"
        return f"{library} {what}; the graph needs op set {version}"
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # a wrong file, a missing symbol, an older ORT: the next graph
        return f"cannot register {library}: {exc}"
    return None


@dataclass
class _Opener:
    """What every candidate graph of one `open_model` call is opened with."""

    directory: Path
    recorded: dict[str, Any]  # the manifest's session options (+ a variant's overrides)
    intra_op_threads: int | None
    quiet: bool  # providers were not asked for (see `_create_session`)

    def open(self, entry: dict[str, Any], providers: list[str]) -> ort.InferenceSession | str:
        """The session of one `graphs` entry, or why this process cannot run it."""
        options = session_options(self.recorded, self.intra_op_threads)
        path = self.directory / entry["file"]
        if not entry["requires"]:
            return _create_session(path, options, providers, self.quiet)
        why = register_ops(options, int(entry["requires"].get("custom_op_version", 1)))
        if why is not None:
            return why
        try:
            return _create_session(path, options, providers, self.quiet)
        except ModelIntegrityError as exc:  # e.g. a library without the graph's op
            return f"its session failed: {str(exc)[:300]}"

    def choose(
        self, entries: list[dict[str, Any]], providers: list[str]
    ) -> tuple[ort.InferenceSession, dict[str, Any]]:
        """The first entry for `providers[0]` that opens (see the module docstring)."""
        if providers[1:] and not any(providers[0] in e["providers"] for e in entries):
            return self.choose(entries, providers[1:])  # e.g. TensorRT first: no graph is for it
        skipped = []
        for entry in entries:
            if providers[0] not in entry["providers"]:
                continue
            opened = self.open(entry, providers)
            if isinstance(opened, str):
                level = logging.INFO if opened == NO_LIBRARY else logging.WARNING
                log.log(
                    level,
                    "%s: skipped %s (%s): %s",
                    self.directory,
                    entry["file"],
                    entry["layout"],
                    opened,
                )
                skipped.append(f"{entry['file']} ({entry['layout']}): {opened}")
                continue
            if providers[0] == CUDA and CUDA not in opened.get_providers() and providers[1:]:
                # A GPU build on a host without CUDA libraries ran the GPU layout on the
                # CPU; the CPU may have a better graph of its own.
                return self.choose(entries, providers[1:])
            log.info("%s: serving %s (%s)", self.directory, entry["file"], entry["layout"])
            return opened, entry
        raise ModelIntegrityError(
            f"{self.directory}: no graph runs on {providers[0]}: "
            f"{'; '.join(skipped) or 'none is listed for it'}"
        )


def open_model(
    model_dir: Path,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    precision: Literal["fp32", "fp16"] = "fp32",
) -> LoadedModel:
    """Verifies and opens `model_dir`, choosing its graph for `providers` (default: CUDA when
    this ORT build has it, then the CPU). `precision="fp16"` opens the fp16 variant (for GPUs:
    it is the `model.onnx` layout converted), with the session options its entry overrides."""
    directory = Path(model_dir)
    manifest = read_manifest(directory)
    recorded = dict(manifest.get("session_options") or {})
    verify_files(directory, manifest)  # before the session: ORT must never parse an altered file
    entries = graph_entries(manifest, directory)
    if precision != "fp32":
        variant = manifest.get("variants", {}).get(precision)
        if variant is None:
            raise ModelIntegrityError(f"{directory} has no {precision} variant")
        recorded.update(variant.get("session_options", {}))
        layout = variant.get("layout", entries[-1]["layout"])  # the layout it converts
        entries = [{"file": variant["file"], "layout": layout, "providers": [CUDA, CPU]}]
        entries[0]["requires"] = {}
    chosen = list(providers) if providers is not None else default_providers()
    opener = _Opener(directory, recorded, intra_op_threads, providers is None and CUDA in chosen)
    session, entry = opener.choose(entries, chosen)
    return LoadedModel(directory, manifest, session, entry["layout"])
