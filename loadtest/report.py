"""The report of one load test: summary.json, summary.md and two PNG plots.

Inputs are locust's own CSV (`<prefix>_stats.csv`: whole-run totals per request name) and the
per-step file the load shape writes (`steps.json`, see loadtest/steps.py). The SLO verdict
uses the whole run: the p99 of admitted scoring requests as locust reports it, and the error
rate (failures / all requests; shed answers are not failures).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.steps import SHED_SUFFIX

SCORE = "/v1/score"
TOTAL = "Aggregated"


@dataclass
class Slo:
    p99_ms: float | None = None
    error_rate: float | None = None

    def check(self, p99_ms: float, error_rate: float) -> list[str]:
        """Violations, in words; empty when the SLO holds (or none is stated)."""
        missed = []
        if self.p99_ms is not None and not p99_ms <= self.p99_ms:
            missed.append(f"p99 {p99_ms:g} ms > {self.p99_ms:g} ms")
        if self.error_rate is not None and not error_rate <= self.error_rate:
            missed.append(f"error rate {error_rate:.4f} > {self.error_rate:g}")
        return missed


def read_stats(path: Path) -> dict[str, dict[str, float]]:
    """locust `*_stats.csv` -> {name: {requests, failures, rps, p50_ms, p95_ms, p99_ms, ...}}."""
    rows: dict[str, dict[str, float]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows[row["Name"]] = {
                "requests": float(row["Request Count"]),
                "failures": float(row["Failure Count"]),
                "rps": float(row["Requests/s"]),
                "mean_ms": float(row["Average Response Time"]),
                "p50_ms": _number(row["50%"]),
                "p95_ms": _number(row["95%"]),
                "p99_ms": _number(row["99%"]),
                "max_ms": float(row["Max Response Time"]),
            }
    return rows


def _number(text: str) -> float:
    return float(text) if text not in ("", "N/A") else 0.0


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "loadavg_1m": round(load[0], 2),
    }


def summarize(
    stats: dict[str, dict[str, float]], steps: dict[str, Any], slo: Slo, extra: dict[str, Any]
) -> dict[str, Any]:
    total = stats.get(TOTAL, {"requests": 0.0, "failures": 0.0, "rps": 0.0})
    score = stats.get(
        SCORE,
        {"requests": 0.0, "failures": 0.0, "rps": 0.0, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0},
    )
    requests = total["requests"]
    shed = sum(row["requests"] for name, row in stats.items() if name.endswith(SHED_SUFFIX))
    error_rate = total["failures"] / requests if requests else 0.0
    step_rows: list[dict[str, Any]] = steps.get("steps", [])
    within = [s for s in step_rows if not slo.check(s["p99_ms"], s["error_rate"])]
    violations = slo.check(score["p99_ms"], error_rate)
    return {
        **extra,
        "totals": {
            "requests": int(requests),
            "failures": int(total["failures"]),
            "shed": int(shed),
            "error_rate": error_rate,
            "shed_rate": shed / requests if requests else 0.0,
            "rps": total["rps"],
            "score_requests": int(score["requests"]),
            "score_rps": score["rps"],
            "p50_ms": score["p50_ms"],
            "p95_ms": score["p95_ms"],
            "p99_ms": score["p99_ms"],
        },
        "peak": {
            "score_rps": max((s["score_rps"] for s in step_rows), default=0.0),
            "candidates_per_s": max((s["candidates_per_s"] for s in step_rows), default=0.0),
            "best_step_within_slo": within[-1]["step"]
            if within and (slo.p99_ms is not None or slo.error_rate is not None)
            else None,
        },
        "steps": step_rows,
        "by_name": stats,
        "slo": {
            "p99_ms": slo.p99_ms,
            "error_rate": slo.error_rate,
            "passed": not violations,
            "violations": violations,
        },
    }


def _load_axis(steps: list[dict[str, Any]]) -> tuple[list[float], str]:
    if steps and all(s.get("offered_rps") for s in steps):
        return [float(s["offered_rps"]) for s in steps], "offered load (requests/s)"
    return [float(s["users"]) for s in steps], "offered load (concurrent closed-loop users)"


def plot(summary: dict[str, Any], out: Path) -> list[Path]:
    """latency.png (p50/p95/p99 per step) and throughput.png (achieved vs offered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = summary["steps"]
    x, label = _load_axis(steps)
    paths = [out / "latency.png", out / "throughput.png"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        ax.plot(x, [max(s[key], 0.1) for s in steps], style, label=key.replace("_ms", ""))
    if summary["slo"]["p99_ms"] is not None:
        ax.axhline(summary["slo"]["p99_ms"], color="red", linestyle="--", label="p99 SLO")
    ax.set(
        xlabel=label,
        ylabel="latency of admitted /v1/score (ms)",
        yscale="log",
        title="Latency percentiles per step",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(x, [s["score_rps"] for s in steps], "o-", label="scoring answered (req/s)")
    ax.plot(x, [s["shed"] / max(s["window_s"], 1e-9) for s in steps], "x--", label="shed (req/s)")
    if label.startswith("offered load (requests"):
        ax.plot(x, x, ":", color="grey", label="offered")
    ax.set(xlabel=label, ylabel="requests/s", title="Throughput vs offered load")
    right = ax.twinx()
    right.plot(x, [s["candidates_per_s"] for s in steps], "d-", color="tab:green", alpha=0.6)
    right.set_ylabel("candidates scored/s (diamonds)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def _slo_text(slo: dict[str, Any]) -> str:
    parts = [
        f"p99 ≤ {slo['p99_ms']:g} ms" if slo["p99_ms"] is not None else "",
        f"error rate ≤ {slo['error_rate']:g}" if slo["error_rate"] is not None else "",
    ]
    return ", ".join(p for p in parts if p) or "none stated"


def markdown(summary: dict[str, Any]) -> str:
    t, slo, m = summary["totals"], summary["slo"], summary.get("machine", {})
    verdict = "passed" if slo["passed"] else "MISSED: " + "; ".join(slo["violations"])
    lines = [
        "# Load test report",
        "",
        f"- target: `{summary.get('target')}`"
        + (" (started by the runner)" if summary.get("local_service") else ""),
        f"- machine: {m.get('cpus')} CPUs, {m.get('processor')}, load average (1 min) "
        f"{m.get('loadavg_1m')} before the run",
        f"- command: `{summary.get('command', '')}`",
        f"- SLO ({_slo_text(slo)}): **{verdict}**",
        "",
        "| requests | req/s | scoring p50 ms | p95 ms | p99 ms | error rate | shed rate |",
        "|---|---|---|---|---|---|---|",
        f"| {t['requests']} | {t['rps']:.1f} | {t['p50_ms']:g} | {t['p95_ms']:g} | "
        f"{t['p99_ms']:g} | {t['error_rate']:.4f} | {t['shed_rate']:.4f} |",
        "",
        "Per step (steady window of each step):",
        "",
        "| step | users | offered req/s | scoring req/s | candidates/s | p50 ms | p95 ms "
        "| p99 ms | shed rate | error rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary["steps"]:
        offered = f"{s['offered_rps']:.0f}" if s.get("offered_rps") else "closed loop"
        lines.append(
            f"| {s['step']} | {s['users']} | {offered} | {s['score_rps']:.1f} | "
            f"{s['candidates_per_s']:,.0f} | {s['p50_ms']:g} | {s['p95_ms']:g} | "
            f"{s['p99_ms']:g} | {s['shed_rate']:.3f} | {s['error_rate']:.4f} |"
        )
    lines += ["", "![latency](latency.png)", "", "![throughput](throughput.png)", ""]
    return "\n".join(lines)


def write_report(
    out: Path, csv_prefix: Path, steps_file: Path, slo: Slo, extra: dict[str, Any]
) -> dict[str, Any]:
    """Reads the run's files, writes summary.json, summary.md and the plots; -> the summary."""
    stats = read_stats(Path(f"{csv_prefix}_stats.csv"))
    steps = json.loads(steps_file.read_text()) if steps_file.exists() else {"steps": []}
    summary = summarize(stats, steps, slo, extra)
    if summary["steps"]:
        summary["plots"] = [p.name for p in plot(summary, out)]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    return summary
