"""`ctr bench export` on a tiny configuration: the three forms agree and the table is written.

Speed itself is measured by the benchmark, never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exporters.bench import BenchConfig, run_bench
from slatectr.cli import app


def test_the_three_forms_agree_on_every_cell() -> None:
    config = BenchConfig(
        models=["din", "fat"], users=[1, 3], slate=4, history=5, repeats=1, items=50, categories=5
    )
    rows = run_bench(config)
    assert [(r.model, r.users, r.candidates) for r in rows] == [
        ("din", 1, 4),
        ("din", 3, 12),
        ("fat", 1, 4),
        ("fat", 3, 12),
    ]
    for row in rows:
        assert row.max_abs_diff <= 1e-5
        assert min(row.shared_cps, row.pairwise_cps, row.eager_cps) > 0


def test_only_behaviour_models_are_benchmarked() -> None:
    with pytest.raises(ValueError, match="not behaviour models"):
        run_bench(BenchConfig(models=["ncm"]))


def test_the_cli_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "export",
            "--models",
            "wdl",
            "--users",
            "2",
            "--slate",
            "3",
            "--history",
            "4",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| wdl | 2 | 6 |" in result.output
    rows = json.loads(out.read_text())
    assert rows[0]["candidates"] == 6 and rows[0]["speedup_vs_pairwise"] > 0
