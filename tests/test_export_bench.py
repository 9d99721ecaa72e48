"""`ctr bench export` on a tiny configuration: every form agrees and the table is written.

Speed itself is measured by the benchmark, never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exporters.bench import REFERENCE, BenchConfig, run_bench
from slatectr.cli import app


def test_every_form_agrees_on_every_cell() -> None:
    config = BenchConfig(
        models=["sarn", "din"],
        users=[2],
        slates=[3],
        histories=[4, 5],
        repeats=1,
        items=50,
        categories=5,
    )
    rows = run_bench(config)
    forms = ["cpu-fused", "cpu-loop", "batched", REFERENCE, "pairwise", "eager"]
    assert [(r.model, r.history, r.form) for r in rows] == [
        (model, history, form) for model in ("sarn", "din") for history in (4, 5) for form in forms
    ]
    for row in rows:
        assert row.max_abs_diff <= 1e-5 and row.candidates == 6
        assert min(row.cpu_ms, row.wall_ms, row.cpu_ratio, row.wall_ratio) > 0
    assert all(r.cpu_ratio == 1.0 for r in rows if r.form == REFERENCE)


def test_only_behaviour_models_are_benchmarked() -> None:
    with pytest.raises(ValueError, match="not behaviour models"):
        run_bench(BenchConfig(models=["ncm"]))


def test_the_cli_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "export", "--models", "wdl", "--users", "2", "--slate", "3"]
    args += ["--history", "4", "--repeats", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"| wdl | 2×3 | 4 | {REFERENCE} |" in result.output
    rows = json.loads(out.read_text())
    assert [r["form"] for r in rows] == [REFERENCE, "pairwise", "eager"]
    assert rows[0]["candidates"] == 6 and rows[0]["us_per_candidate"] > 0


def test_set_times_each_model_with_its_defaults_and_then_with_the_fields_set(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "export", "--models", "sarn", "--users", "2", "--slate", "3", "--history"]
    args += ["4", "--repeats", "1", "--set", "recent_items=2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    labels = [r["model"] for r in rows if r["form"] == REFERENCE]
    assert labels == ["sarn", "sarn recent_items=2"]
    assert all(r["max_abs_diff"] <= 1e-5 for r in rows)
    with pytest.raises(ValueError, match="recent_items: 'two' is not a valid int"):
        run_bench(BenchConfig(models=["sarn"], overrides=["recent_items=two"]))


@pytest.mark.parametrize(
    ("assignment", "message"),
    [("recent_items=two", "not a valid int"), ("lr_decay=0.5", "not model fields")],
)
def test_set_refuses_what_is_not_a_model_field(assignment: str, message: str) -> None:
    args = ["bench", "export", "--models", "sarn", "--set", assignment]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output
