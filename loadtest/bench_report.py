"""bench.md and bench.png of `ctr bench suite` (the result dict of loadtest.bench.run_suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The targets (issue 5 "Measure and report").
TARGETS = {"raw_ort_ratio": 0.6, "half_load_p99_ms": 25.0, "naive_ratio": 5.0}


def _raw_reference(result: dict[str, Any]) -> dict[str, float]:
    """The raw ORT row with the highest median throughput: the service's ceiling."""
    return max(result["raw_ort"], key=lambda row: row["median_cps"])


def _system(result: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """The first system row whose name starts with `prefix` (rows keep their run order)."""
    return next((s for s in result["systems"] if s["system"].startswith(prefix)), None)


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, measured in this run."""
    raw = _raw_reference(result)["median_cps"]
    service, naive = _system(result, "service"), _system(result, "naive")
    inline, peer = _system(result, "service, history inline"), _system(result, "Triton")
    assert service is not None
    rows = [
        {
            "check": "service / raw ONNX Runtime (candidates/s)",
            "target": "≥ 0.6",
            "value": service["candidates_per_s"] / raw,
            "met": service["candidates_per_s"] / raw >= TARGETS["raw_ort_ratio"],
        },
        {
            "check": "service p99 at half its throughput (ms)",
            "target": "≤ 25",
            "value": service["half_load_p99_ms"],
            "met": service["half_load_p99_ms"] <= TARGETS["half_load_p99_ms"],
        },
    ]
    if naive is not None and naive["candidates_per_s"] > 0:
        ratio = service["candidates_per_s"] / naive["candidates_per_s"]
        rows.append(
            {
                "check": "service / naive service (candidates/s)",
                "target": "≥ 5",
                "value": ratio,
                "met": ratio >= TARGETS["naive_ratio"],
            }
        )
    if peer is not None and inline is not None and peer["candidates_per_s"] > 0:
        ratio = inline["candidates_per_s"] / peer["candidates_per_s"]
        rows.append(
            {
                "check": "service (history inline) / Triton peer (candidates/s)",
                "target": "(reported)",
                "value": ratio,
                "met": None,
            }
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    config, m = result["config"], result["machine"]
    raw = _raw_reference(result)
    lines = [
        "# Benchmark suite",
        "",
        f"Model `{config['model']}`, K={config['slate']} candidates, L={config['history']} "
        f"history; {config['concurrency']} closed-loop locust users for {config['seconds']} s "
        f"per measurement ({config['settle_s']} s settle left out); half load = Poisson "
        "arrivals at half the closed-loop throughput.",
        f"Machine: {m['cpus']} CPUs ({m['processor']}), CPU execution provider, load average "
        f"{m['loadavg_1m']} before / {result.get('loadavg_1m_after')} after; "
        "load generator on the same machine.",
        "",
        "| system | candidates/s | req/s | vs raw ORT | p50 / p99 ms at saturation "
        "| p50 / p99 ms at half load | mean batch (candidates) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["raw_ort"]:
        lines.append(
            f"| raw ONNX Runtime, {row['users']} user(s)/call | "
            f"{row['median_cps']:,.0f} | – | {row['median_cps'] / raw['median_cps']:.2f} "
            f"| – | – | {row['candidates']} |"
        )
    for s in result["systems"]:
        batch = f"{s['mean_batch_candidates']:.0f}" if s.get("mean_batch_candidates") else "–"
        lines.append(
            f"| {s['system']} | {s['candidates_per_s']:,.0f} | {s['rps']:.0f} | "
            f"{s['candidates_per_s'] / raw['median_cps']:.2f} | {s['saturation_p50_ms']:g} / "
            f"{s['saturation_p99_ms']:g} | {s['half_load_p50_ms']:g} / "
            f"{s['half_load_p99_ms']:g} | {batch} |"
        )
    lines += ["", "| check | target | measured | met |", "|---|---|---|---|"]
    for c in checks(result):
        met = "–" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['check']} | {c['target']} | {c['value']:.2f} | {met} |")
    if "export" in result:
        lines += [
            "",
            "Slate-shared vs pairwise export (`exporters.bench`, random weights):",
            "",
            result["export"]["table"],
        ]
    lines += ["", "![benchmark](bench.png)", ""]
    return "\n".join(lines)


def _label(system: str) -> str:
    return system.replace(" (", "\n(").replace(", ", ",\n")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = _raw_reference(result)
    names = [f"raw ORT\n({raw['users']} users/call)"]
    names += [_label(s["system"]) for s in result["systems"]]
    values = [raw["median_cps"], *(s["candidates_per_s"] for s in result["systems"])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.bar(range(len(values)), values, color="tab:blue")
    left.set_xticks(range(len(values)), names, fontsize=8)
    left.set(ylabel="candidates/s", title="Throughput (higher is better)")
    systems = result["systems"]
    x = range(len(systems))
    right.bar([i - 0.2 for i in x], [s["half_load_p50_ms"] for s in systems], 0.4, label="p50")
    right.bar([i + 0.2 for i in x], [s["half_load_p99_ms"] for s in systems], 0.4, label="p99")
    right.axhline(TARGETS["half_load_p99_ms"], color="red", linestyle="--", label="25 ms")
    right.set_xticks(list(x), [_label(s["system"]) for s in systems], fontsize=8)
    right.set(ylabel="ms", title="Latency at half of each system's throughput")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_bench_report(result: dict[str, Any], out: Path) -> None:
    result["checks"] = checks(result)
    plot(result, out / "bench.png")
    (out / "bench.md").write_text(markdown(result))
