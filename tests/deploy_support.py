"""Readers for the deployment files, shared by test_deploy.py, test_deploy_live.py and
test_alerts.py.

No Docker engine is needed: the Dockerfile is parsed here (continuations, exec-form JSON, ARG
expansion), compose files are read as YAML with compose's `${VAR:-default}` interpolation and
override merge, and Grafana's and the alert rules' PromQL goes through a real PromQL parser
(`promql-parser`). Custom resources (the Prometheus Operator's) are validated against their
vendored CRDs.

Run as a script, it prints deploy/k8s/prometheusrule.yaml (`make k8s-rules`).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser as pp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/slatectr.json"
SERVICE = "slatectr"  # the scoring service's name in docker-compose.yml
# Alert and recording rules: rules/ is what every Prometheus loads (compose mounts it);
# kubernetes/ holds the rules that need kube-state-metrics, added on Kubernetes only.
RULES_DIR = ROOT / "deploy/prometheus/rules"
K8S_RULES_DIR = ROOT / "deploy/prometheus/kubernetes"
PROMETHEUS_RULE = ROOT / "deploy/k8s/prometheusrule.yaml"

# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str  # the FROM argument, unexpanded
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def args(self, stage: Stage) -> dict[str, str]:
        """ARG defaults visible in `stage`: the global ones re-declared there, plus its own."""
        values: dict[str, str] = {}
        for args in stage.all("ARG"):
            name, _, default = args.partition("=")
            values[name] = default if default else self.global_args.get(name, "")
        return values

    def env(self, stage: Stage) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in stage.all("ENV"):
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                values[name] = value
        return values


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> Dockerfile:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments may sit inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            stages.append(Stage(name, parts[0]))
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


def expand(text: str, values: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` from `values` (Dockerfile ARG/ENV substitution)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD (shell form is an error)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """(options, exec-form command) of the stage's HEALTHCHECK."""
    options_text, sep, command = stage.last("HEALTHCHECK").partition(" CMD ")
    assert sep, "HEALTHCHECK must run a command"
    options = dict(opt.lstrip("-").split("=", 1) for opt in options_text.split())
    return options, exec_form(command.strip())


# ---------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


def gpu_override() -> dict[str, Any]:
    return load_yaml(ROOT / "compose.gpu.yaml")


def merge(base: Any, override: Any) -> Any:
    """Compose's override rule for mappings (merged key by key); other values are replaced.
    Enough for compose.gpu.yaml, which only adds mappings."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def interpolate(value: str, variables: dict[str, str] | None = None) -> str:
    """`${VAR:-default}` / `${VAR}` as compose resolves them from the shell or `.env`."""
    variables = variables or {}

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3) or ""
        return variables.get(name) or default

    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", one, value)


def service_env(service: dict[str, Any], variables: dict[str, str] | None = None) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment is written as a mapping"
    return {k: interpolate(str(v), variables) for k, v in env.items()}


def duration_s(text: str) -> float:
    """Compose durations: `20s`, `1m30s`, `500ms`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


def ctr_settings(env: dict[str, str]) -> Settings:
    """The Settings a `ctr serve` process would build from these CTR_* variables (every name must
    be a real setting: pydantic-settings would silently ignore a misspelt one)."""
    values: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith("CTR_"):
            continue
        key = name.removeprefix("CTR_").lower()
        assert key in Settings.model_fields, f"{name} is not a setting of service/settings.py"
        values[key] = value
    return Settings(**values)


def worst_case_shutdown_s(settings: Settings) -> float:
    """Drain delay, then uvicorn's graceful timeout (rounded up, service/server.py), then the
    engine's own batcher drain, which has the same timeout (service/http/api.py lifespan)."""
    graceful = float(-(-settings.graceful_timeout_s // 1))
    return settings.drain_delay_s + graceful + settings.graceful_timeout_s


# ---------------------------------------------------------------------------------------------
# Grafana PromQL and Prometheus scrapes
# ---------------------------------------------------------------------------------------------

# Grafana's built-in variables and the dashboard's own, replaced before parsing.
VARIABLE_VALUES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "5m"}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped sample


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every panel target."""
    return [
        (panel["title"], t["expr"], t.get("legendFormat", ""))
        for panel in dashboard["panels"]
        for t in panel.get("targets", [])
    ]


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    assert "$" not in expr, f"undeclared variable in {expr}"
    return expr


def sample_labels(exposition: str) -> dict[str, set[str]]:
    """Sample name (`x_bucket`, `y_total`, ...) -> label names seen on it in a scrape."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def output_labels(expr: Any, exported: dict[str, set[str]]) -> set[str]:
    """Labels that the result of `expr` carries, asserting along the way that every selector
    names an exported sample and every matcher or `by` label exists where it is used."""
    if isinstance(expr, pp.VectorSelector):
        assert expr.name in exported, f"{expr.name} is not exported by the service"
        labels = exported[expr.name] | TARGET_LABELS
        for matcher in expr.matchers.matchers:
            assert matcher.name in labels, f"{expr.name} has no label {matcher.name}"
        return labels
    if isinstance(expr, pp.MatrixSelector):
        return output_labels(expr.vector_selector, exported)
    if isinstance(expr, (pp.ParenExpr, pp.UnaryExpr)):
        return output_labels(expr.expr, exported)
    if isinstance(expr, (pp.NumberLiteral, pp.StringLiteral)):
        return set()
    if isinstance(expr, pp.Call):
        inner = set().union(*(output_labels(a, exported) for a in expr.args))
        return inner - {"le"} if expr.func.name == "histogram_quantile" else inner
    if isinstance(expr, pp.AggregateExpr):
        inner = output_labels(expr.expr, exported)
        chosen = set(expr.modifier.labels) if expr.modifier else set()
        if expr.modifier is not None and expr.modifier.type == pp.AggModifierType.By:
            assert chosen <= inner, f"aggregation by {chosen - inner} that the input lacks"
            return chosen
        return inner - chosen
    if isinstance(expr, pp.BinaryExpr):
        lhs, rhs = output_labels(expr.lhs, exported), output_labels(expr.rhs, exported)
        return lhs or rhs  # one-to-one matching keeps the left side's labels
    raise AssertionError(f"unhandled PromQL node {type(expr).__name__}")


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def check_dashboard_against(dashboard: dict[str, Any], exported: dict[str, set[str]]) -> int:
    """Asserts every query of the dashboard against the exported samples; returns the count."""
    variables = dict(VARIABLE_VALUES)
    for var in dashboard.get("templating", {}).get("list", []):
        variables[f"${var['name']}"] = var.get("allValue") or ".*"
    queries = dashboard_queries(dashboard)
    for title, expr, legend in queries:
        parsed = pp.parse(substitute(expr, variables))
        labels = output_labels(parsed, exported)
        missing = legend_labels(legend) - labels
        assert not missing, f"panel {title!r}: legend uses {missing}, the query keeps {labels}"
    return len(queries)


# ---------------------------------------------------------------------------------------------
# Alert rules and the Prometheus Operator's custom resources
# ---------------------------------------------------------------------------------------------


def rule_files(kubernetes: bool = False) -> list[Path]:
    """The rule files Prometheus loads (compose), plus the Kubernetes-only ones if asked."""
    files = sorted(RULES_DIR.glob("*.yml"))
    return files + sorted(K8S_RULES_DIR.glob("*.yml")) if kubernetes else files


def rule_groups(files: list[Path]) -> list[dict[str, Any]]:
    return [group for path in files for group in load_yaml(path)["groups"]]


def rules(files: list[Path]) -> list[dict[str, Any]]:
    return [rule for group in rule_groups(files) for rule in group["rules"]]


_PROMETHEUS_RULE_HEADER = """\
# Generated by `make k8s-rules` from deploy/prometheus/rules/*.yml and
# deploy/prometheus/kubernetes/*.yml (edit those, then regenerate; tests/test_alerts.py fails
# while this file differs). docs/operations.md explains every alert.
# For the Prometheus Operator: add the label that your Prometheus' ruleSelector expects
# (kube-prometheus-stack: release: <its release>).
"""


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (PromQL) as `|` blocks, as they are written in the rule files."""


_BlockStrings.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def prometheus_rule_text() -> str:
    """deploy/k8s/prometheusrule.yaml: every rule group in one PrometheusRule."""
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "slatectr",
            "labels": {
                "app.kubernetes.io/name": "slatectr",
                "app.kubernetes.io/component": "scorer",
            },
        },
        "spec": {"groups": rule_groups(rule_files(kubernetes=True))},
    }
    body = yaml.dump(resource, Dumper=_BlockStrings, sort_keys=False, width=100)
    return _PROMETHEUS_RULE_HEADER + body


CRD_FILES = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
}


def _strict(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused wherever it lists the known ones: what
    `kubectl apply` (server-side field validation, Strict by default) does with a custom
    resource, where the API server would otherwise prune them silently."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def custom_resource_errors(document: dict[str, Any]) -> list[str]:
    """Errors of a custom resource against the openAPIV3Schema of its vendored CRD."""
    crd = load_yaml(ROOT / "tests/schemas" / CRD_FILES[document["apiVersion"], document["kind"]])
    group, version = document["apiVersion"].split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == document["kind"]
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = _strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


# Series the rules read that Prometheus itself makes, not the service: name -> labels.
PROMETHEUS_SERIES = {"up": set[str]()}


def check_rules_against(files: list[Path], exported: dict[str, set[str]]) -> int:
    """Asserts every rule's PromQL against the exported samples, recording rules feeding the
    rules after them, and that every `$labels.x` a template uses is a label of the result.
    Returns the number of rules checked."""
    known = {**exported, **PROMETHEUS_SERIES}
    checked = rules(files)
    for rule in checked:
        labels = output_labels(pp.parse(rule["expr"]), known)
        if "record" in rule:
            known[rule["record"]] = labels
        templates = " ".join(
            [*rule.get("annotations", {}).values(), *rule.get("labels", {}).values()]
        )
        used = set(re.findall(r"\$labels\.(\w+)", templates))
        assert used <= labels, f"{rule.get('alert')}: templates use {used - labels}, has {labels}"
    return len(checked)


def check_series_against(test_files: list[Path], exported: dict[str, set[str]]) -> int:
    """Asserts that the input series of promtool unit tests name exported samples and labels.
    Returns the number of series checked."""
    known = {**exported, **PROMETHEUS_SERIES}
    count = 0
    for path in test_files:
        for test in load_yaml(path)["tests"]:
            for series in test["input_series"]:
                selector = pp.parse(series["series"])
                assert isinstance(selector, pp.VectorSelector), series
                output_labels(selector, known)
                count += 1
    return count


if __name__ == "__main__":
    sys.stdout.write(prometheus_rule_text())
