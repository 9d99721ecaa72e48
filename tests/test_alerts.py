"""The Prometheus rules of deploy/prometheus, checked and unit-tested by a real promtool.

`make test` unpacks promtool from Debian's `prometheus` package into .tools/ and passes its path
as PROMTOOL (Makefile). Without one these tests fail: a missing checker is not a pass.

promtool's own unit tests (tests/prometheus/*_test.yml) feed synthetic series to the rules and
say which alerts fire when. Here: they pass, every alert has a case where it fires and one where
it stays quiet, and they really depend on the rules (rules that never fire, or always fire,
fail them). The series carry the names and labels the service exports: test_deploy_live.py
checks them, and the rules' own selectors, against a live scrape.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    K8S_RULES_DIR,
    PROMETHEUS_RULE,
    ROOT,
    RULES_DIR,
    compose,
    load_yaml,
    prometheus_rule_text,
    rule_files,
    rules,
)

UNIT_TESTS = sorted((ROOT / "tests/prometheus").glob("*_test.yml"))
SEVERITIES = {"critical", "warning", "info"}
OPERATIONS = ROOT / "docs/operations.md"


@pytest.fixture(scope="module")
def promtool() -> Path:
    path = ROOT / os.environ.get("PROMTOOL", ".tools/promtool")  # relative: to the root
    assert path.is_file() and os.access(path, os.X_OK), (
        f"no promtool at {path}: `make tools` installs it (`make test` does)"
    )
    return path


def _run(promtool: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _alerts() -> list[dict[str, Any]]:
    return [r for r in rules(rule_files(kubernetes=True)) if "alert" in r]


def test_config_and_every_rule_file_pass_promtool_check(promtool: Path, tmp_path: Path) -> None:
    config = ROOT / "deploy/prometheus/prometheus.yml"
    checked = _run(promtool, "check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The config's rule_files glob finds the rule files, and promtool checks them too.
    assert f"SUCCESS: {len(rule_files())} rule files found" in checked.stdout
    files = rule_files(kubernetes=True)
    checked = _run(promtool, "check", "rules", *map(str, files))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for path in files:
        count = len(rules([path]))
        assert f"Checking {path}\n  SUCCESS: {count} rules found" in checked.stdout
    # The checker is not vacuous: unbalanced PromQL is refused.
    broken = tmp_path / "broken.yml"
    broken.write_text("groups: [{name: g, rules: [{alert: A, expr: 'rate(ctr_x[5m]'}]}]\n")
    assert _run(promtool, "check", "rules", str(broken)).returncode != 0


def test_rule_unit_tests_pass(promtool: Path) -> None:
    tested = _run(promtool, "test", "rules", *map(str, UNIT_TESTS))
    output = tested.stdout + tested.stderr
    assert tested.returncode == 0, output
    assert output.count("SUCCESS") == len(UNIT_TESTS) == 3 and "FAILED" not in output


def _alert_cases() -> dict[str, dict[str, int]]:
    """alertname -> number of promtool cases expecting it to fire and to stay quiet."""
    cases: dict[str, dict[str, int]] = {}
    for path in UNIT_TESTS:
        for test in load_yaml(path)["tests"]:
            for case in test.get("alert_rule_test", []):
                counts = cases.setdefault(case["alertname"], {"fires": 0, "quiet": 0})
                counts["fires" if case.get("exp_alerts") else "quiet"] += 1
    return cases


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = _alert_cases()
    names = [a["alert"] for a in _alerts()]
    assert len(names) == len(set(names)) >= 16
    for name in names:
        assert cases.get(name, {}).get("fires"), f"no promtool case where {name} fires"
        assert cases[name]["quiet"], f"no promtool case where {name} stays quiet"
    assert set(cases) <= set(names), "a promtool case names an alert that does not exist"
    # Together the unit tests load every rule file.
    loaded = {
        (path.parent / name).resolve()
        for path in UNIT_TESTS
        for name in load_yaml(path)["rule_files"]
    }
    assert loaded == {p.resolve() for p in rule_files(kubernetes=True)}


def _failed_alerts(promtool: Path, tmp_path: Path, expr: str) -> set[str]:
    """Runs the unit tests against copies of the rule files in which every alert's expression
    is `expr`; returns the alerts whose cases failed."""
    deploy = tmp_path / "deploy/prometheus"
    for source in (RULES_DIR, K8S_RULES_DIR):
        target = deploy / source.name
        target.mkdir(parents=True)
        for path in source.glob("*.yml"):
            document = load_yaml(path)
            for group in document["groups"]:
                for rule in group["rules"]:
                    if "alert" in rule:
                        rule["expr"] = expr
            (target / path.name).write_text(yaml.safe_dump(document))
    shutil.copytree(ROOT / "tests/prometheus", tmp_path / "tests/prometheus")
    copies = [str(tmp_path / "tests/prometheus" / p.name) for p in UNIT_TESTS]
    tested = _run(promtool, "test", "rules", *copies, cwd=tmp_path)
    assert tested.returncode != 0
    return set(re.findall(r"alertname: (\w+), time:", tested.stdout + tested.stderr))


def test_unit_tests_fail_when_the_alerts_never_fire(promtool: Path, tmp_path: Path) -> None:
    expected = {name for name, counts in _alert_cases().items() if counts["fires"]}
    assert _failed_alerts(promtool, tmp_path, "vector(1) == 0") == expected


def test_unit_tests_fail_when_the_alerts_always_fire(promtool: Path, tmp_path: Path) -> None:
    expected = {name for name, counts in _alert_cases().items() if counts["quiet"]}
    assert _failed_alerts(promtool, tmp_path, "vector(1)") >= expected


def test_alerts_carry_a_severity_and_an_operators_page() -> None:
    headings = set(re.findall(r"^### (\w+)$", OPERATIONS.read_text(), re.MULTILINE))
    for alert in _alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook"] == f"docs/operations.md#{name.lower()}", name
        assert name in headings, f"docs/operations.md has no section `### {name}`"
    assert headings == {a["alert"] for a in _alerts()}, "a section for an alert that is gone"
    readme = (ROOT / "README.md").read_text()
    assert "docs/operations.md" in readme


def test_burn_rate_alerts_follow_the_workbook_windows() -> None:
    """Both SLOs: 14.4x over 1h and 5m or 6x over 6h and 30m pages; 3x over 1d and 2h or 1x over
    3d and 6h is a ticket. The budgets are the documented objectives (99.9 %, 99 %)."""
    burns = {a["alert"]: a for a in _alerts() if "slo" in a["labels"]}
    budgets = {"scoring-availability": "0.001", "scoring-latency": "0.01"}
    for name, alert in burns.items():
        budget = budgets[alert["labels"]["slo"]]
        fast = alert["labels"]["severity"] == "critical"
        pairs = [("1h", "5m", "14.4"), ("6h", "30m", "6")] if fast else [("1d", "2h", "3")]
        pairs += [] if fast else [("3d", "6h", "")]
        for long, short, factor in pairs:
            threshold = f"{factor} * {budget}" if factor else budget
            for window in (long, short):
                assert f"ratio_rate{window} > {threshold}" in alert["expr"], (name, window)
    assert len(burns) == 4


def test_prometheus_rule_manifest_is_generated_from_the_rule_files() -> None:
    assert PROMETHEUS_RULE.read_text() == prometheus_rule_text(), "run `make k8s-rules`"
    groups = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"]
    assert len({g["name"] for g in groups}) == len(groups)


def test_compose_prometheus_loads_the_rule_files() -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = dict(reversed(v.removesuffix(":ro").split(":")) for v in prometheus["volumes"])
    config_path = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_dir = Path(config_path.split("=", 1)[1]).parent
    config = load_yaml(ROOT / mounts[str(config_dir / "prometheus.yml")])
    for pattern in config["rule_files"]:
        mounted = str(config_dir / Path(pattern).parent)
        assert (ROOT / mounts[mounted]).resolve() == RULES_DIR, pattern
        assert sorted(RULES_DIR.glob(Path(pattern).name)) == rule_files()
