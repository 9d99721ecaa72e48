"""The deployment files against a running service, started the way the image starts it.

The process runs the Dockerfile's own CMD (`ctr serve`) with the image's ENV and then
docker-compose.yml's environment on top, only the bind address, port, model repository and
Redis URL swapped for local ones (a real redis-server, a real exported model repository).
Then: the image's HEALTHCHECK command passes against it, every Grafana query, alert rule and
promtool unit-test series names metrics and labels of a real /metrics scrape, and SIGTERM drains
within compose's stop_grace_period.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from deploy_support import (
    DASHBOARD,
    ROOT,
    SERVICE,
    check_dashboard_against,
    check_rules_against,
    check_series_against,
    compose,
    dashboard_queries,
    duration_s,
    exec_form,
    healthcheck,
    load_yaml,
    parse_dockerfile,
    rule_files,
    rules,
    sample_labels,
    service_env,
)

from service.processes import NotReady, free_port, http_ok, stop_process, wait_until
from service.store.embedded_redis import RedisServer

pytestmark = pytest.mark.slow


@dataclass
class Live:
    process: subprocess.Popen[bytes]
    url: str
    log: Path


def _wait_ready(live: Live, timeout_s: float = 90.0) -> None:
    try:
        url = f"{live.url}/readyz"
        wait_until(lambda: http_ok(url, 1), timeout_s, live.process, 0.2, "the service")
    except NotReady as exc:
        raise AssertionError(f"{exc}:\n{live.log.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def live(service_model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    serve = parse_dockerfile().stage("serve")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
    env |= {k: v for k, v in parse_dockerfile().env(serve).items() if k != "PATH"}
    env |= service_env(compose()["services"][SERVICE])
    redis = RedisServer().start()
    port = free_port()
    # Loopback instead of 0.0.0.0, and local stand-ins for the compose network's names.
    env |= {
        "CTR_HOST": "127.0.0.1",
        "CTR_PORT": str(port),
        "CTR_REPO": str(service_model_repo),
        "CTR_REDIS_URL": redis.url,
    }
    # A routing file with a shadow (as deploy/k8s mounts one), so the shadow panels' series exist.
    routing = tmp_path_factory.mktemp("deploy-routing") / "routing.yaml"
    routing.write_text(
        "experiments: [{name: live, variants: [{name: live-a, model: sarn, "
        "weight: 1, shadow: {model: ncm}}]}]\n"
    )
    env["CTR_ROUTING_FILE"] = str(routing)
    command = exec_form(serve.last("CMD"))
    command[0] = str(Path(sys.executable).parent / command[0])  # the console script, as on PATH
    log = tmp_path_factory.mktemp("deploy-live") / "service.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    live = Live(process, f"http://127.0.0.1:{port}", log)
    try:
        _wait_ready(live)
        yield live
    finally:
        stop_process(process, 30)
        redis.close()


def _run_probe(probe: list[str], port: int) -> int:
    command = [sys.executable if probe[0] == "python" else probe[0], *probe[1:]]
    env = {**os.environ, "CTR_PORT": str(port)}
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


def test_image_healthcheck_passes_live_and_fails_without_a_listener(live: Live) -> None:
    _, probe = healthcheck(parse_dockerfile().stage("serve"))
    port = int(live.url.rsplit(":", 1)[1])
    assert _run_probe(probe, port) == 0
    assert _run_probe(probe, free_port()) != 0  # nothing listens there: unhealthy


def _traffic(client: httpx.Client) -> None:
    """One request of every kind, so every histogram and counter has samples with labels."""
    models = [m["name"] for m in client.get("/v1/models").json()["models"]]
    assert models, "the fixture repository has models"
    events = [
        {
            "user_id": "u1",
            "item_id": f"i{k}",
            "category_id": "c1",
            "ts": 1_700_000_000 + k,
            "event_id": f"e{k}",
        }
        for k in range(3)
    ]
    assert client.post("/v1/events", json={"events": events}).status_code == 202
    candidates = [{"item_id": "i1", "category_id": "c1"}, {"item_id": "i2", "category_id": "c2"}]
    for model in models:
        body = {"user_id": "u1", "candidates": candidates, "model": model}
        assert client.post("/v1/score", json=body).status_code == 200
        inline = body | {"history": [{"item_id": "i3", "category_id": "c1"}]}
        assert client.post("/v1/score", json=inline).status_code == 200
    # A deadline below the floor is the client's error, not a refusal (the rejection counter is
    # exported with every reason from start-up: tests/test_service_metrics.py).
    late = client.post(
        "/v1/score",
        json={"user_id": "u1", "candidates": candidates},
        headers={"X-Request-Timeout-Ms": "0.001"},
    )
    assert late.status_code == 422


def test_dashboard_queries_name_only_exported_metrics_and_labels(live: Live) -> None:
    with httpx.Client(base_url=live.url, timeout=10) as client:
        _traffic(client)
        exported = sample_labels(client.get("/metrics").text)
    dashboard = json.loads(DASHBOARD.read_text())
    assert check_dashboard_against(dashboard, exported) == len(dashboard_queries(dashboard)) > 10
    variable = dashboard["templating"]["list"][0]["definition"]
    assert (
        variable == "label_values(ctr_model_info, model)" and "model" in exported["ctr_model_info"]
    )
    hpa = load_yaml(ROOT / "deploy/k8s/hpa.yaml")
    pods_metrics = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert pods_metrics and all(name in exported for name in pods_metrics)
    # The check is not vacuous: a misspelt metric, an unknown label, a dropped legend label fail.
    for broken_expr, legend in (
        ("sum(rate(ctr_request_duration_second_count[$__rate_interval]))", ""),
        ('sum(rate(ctr_request_duration_seconds_count{route="/v1/score"}[$__rate_interval]))', ""),
        (
            "sum by (model) (rate(ctr_request_duration_seconds_count[$__rate_interval]))",
            "{{status}}",
        ),
    ):
        broken = copy.deepcopy(dashboard)
        broken["panels"][1]["targets"] = [{"expr": broken_expr, "legendFormat": legend}]
        with pytest.raises(AssertionError):
            check_dashboard_against(broken, exported)


def test_alert_rules_and_their_unit_tests_name_only_exported_metrics(live: Live) -> None:
    """The rules (Kubernetes-only ones aside: kube-state-metrics) and the series that
    tests/prometheus feeds them name what the service really exports, with its labels."""
    with httpx.Client(base_url=live.url, timeout=10) as client:
        _traffic(client)
        exported = sample_labels(client.get("/metrics").text)
    files = rule_files()
    assert check_rules_against(files, exported) == len(rules(files)) >= 29
    unit_tests = [ROOT / "tests/prometheus" / n for n in ("alerts_test.yml", "slo_test.yml")]
    assert check_series_against(unit_tests, exported) > 40
    # Not vacuous: a misspelt metric, a label the metric lacks, a template label the result
    # drops are refused.
    for expr, summary in (
        ("rate(ctr_request_duration_second_count[5m]) > 0", ""),
        ('rate(ctr_history_source_total{reason="fallback"}[5m]) > 0', ""),
        (
            "sum by (model) (rate(ctr_request_duration_seconds_count[5m])) > 0",
            "{{ $labels.status }}",
        ),
    ):
        broken = live.log.parent / "broken.rules.yml"
        alert = {"alert": "Broken", "expr": expr, "annotations": {"summary": summary}}
        broken.write_text(json.dumps({"groups": [{"name": "b", "rules": [alert]}]}))
        with pytest.raises(AssertionError):
            check_rules_against([broken], exported)


def test_sigterm_drains_then_exits_within_stop_grace_period(live: Live) -> None:
    """Runs last in this module: it stops the shared service."""
    service = compose()["services"][SERVICE]
    env = service_env(service)
    live.process.send_signal(signal.SIGTERM)
    start = time.monotonic()
    with httpx.Client(base_url=live.url, timeout=5) as client:
        # During the drain delay the process still listens: liveness holds, readiness drops,
        # and new scoring work is refused, so load balancers move traffic away first.
        ready = client.get("/readyz")
        assert time.monotonic() - start < float(env["CTR_DRAIN_DELAY_S"]), "check came too late"
        assert ready.status_code == 503 and "draining" in ready.json()["reasons"]
        assert client.get("/healthz").status_code == 200
        body = {"user_id": "u1", "candidates": [{"item_id": "i1", "category_id": "c1"}]}
        assert client.post("/v1/score", json=body).status_code == 503
    returncode = live.process.wait(timeout=duration_s(service["stop_grace_period"]))
    assert returncode in (0, -signal.SIGTERM), live.log.read_text()[-3000:]
    assert "Traceback" not in live.log.read_text()
