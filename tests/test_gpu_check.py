"""`ctr bench gpu`: the dry run walks every step on the CPU, and the verdicts are computed right.

* The dry run (`--dry-run`, SARN and NCM: a behaviour and a slate model) through the real
  command: a world is simulated, both models are trained and exported with their fp16
  variants, ORT and PyTorch are compared, the raw ORT grid is timed with and without
  IOBinding, a real `ctr serve` starts with `CTR_REQUIRE_GPU=true` (and must refuse: CPU only)
  and takes a short locust load. The report must hold those figures, every one on the CPU
  provider, and every GPU verdict absent.
* A GPU run on a machine without one stops at the environment step with a message, exit 2.
* The verdicts on hand-made reports: a target passes or fails on CUDA figures only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loadtest.gpu import targets
from slatectr.cli import app

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("gpu-dry-run")
    command = ["bench", "gpu", "--dry-run", "--out", str(out), "--models", "sarn,ncm"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


@pytest.mark.slow
def test_every_step_ran_on_the_cpu_and_every_gpu_verdict_is_absent(
    dry_run: tuple[dict[str, Any], str],
) -> None:
    report, markdown = dry_run
    assert report["dry_run"] and report["device_provider"] == CPU
    assert {name: step["status"] for name, step in report["steps"].items()} == {
        name: "ok" for name in ("environment", "models", "parity", "throughput", "service")
    }
    assert {t["status"] for t in report["targets"]} == {"absent"}
    judged = {c["name"]: c["status"] for c in report["checks"] if c["status"] != "absent"}
    assert judged == {"CTR_REQUIRE_GPU gate": "pass", "IOBinding outputs": "pass"}
    assert report["environment"]["onnxruntime"]["cuda_session_providers"][0] == CPU
    assert markdown.startswith("# `ctr bench gpu`: DRY RUN")
    assert "| raw ORT throughput |" in markdown and "| absent | absent |" in markdown


@pytest.mark.slow
def test_the_models_trained_and_match_onnx_runtime_and_their_fp16_variants(
    dry_run: tuple[dict[str, Any], str],
) -> None:
    report, _ = dry_run
    training = {row["model"]: row for row in report["models"]["training"]}
    assert sorted(training) == ["ncm", "sarn"]
    for row in training.values():
        assert row["device"] == "cpu" and row["steps"] > 10 and row["loss_fell"]
        assert row["train_loss"][-1] < row["train_loss"][0]
    for row in report["parity"]:
        assert row["device_provider"] == CPU and row["candidates"] > 500
        assert row["ort_device_vs_ort_cpu"] == 0.0  # the same provider twice
        assert 0.0 <= row["ort_device_vs_torch"] <= row["tolerance"] == 1e-4
        fp16 = row["fp16"]
        assert fp16["provider"] == CPU and fp16["within_tolerance"]
        assert fp16["valid_auc_abs_diff"] <= fp16["manifest_auc_tolerance"]
        assert 0.0 < fp16["max_abs_diff_vs_fp32"] <= fp16["manifest_tolerance"]


@pytest.mark.slow
def test_raw_ort_cells_cover_the_grid_on_the_cpu(dry_run: tuple[dict[str, Any], str]) -> None:
    report, _ = dry_run
    cells = report["throughput"]
    grid = {(c["model"], c["precision"], c["slate"], c["users"], c["binding"]) for c in cells}
    assert len(grid) == len(cells) == 2 * 2 * 2 * 2 * 2  # models, precisions, K, U, binding
    for cell in cells:
        assert cell["provider"] == CPU and cell["error"] is None, cell
        assert cell["calls"] >= 3 and cell["candidates_per_s"] > 0
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]
        assert cell["candidates"] == cell["users"] * cell["slate"]
        if cell["binding"]:
            assert cell["binding_max_abs_diff"] <= 1e-6


@pytest.mark.slow
def test_the_service_refused_readiness_on_the_cpu_and_served_the_load(
    dry_run: tuple[dict[str, Any], str],
) -> None:
    service = dry_run[0]["service"]
    assert service["readyz"]["status"] == 503 and service["refused_not_on_gpu"]
    assert service["readyz"]["body"]["reasons"] == ["model sarn is not on the GPU"]
    assert service["provider"] == CPU
    load = service["load"]
    assert load["candidates_per_s"] > 0 and load["errors"] == 0
    assert load["half_load_rps"] > 0 and load["half_load_p99_ms"] >= load["half_load_p50_ms"] > 0


@pytest.mark.slow
def test_a_gpu_run_without_a_gpu_stops_at_the_environment(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(app, ["bench", "gpu", "--out", str(tmp_path)])
    assert result.exit_code == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"]["environment"]["status"] == "error"
    assert "torch sees no CUDA device" in report["steps"]["environment"]["error"]
    assert report["steps"]["models"]["status"] == "skipped"


def _cell(model: str, precision: str, users: int, cps: float, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "precision": precision,
        "provider": CUDA,
        "slate": 100,
        "users": users,
        "history": 50,
        "candidates": 100 * users,
        "binding": False,
        "candidates_per_s": cps,
        **extra,
    }


def _gpu_report(sarn: float, fp16_speedup: float, service: float, p99: float) -> dict[str, Any]:
    """SARN fp32 cells of `sarn` cand/s at 32 users (3× that at 128 with IOBinding), fp16
    cells `fp16_speedup` times those, a CPU cell far faster, the service's figures."""
    cells = []
    for precision, factor in (("fp32", 1.0), ("fp16", fp16_speedup)):
        cells += [
            _cell("sarn", precision, 8, factor * sarn / 2),
            _cell("sarn", precision, 32, factor * sarn),
            _cell("sarn", precision, 128, factor * sarn * 3, binding=True),  # beyond the budget
        ]
    cells.append(_cell("sarn", "fp32", 32, 10 * sarn, provider=CPU))  # never counts for a target
    fp16 = {"provider": CUDA, "within_tolerance": True, "valid_auc_abs_diff": 1e-5}
    return {
        "dry_run": False,
        "throughput": cells,
        "parity": [{"model": "sarn", "fp16": {**fp16, "manifest_auc_tolerance": 1e-3}}],
        "service": {
            "provider": CUDA,
            "slate": 100,
            "load": {"candidates_per_s": service, "half_load_p99_ms": p99},
        },
    }


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    return {v.name: v.status for v in targets.targets(report)}


def test_targets_pass_on_cuda_figures_that_meet_them() -> None:
    report = _gpu_report(sarn=120_000, fp16_speedup=1.6, service=100_000, p99=8.0)
    assert set(_statuses(report).values()) == {"pass"}
    raw = targets.raw_target(report)
    assert raw.measured is not None and "360,000 cand/s (128 users/call, IOBinding)" in raw.measured
    reference = targets.service_reference(report, 100)
    assert reference is not None and reference["users"] == 32  # 3,200 candidates fit 4,096


def test_targets_fail_where_a_figure_misses() -> None:
    report = _gpu_report(sarn=30_000, fp16_speedup=1.2, service=20_000, p99=12.0)
    assert _statuses(report) == {
        "raw ORT throughput": "fail",  # best: 90,000 with IOBinding at 128 users
        "service vs raw ORT": "fail",  # 20,000 / 30,000 = 0.67
        "service p99 at half saturation": "fail",
        "fp16 speed-up": "fail",  # 1.2×
    }
    report["parity"][0]["fp16"]["within_tolerance"] = False  # fast enough, but off in AUC
    for cell in report["throughput"]:
        if cell["precision"] == "fp16":
            cell["candidates_per_s"] *= 2
    assert _statuses(report)["fp16 speed-up"] == "fail"


def test_cpu_figures_leave_every_target_absent() -> None:
    report = _gpu_report(sarn=1e9, fp16_speedup=2.0, service=1e9, p99=1.0)
    for cell in report["throughput"]:
        cell["provider"] = CPU
    report["service"]["provider"] = CPU
    report["parity"][0]["fp16"]["provider"] = CPU
    assert set(_statuses(report).values()) == {"absent"}
