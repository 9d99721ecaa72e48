"""Step 2's checks of `ctr bench gpu`: the served graph on the device against two references.

For every parity case of the export gate (`exporters.cases`: the edge cases and real batches
of the world's validation data), encoded once by the service's own encoder:
* ONNX Runtime on the device provider vs ONNX Runtime on the CPU provider, same file;
* ONNX Runtime on the device vs PyTorch on the device (the eager serving module, built from
  the run the manifest names as `source_run`).
fp32 tolerance: 1e-4 — the CPU export gate holds 1e-5, and GPU kernels (cuBLAS, cuDNN,
TF32-free fp32 but other summation orders) may differ from the CPU by a few ulps more.

The fp16 variant is validated again on the device with the export's own check
(`exporters.fp16.validate`: max |p16 − p32| and the validation AUC of both), and held to the
tolerances its manifest states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd

from exporters import cases as case_lib
from exporters import fp16
from loadtest.gpu.build import data_file
from loadtest.gpu.config import CPU, CUDA, CheckConfig, failure
from runtime.feeds import BEHAVIOR_INPUTS, ScoringRequest
from runtime.loader import LoadedModel, open_model, session_options
from runtime.slate_feeds import SLATE_INPUTS, flatten_slate_scores

PARITY_ROWS = 512  # data rows that become real parity batches (as in the export gate)
Labelled = tuple[list[ScoringRequest], np.ndarray]


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a − b| in float64; NaN anywhere counts as infinitely far (never a pass)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    gap = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nan_to_num(gap, nan=np.inf).max(initial=0.0))


def _labelled(model: LoadedModel, frame: pd.DataFrame) -> Labelled:
    if model.slate is not None:
        return case_lib.slate_requests(frame)
    return case_lib.behavior_requests(frame, model.spec.context_fields)


def _frame(model: LoadedModel, path: Path, rows: int) -> pd.DataFrame:
    from models.data.schema import load_behavior, load_slates

    frame = load_slates(path) if model.slate is not None else load_behavior(path)
    return frame.head(rows)


def parity_cases(model: LoadedModel, frame: pd.DataFrame) -> case_lib.Cases:
    """The export gate's cases for this model: edge cases plus real batches of `frame`."""
    widest = model.slate.slate_size if model.slate is not None else 100
    cases = case_lib.edge_cases(model.spec, model.vocabs, model.history_len, widest)
    cases.update(case_lib.real_cases(_labelled(model, frame)[0]))
    return cases


def _columns(values: np.ndarray, feeds: dict[str, np.ndarray], slate: object) -> np.ndarray:
    """An eager module's outputs in `LoadedModel.run`'s layout, [N, O] (`slate`: the model's
    slate contract, None for a behaviour model)."""
    flat = flatten_slate_scores(values, feeds) if slate is not None else values
    return flat.reshape(len(flat), -1)


def _eager(model: LoadedModel, device: str) -> tuple[Any, tuple[str, ...]] | str:
    """(the eager serving module on `device`, its inputs), or why there is none."""
    from exporters.onnx_export import SlateScoringGraph, serving_copy
    from exporters.slate_export import SlateClickGraph
    from models.nets.base import BehaviorModel
    from models.training.checkpoint import CheckpointError, load_run

    source = model.manifest.get("source_run")
    try:
        run = load_run(Path(source)) if source else None
    except (CheckpointError, OSError) as exc:
        return f"the run {source} cannot be read: {exc}"
    if run is None:
        return "the manifest names no source run"
    if model.slate is not None:
        return SlateClickGraph(serving_copy(run.model)).to(device), SLATE_INPUTS
    behavior = serving_copy(run.model)
    assert isinstance(behavior, BehaviorModel)
    return SlateScoringGraph(behavior).to(device), BEHAVIOR_INPUTS


def without_tf32(model: LoadedModel) -> LoadedModel | str:
    """The same file on CUDA with TF32 math off (`use_tf32=0`), or why it could not open.

    ONNX Runtime's CUDA provider may run fp32 matrix products in TF32 (10-bit mantissa) on
    Ampere and later GPUs, while PyTorch keeps fp32 matmuls in full precision by default. If
    the default misses the tolerance, this figure says on the same lease whether TF32 is why.
    """
    options = session_options(model.manifest.get("session_options"))
    path = model.directory / model.manifest["onnx"]["file"]
    try:
        session = ort.InferenceSession(
            str(path), options, providers=[(CUDA, {"use_tf32": "0"}), CPU]
        )
    except Exception as exc:  # an option this build does not know: recorded
        return failure(exc)
    return LoadedModel(model.directory, model.manifest, session)


def compare(
    device: LoadedModel, cpu: LoadedModel, cases: case_lib.Cases, torch_device: str
) -> dict[str, Any]:
    """Max |difference| over every case: ORT on the device vs ORT on the CPU and vs PyTorch on
    the device; on CUDA also ORT without TF32 vs ORT on the CPU."""
    from exporters.parity import run_eager

    eager = _eager(cpu, torch_device)
    no_tf32 = without_tf32(device) if device.providers[0] == CUDA else None
    diffs = {"ort_device_vs_ort_cpu": 0.0, "ort_device_vs_torch": 0.0, "no_tf32_vs_ort_cpu": 0.0}
    candidates = 0
    for requests in cases.values():
        feeds = cpu.encode(requests)
        scores, reference = device.run(feeds), cpu.run(feeds)  # [N, O] each
        candidates += len(scores)
        found = {"ort_device_vs_ort_cpu": max_abs_diff(scores, reference)}
        if not isinstance(eager, str):
            module, inputs = eager
            outputs = run_eager(module, inputs, feeds, torch_device)
            found["ort_device_vs_torch"] = max_abs_diff(scores, _columns(outputs, feeds, cpu.slate))
        if isinstance(no_tf32, LoadedModel):
            found["no_tf32_vs_ort_cpu"] = max_abs_diff(no_tf32.run(feeds), reference)
        diffs.update({key: max(diffs[key], value) for key, value in found.items()})
    return {
        "cases": len(cases),
        "candidates": candidates,
        "ort_device_vs_ort_cpu": diffs["ort_device_vs_ort_cpu"],
        "ort_device_vs_torch": None if isinstance(eager, str) else diffs["ort_device_vs_torch"],
        "torch_device": torch_device,
        "torch_missing": eager if isinstance(eager, str) else None,
        "no_tf32_vs_ort_cpu": diffs["no_tf32_vs_ort_cpu"]
        if isinstance(no_tf32, LoadedModel)
        else None,
        "no_tf32_missing": no_tf32 if isinstance(no_tf32, str) else None,
    }


def fp16_on_device(model: LoadedModel, cases: case_lib.Cases, labelled: Labelled) -> dict[str, Any]:
    """The export's fp16 check again, where it now runs (CUDA when usable), against the
    tolerances the manifest states for the variant."""
    variant = model.manifest.get("variants", {}).get("fp16")
    if variant is None:
        return {"missing": f"{model.directory} has no fp16 variant (export with --fp16)"}
    options = session_options({**model.manifest["session_options"], **variant["session_options"]})
    flatten = flatten_slate_scores if model.slate is not None else None
    report = fp16.validate(
        model.directory / model.manifest["onnx"]["file"],
        model.directory / variant["file"],
        options,
        cases,
        model.encode,
        flatten,
        labelled,
    )
    auc_ok = report.auc_diff is not None and report.auc_diff <= variant["auc_tolerance"]
    return {
        **report.to_json(),
        "manifest_tolerance": variant["tolerance"],
        "manifest_auc_tolerance": variant["auc_tolerance"],
        "manifest_provider": variant.get("provider"),
        "within_tolerance": auc_ok and report.max_abs_diff <= variant["tolerance"],
    }


def check_model(
    config: CheckConfig, directory: Path, world: Path, torch_device: str
) -> dict[str, Any]:
    """Step 2's figures for one model directory."""
    cpu = open_model(directory, providers=[CPU])
    device = open_model(directory, providers=config.providers)
    path = data_file(world, cpu.manifest["model_type"], "test")
    cases = parity_cases(cpu, _frame(cpu, path, PARITY_ROWS))
    result = {
        "model": cpu.name,
        "version": cpu.version,
        "device_provider": device.providers[0],
        "tolerance": config.parity_tolerance,
        **compare(device, cpu, cases, torch_device),
    }
    result["fp16"] = fp16_on_device(cpu, cases, _labelled(cpu, _frame(cpu, path, config.auc_rows)))
    return result
