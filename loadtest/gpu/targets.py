"""The verdicts of `ctr bench gpu`: checks (each piece of the GPU path works) and targets (it
is fast enough).

Every verdict is `pass`, `fail` or `absent`. Absent means the figure it needs was not
measured on the CUDA provider (the dry run, a CUDA provider that did not load, a failed step,
a grid without the cell): a CPU figure never passes or fails a GPU verdict. The harness's own
checks (the readiness gate refusing a CPU-only service, IOBinding computing what the plain
run computes) are judged wherever they ran.

Targets (H100, fp32 unless said; the issue's numbers):
* SARN at K = 100, L = 50: ≥ 100,000 candidates/s raw ORT with 32 or more users per call
  (the best such cell, plain run or IOBinding);
* the service ≥ 0.8× raw ORT — the best plain `session.run` cell of SARN at the service's K
  whose candidates fit the service's batch budget, i.e. a call the service could make — and
  p99 ≤ 10 ms at half its saturation;
* the fp16 variant ≥ 1.5× fp32 throughput (SARN's best cells with 32+ users, K = 100) and
  within its manifest's AUC tolerance, measured on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from loadtest.gpu.config import CUDA

SARN_CPS = 100_000.0
SERVICE_RATIO = 0.8
SERVICE_P99_MS = 10.0
FP16_SPEEDUP = 1.5
TARGET_SLATE, TARGET_HISTORY, TARGET_USERS = 100, 50, 32
BATCH_BUDGET = 4096  # CTR_BATCH_MAX_CANDIDATES' default: the largest call the service makes
BINDING_TOLERANCE = 1e-4
OFF_GPU = "not measured on CUDA (dry run, or the CUDA provider did not load)"
FP16_GOAL = f"≥ {FP16_SPEEDUP}× fp32 (SARN, K=100, ≥ 32 users/call), within the AUC tolerance"

Report = dict[str, Any]


@dataclass
class Verdict:
    name: str
    goal: str
    measured: str | None  # None: absent
    status: str  # pass | fail | absent
    detail: str = ""


def verdict(name: str, goal: str, measured: str | None, ok: bool, absent: str = OFF_GPU) -> Verdict:
    """`measured` None -> absent (with the reason); else pass or fail."""
    if measured is None:
        return Verdict(name, goal, None, "absent", absent)
    return Verdict(name, goal, measured, "pass" if ok else "fail")


def _cells(report: Report, **where: Any) -> list[dict[str, Any]]:
    """Throughput cells measured on CUDA without error that match every `where` field."""
    return [
        cell
        for cell in report.get("throughput") or []
        if cell.get("provider") == CUDA
        and cell.get("candidates_per_s") is not None
        and all(cell.get(key) == value for key, value in where.items())
    ]


def _best(cells: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    return max(cells, key=lambda cell: float(cell["candidates_per_s"]), default=None)


def _shown(cell: dict[str, Any]) -> str:
    binding = "IOBinding" if cell["binding"] else "plain run"
    return f"{cell['candidates_per_s']:,.0f} cand/s ({cell['users']} users/call, {binding})"


def sarn_best(report: Report, precision: str) -> dict[str, Any] | None:
    """SARN's fastest cell at K = 100, L = 50 with 32 or more users per call."""
    cells = _cells(report, model="sarn", precision=precision, slate=TARGET_SLATE)
    return _best(c for c in cells if c["users"] >= TARGET_USERS and c["history"] == TARGET_HISTORY)


def raw_target(report: Report) -> Verdict:
    best = sarn_best(report, "fp32")
    return verdict(
        "raw ORT throughput",
        f"≥ {SARN_CPS:,.0f} cand/s: SARN fp32, K=100, L=50, ≥ 32 users/call",
        None if best is None else _shown(best),
        best is not None and best["candidates_per_s"] >= SARN_CPS,
    )


def service_reference(report: Report, slate: int) -> dict[str, Any] | None:
    """The raw ORT cell the service is held to (see the module docstring)."""
    cells = _cells(report, model="sarn", precision="fp32", slate=slate, binding=False)
    return _best(c for c in cells if c["candidates"] <= BATCH_BUDGET)


def service_targets(report: Report) -> list[Verdict]:
    service = report.get("service") or {}
    load = service.get("load") if service.get("provider") == CUDA else None
    reference = service_reference(report, int(service.get("slate", TARGET_SLATE)))
    ratio, p99 = None, None
    if load is not None and reference is not None:
        ratio = float(load["candidates_per_s"]) / float(reference["candidates_per_s"])
    if load is not None:
        p99 = float(load["half_load_p99_ms"])
    return [
        verdict(
            "service vs raw ORT",
            f"≥ {SERVICE_RATIO}× raw ORT (SARN fp32, same K)",
            None
            if ratio is None or load is None or reference is None
            else f"{ratio:.2f}×: {load['candidates_per_s']:,.0f} vs {_shown(reference)}",
            ratio is not None and ratio >= SERVICE_RATIO,
        ),
        verdict(
            "service p99 at half saturation",
            f"≤ {SERVICE_P99_MS:g} ms",
            None if p99 is None else f"{p99:g} ms",
            p99 is not None and p99 <= SERVICE_P99_MS,
        ),
    ]


def fp16_target(report: Report) -> Verdict:
    fp32, fp16 = sarn_best(report, "fp32"), sarn_best(report, "fp16")
    sarn: dict[str, Any] = next((r for r in report.get("parity") or [] if r["model"] == "sarn"), {})
    auc = sarn.get("fp16", {})
    if fp32 is None or fp16 is None or auc.get("provider") != CUDA:
        return verdict("fp16 speed-up", FP16_GOAL, None, False)
    ratio = fp16["candidates_per_s"] / fp32["candidates_per_s"]
    shown = (
        f"{ratio:.2f}×, AUC Δ {_g(auc['valid_auc_abs_diff'])} (≤ {auc['manifest_auc_tolerance']:g})"
    )
    return verdict(
        "fp16 speed-up", FP16_GOAL, shown, ratio >= FP16_SPEEDUP and auc["within_tolerance"]
    )


def targets(report: Report) -> list[Verdict]:
    return [raw_target(report), *service_targets(report), fp16_target(report)]


def _on(condition: bool, text: str) -> str | None:
    return text if condition else None


def _g(value: float | None) -> str:
    return "absent" if value is None else f"{value:.2g}"


def parity_checks(report: Report) -> list[Verdict]:
    """Per model: fp32 parity on CUDA against both references; the fp16 variant on CUDA."""
    out = []
    for row in report.get("parity") or []:
        cpu, torch = row["ort_device_vs_ort_cpu"], row["ort_device_vs_torch"]
        out.append(
            verdict(
                f"parity {row['model']}",
                f"fp32 ≤ {row['tolerance']:g} vs ORT CPU / vs PyTorch on CUDA",
                _on(
                    row["device_provider"] == CUDA,
                    f"{_g(cpu)} / {_g(torch)} (without TF32: {_g(row.get('no_tf32_vs_ort_cpu'))})",
                ),
                torch is not None and max(cpu, torch) <= row["tolerance"],
            )
        )
        fp16 = row["fp16"]
        max_diff, auc_diff = fp16.get("max_abs_diff_vs_fp32"), fp16.get("valid_auc_abs_diff")
        shown = f"max Δ {_g(max_diff)}, AUC Δ {_g(auc_diff)}"
        out.append(
            verdict(
                f"fp16 {row['model']}",
                "within its manifest's tolerances (max Δ, validation AUC Δ)",
                _on(fp16.get("provider") == CUDA, shown),
                bool(fp16.get("within_tolerance")),
            )
        )
    return out


def training_checks(report: Report) -> list[Verdict]:
    return [
        verdict(
            f"training {row['model']}",
            "--device cuda: the mean training loss falls from the first epoch to the last",
            _on(
                row["device"] == "cuda",
                f"{row['train_loss'][0]:.4f} → {row['train_loss'][-1]:.4f}, ~{row['steps']} steps",
            ),
            bool(row["loss_fell"]),
        )
        for row in (report.get("models") or {}).get("training", [])
    ]


def service_checks(report: Report) -> list[Verdict]:
    """On a GPU: ready with the GPU required. In the dry run: the same gate refuses the CPU."""
    service = report.get("service") or {}
    if "readyz" not in service:
        return []
    ready = service["readyz"]
    seen = f"/readyz {ready['status']} {ready['body'].get('reasons') or ''}, {service['provider']}"
    if report.get("dry_run"):
        return [
            verdict(
                "CTR_REQUIRE_GPU gate",
                "a service on the CPU provider is refused: /readyz 503, not on the GPU",
                seen,
                bool(service["refused_not_on_gpu"]),
            )
        ]
    return [
        verdict(
            "service on the GPU",
            "/readyz 200 with CTR_REQUIRE_GPU=true, the model on CUDA",
            seen,
            ready["status"] == 200 and service["provider"] == CUDA,
        )
    ]


def checks(report: Report) -> list[Verdict]:
    ort = (report.get("environment") or {}).get("onnxruntime") or {}
    gpu = not report.get("dry_run", True)
    out = [
        verdict(
            "ORT CUDA provider",
            "a session asked for CUDA gets CUDAExecutionProvider",
            _on(gpu and bool(ort), str(ort.get("cuda_session_providers"))),
            bool(ort.get("cuda_usable")),
        ),
        *parity_checks(report),
        *training_checks(report),
        *service_checks(report),
    ]
    diffs = [
        cell["binding_max_abs_diff"]
        for cell in report.get("throughput") or []
        if cell.get("binding_max_abs_diff") is not None
    ]
    if diffs:
        out.append(
            verdict(
                "IOBinding outputs",
                f"equal the plain run's (max Δ ≤ {BINDING_TOLERANCE:g})",
                f"{max(diffs):.2g}",
                max(diffs) <= BINDING_TOLERANCE,
            )
        )
    return out


def as_json(verdicts: Iterable[Verdict]) -> list[dict[str, Any]]:
    return [asdict(v) for v in verdicts]
