"""`ctr bench gpu`'s report: report.json (everything) and report.md (the tables people read).

Both are rewritten after every step, so a run cut short (a lease that ends, a step that hangs)
still leaves the steps it finished. JSON has no infinity or NaN: such a figure (a NaN score
counts as infinitely far in a parity check) is written as null; its verdict already failed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ABSENT = "absent"


def strict_json(report: dict[str, Any]) -> str:
    """JSON without the NaN and Infinity tokens that strict parsers reject: such a figure is
    written as null (Python's json writes the tokens; reading them back maps them to None)."""
    loose = json.dumps(report, allow_nan=True)
    strict = json.loads(loose, parse_constant=lambda _token: None)
    return json.dumps(strict, indent=2, allow_nan=False) + "\n"


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return ABSENT
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _environment(env: dict[str, Any]) -> list[str]:
    gpu = env.get("gpu") or {}
    torch = env.get("torch") or {}
    ort = env.get("onnxruntime") or {}
    build = ort.get("build") or {}
    libraries = [Path(path).name for path in ort.get("loaded_libraries") or []]
    rows = [
        (
            "GPU",
            f"{gpu['name']} ({gpu.get('memory.total')}, compute {gpu.get('compute_cap')})"
            if gpu.get("name")
            else f"absent ({gpu.get('error') or 'no nvidia-smi'})",
        ),
        (
            "driver / the CUDA it runs",
            f"{_cell(gpu.get('driver_version'))} / {_cell(gpu.get('driver_cuda'))}",
        ),
        (
            "torch / its CUDA / cuDNN",
            f"{_cell(torch.get('version'))} / {_cell(torch.get('cuda'))} / "
            f"{_cell(torch.get('cudnn'))}",
        ),
        (
            "onnxruntime",
            f"{_cell(ort.get('version'))} ({_cell(build.get('package_name'))}, "
            f"built for CUDA {_cell(build.get('cuda_version'))})",
        ),
        ("a CUDA session got", _cell(ort.get("cuda_session_providers"))),
        ("CUDA and ORT libraries loaded", ", ".join(libraries) or "none"),
        ("Python / platform", f"{_cell(env.get('python'))} / {_cell(env.get('platform'))}"),
    ]
    return ["## Environment", "", *table(("what", "seen"), rows)]


def _verdicts(title: str, verdicts: Sequence[dict[str, Any]]) -> list[str]:
    rows = [
        (
            v["name"],
            v["goal"],
            _cell(v["measured"]),
            f"**{v['status']}**" if v["status"] == "fail" else v["status"],
        )
        for v in verdicts
    ]
    return [f"## {title}", "", *table(("", "goal", "measured", "verdict"), rows)]


def _steps(steps: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        (name, s["status"], f"{s['seconds']:.1f}", _cell(s.get("error", "")))
        for name, s in steps.items()
    ]
    return ["## Steps", "", *table(("step", "status", "seconds", "error"), rows)]


def _training(models: dict[str, Any]) -> list[str]:
    rows = [
        (
            r["model"],
            r["device"],
            str(r["epochs"]),
            str(r["steps"]),
            " → ".join(f"{loss:.4f}" for loss in r["train_loss"]),
            "yes" if r["loss_fell"] else "**no**",
            _cell(r["valid_auc"][-1], ".4f"),
            f"{r['seconds']:.1f}",
        )
        for r in models.get("training", [])
    ]
    errors = [f"- {name}: {why}" for name, why in (models.get("errors") or {}).items()]
    headers = (
        "model",
        "device",
        "epochs",
        "~steps",
        "train loss per epoch",
        "fell",
        "valid AUC",
        "s",
    )
    return ["## Training (step 5)", "", *table(headers, rows), *errors, *([""] if errors else [])]


def _parity(rows: Sequence[dict[str, Any]]) -> list[str]:
    body = [
        (
            r["model"],
            r["device_provider"],
            f"{r['cases']} / {r['candidates']}",
            _cell(r["ort_device_vs_ort_cpu"], ".2g"),
            _cell(r["ort_device_vs_torch"], ".2g") + f" ({r['torch_device']})",
            _cell(r.get("no_tf32_vs_ort_cpu"), ".2g"),
            _cell(r["fp16"].get("max_abs_diff_vs_fp32"), ".2g"),
            f"{_cell(r['fp16'].get('valid_auc_abs_diff'), '.2g')} "
            f"(≤ {_cell(r['fp16'].get('manifest_auc_tolerance'))})",
            _cell(r["fp16"].get("provider")),
        )
        for r in rows
    ]
    headers = (
        "model",
        "device",
        "cases / candidates",
        "ORT device vs CPU",
        "vs PyTorch",
        "no TF32 vs CPU",
        "fp16 max Δ",
        "fp16 AUC Δ",
        "fp16 on",
    )
    return ["## Parity (step 2)", "", *table(headers, body)]


def _throughput(cells: Sequence[dict[str, Any]]) -> list[str]:
    body = [
        (
            c["model"],
            c["precision"],
            _cell(c.get("provider")),
            str(c.get("slate", "")),
            str(c.get("users", "")),
            "yes" if c.get("binding") else "no",
            _cell(c.get("candidates_per_s"), ",.0f"),
            _cell(c.get("p50_ms"), ".3g"),
            _cell(c.get("p99_ms"), ".3g"),
            str(c.get("calls", "")),
            _cell(c.get("error") or ""),
        )
        for c in cells
    ]
    headers = (
        "model",
        "precision",
        "provider",
        "K",
        "users/call",
        "IOBinding",
        "cand/s",
        "p50 ms",
        "p99 ms",
        "calls",
        "error",
    )
    return ["## Raw ONNX Runtime (step 3)", "", *table(headers, body)]


def _service(service: dict[str, Any]) -> list[str]:
    load = service.get("load") or {}
    ready = service.get("readyz") or {}
    pair = "{} / {}".format
    rows = [
        (
            "/readyz with CTR_REQUIRE_GPU=true",
            f"{_cell(ready.get('status'))} {_cell(ready.get('body'))}",
        ),
        ("the model's provider", _cell(service.get("provider"))),
        ("goodput at saturation (cand/s)", _cell(load.get("candidates_per_s"), ",.0f")),
        (
            "p50 / p99 at saturation (ms)",
            pair(_cell(load.get("saturation_p50_ms")), _cell(load.get("saturation_p99_ms"))),
        ),
        (
            "p50 / p99 at half saturation (ms)",
            pair(_cell(load.get("half_load_p50_ms")), _cell(load.get("half_load_p99_ms"))),
        ),
        (
            "errors, saturation / half",
            pair(_cell(load.get("errors")), _cell(load.get("half_load_errors"))),
        ),
        ("mean batch (candidates)", _cell(load.get("mean_batch_candidates"), ".0f")),
    ]
    return [
        f"## Service under load (step 4, K={service.get('slate')})",
        "",
        *table(("what", "measured"), rows),
    ]


def markdown(report: dict[str, Any]) -> str:
    mode = "DRY RUN on the CPU: no GPU figures" if report["dry_run"] else "GPU run"
    lines = [
        f"# `ctr bench gpu`: {mode}",
        "",
        f"Verdict: **{report.get('verdict', 'unfinished')}**. Started {report['started']}, "
        f"{report.get('seconds', 0):.0f} s.",
        "",
        *_verdicts("Targets", report.get("targets", [])),
        *_verdicts("Checks", report.get("checks", [])),
        *_steps(report.get("steps", {})),
    ]
    if report.get("environment"):
        lines += _environment(report["environment"])
    if report.get("models"):
        lines += _training(report["models"])
    if report.get("parity"):
        lines += _parity(report["parity"])
    if report.get("throughput"):
        lines += _throughput(report["throughput"])
    if report.get("service"):
        lines += _service(report["service"])
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(strict_json(report))
    (out / REPORT_MD).write_text(markdown(report) + "\n")
