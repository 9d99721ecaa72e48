"""Deployment files without a Docker engine: schemas, wiring between the files, and the service.

The compose files are validated against the Compose Specification's JSON schema (vendored in
tests/schemas/), the Kubernetes manifests against the API schemas that `kubernetes-validate`
ships (strict: unknown fields are errors). Routes, commands and settings the files name are
checked against the real app, CLI and Settings. The live checks (the image's command starting
the service, the health checks, the dashboard's metrics in a real scrape, SIGTERM) are in
test_deploy_live.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import typer.core
import typer.main
import yaml
from deploy_support import (
    CRD_FILES,
    DASHBOARD,
    ROOT,
    SERVICE,
    compose,
    ctr_settings,
    custom_resource_errors,
    dashboard_queries,
    duration_s,
    exec_form,
    expand,
    gpu_override,
    healthcheck,
    load_yaml,
    merge,
    parse_dockerfile,
    service_env,
    worst_case_shutdown_s,
)
from starlette.routing import Match

from service.http.api import build_app
from service.settings import Settings
from slatectr.cli import app as cli_app

COMPOSE_SCHEMA = ROOT / "tests/schemas/compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"
# The Prometheus Operator's CRDs (tests/schemas/README.md), for its custom resources.
CRD_SHA256 = {
    "monitoring.coreos.com_prometheusrules.yaml": (
        "78be98554b9c8506ab2b4f4feb91c5f3a56e536a0a510f3a8e876a459970d56d"
    ),
    "monitoring.coreos.com_podmonitors.yaml": (
        "45a93443daa687d3654f7e9631909ff7edcdf3ec09c5e60251b74aa2722aee5d"
    ),
}
K8S_DIR = ROOT / "deploy/k8s"
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


class GetRoutes:
    """`path in routes`: the real app answers GET `path` with a route (not 404 or 405)."""

    def __init__(self) -> None:
        self.app = build_app(Settings())

    def __contains__(self, path: object) -> bool:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
        return any(r.matches(scope)[0] == Match.FULL for r in self.app.routes)


@pytest.fixture(scope="module")
def get_routes() -> GetRoutes:
    routes = GetRoutes()
    assert "/healthz" in routes and "/no-such-route" not in routes and "/v1/score" not in routes
    return routes


def _compose_errors(document: Any) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, d) for d in load_yaml_all(path) if d]
    return docs


def load_yaml_all(path: Path) -> list[Any]:
    return list(yaml.safe_load_all(path.read_text()))


def _k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _k8s_documents() if d["kind"] == kind]
    if name is not None:
        found = [d for d in found if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == SERVICE)


# --- Dockerfile -------------------------------------------------------------------------------


def test_serving_image_matches_the_cuda_build_of_onnxruntime() -> None:
    from onnxruntime.capi import build_and_package_info as ort_build

    dockerfile = parse_dockerfile()
    serve = dockerfile.stage("serve")
    image = expand(serve.base, dockerfile.global_args)
    repository, _, tag = image.partition(":")
    assert repository == "nvidia/cuda" and "-cudnn-runtime-" in tag, image
    # The installed wheel says which CUDA it was built with; the base must have the same major.
    assert tag.split(".")[0] == ort_build.cuda_version.split(".")[0], (tag, ort_build.cuda_version)
    assert dockerfile.global_args["ORT_VERSION"] == version("onnxruntime-gpu")
    assert dockerfile.stage("serve-builder").base == serve.base  # the venv's python exists there


def test_serving_image_runs_ctr_serve_as_a_fixed_non_root_user(get_routes: GetRoutes) -> None:
    dockerfile = parse_dockerfile()
    final = dockerfile.stages[-1]
    assert final.base == "serve", "the default build target is the serving image"
    serve = dockerfile.stage("serve")
    args = dockerfile.args(serve)
    uid, _, gid = expand(serve.last("USER"), args).partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit(), (uid, gid)
    assert any(
        f"--uid {args['APP_UID']}" in expand(r, args) or "--uid ${APP_UID}" in r
        for r in serve.all("RUN")
    )
    command = exec_form(serve.last("CMD"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0] in scripts
    group = typer.main.get_command(cli_app)
    assert isinstance(group, typer.core.TyperGroup)
    subcommand = group.get_command(group.make_context("ctr", [command[1]]), command[1])
    assert subcommand is not None and command[1] == "serve"
    subcommand.make_context(command[1], command[2:])  # raises on an unknown option
    env = dockerfile.env(serve)
    assert ctr_settings(env).host == "0.0.0.0"  # reachable through the published port
    assert serve.last("EXPOSE") == env["CTR_PORT"] == str(ctr_settings(env).port)
    _, probe = healthcheck(serve)
    assert probe[:2] == ["python", "-c"] and "/healthz'" in probe[2]
    assert "/healthz" in get_routes


def test_the_custom_op_library_is_compiled_in_the_builder_stage_only() -> None:
    dockerfile = parse_dockerfile()
    builder = " ".join(dockerfile.stage("serve-builder").all("RUN"))
    assert " gcc " in builder and "library_path" in builder  # built, and checked to be there
    assert "gcc" not in " ".join(dockerfile.stage("serve").all("RUN"))  # no compiler served
    assert "**/*.so" in (ROOT / ".dockerignore").read_text()  # never a locally built one


def test_models_are_baked_from_a_build_argument_or_mounted() -> None:
    dockerfile = parse_dockerfile()
    serve = dockerfile.stage("serve")
    args = dockerfile.args(serve)
    copies = [expand(c, args).split() for c in serve.all("COPY") if "MODEL_REPO" in c]
    assert len(copies) == 1
    source, target = copies[0]
    assert (ROOT / source).is_dir() and target.rstrip("/") == dockerfile.env(serve)["CTR_REPO"]
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not {source.rstrip("/"), "model_repo", "pyproject.toml", "service", "slatectr"} & ignored
    assert {".venv", ".git", ".env", "data", "runs"} <= ignored


def test_training_target_runs_ctr_as_a_non_root_user() -> None:
    # What it installs (the train lock) is checked in test_lock.py.
    train = parse_dockerfile().stage("train")
    assert exec_form(train.last("ENTRYPOINT")) == ["ctr"]
    assert train.last("USER") != "root"


# --- Compose ----------------------------------------------------------------------------------


def test_vendored_compose_schema_is_the_recorded_one() -> None:
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() == COMPOSE_SCHEMA_SHA256
    jsonschema.Draft7Validator.check_schema(json.loads(COMPOSE_SCHEMA.read_text()))


def test_compose_files_validate_against_the_compose_spec() -> None:
    assert _compose_errors(compose()) == []
    assert _compose_errors(gpu_override()) == []
    assert _compose_errors(merge(compose(), gpu_override())) == []
    # The validator is not vacuous: a misspelt key and a GPU device without capabilities fail.
    broken = copy.deepcopy(compose())
    broken["services"][SERVICE]["stop_grace_periods"] = "20s"
    assert _compose_errors(broken)
    broken_gpu = copy.deepcopy(gpu_override())
    del broken_gpu["services"][SERVICE]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ]
    assert _compose_errors(broken_gpu)


def test_gpu_lives_only_in_the_override() -> None:
    base = compose()["services"][SERVICE]
    assert "deploy" not in base or "reservations" not in base["deploy"].get("resources", {})
    assert "gpus" not in base and "runtime" not in base
    merged = merge(compose(), gpu_override())["services"][SERVICE]
    devices = merged["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    settings = ctr_settings(service_env(merged))
    assert settings.require_gpu and settings.providers[0] == "CUDAExecutionProvider"
    assert merged["image"] == base["image"]  # the override changes nothing else


def test_service_settings_and_shutdown_budget() -> None:
    service = compose()["services"][SERVICE]
    settings = ctr_settings(service_env(service))
    assert settings.redis_url == "redis://redis:6379/0" and not settings.ingest_api_keys
    assert settings.port == 8000 and str(settings.repo) == "/models"
    assert duration_s(service["stop_grace_period"]) > worst_case_shutdown_s(settings) > 0
    assert service["init"] is True  # signals forwarded, children reaped
    keys = ctr_settings(service_env(service, {"CTR_INGEST_API_KEYS": "a,b"}))
    assert [k.get_secret_value() for k in keys.ingest_api_keys] == ["a", "b"]


def test_containers_are_hardened_and_models_read_only() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} publicly"
    assert "ports" not in services["redis"]
    mounts = [m for m in services[SERVICE]["volumes"] if isinstance(m, dict)]
    models = next(m for m in mounts if m["target"] == "/models")
    assert models["read_only"] is True and models["type"] == "bind"


def test_redis_persists_with_aof_everysec_on_a_volume() -> None:
    spec = compose()
    redis = spec["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in spec["volumes"]


def test_depends_on_conditions_have_healthchecks() -> None:
    services = compose()["services"]
    seen = 0
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
                seen += 1
    assert services[SERVICE]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert seen >= 3


def test_compose_healthcheck_is_the_images_liveness_probe() -> None:
    _, image_probe = healthcheck(parse_dockerfile().stage("serve"))
    test = compose()["services"][SERVICE]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == image_probe


def test_locust_runs_the_projects_locustfile_behind_a_profile() -> None:
    services = compose()["services"]
    for name in ("locust-master", "locust-worker"):
        service = services[name]
        assert service["profiles"] == ["loadtest"]
        command = service["command"]
        locustfile = command[command.index("-f") + 1]
        host_dir, _, mount = service["volumes"][0].partition(":")
        mount = mount.removesuffix(":ro")
        relative = Path(locustfile).relative_to(mount)
        assert (ROOT / host_dir / relative).resolve() == ROOT / "loadtest/locustfile.py"
    master = services["locust-master"]["command"]
    port = ctr_settings(service_env(services[SERVICE])).port
    assert master[master.index("--host") + 1] == f"http://{SERVICE}:{port}"
    worker = services["locust-worker"]["command"]
    assert worker[worker.index("--master-host") + 1] == "locust-master"


def test_prometheus_scrapes_every_service_replica(get_routes: GetRoutes) -> None:
    spec = compose()
    prometheus = spec["services"]["prometheus"]
    config_mount = next(v for v in prometheus["volumes"] if "prometheus.yml" in v)
    host_path, target, _ = config_mount.split(":")
    assert f"--config.file={target}" in prometheus["command"]
    config = load_yaml(ROOT / host_path)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == SERVICE)
    assert job["metrics_path"] in get_routes and job["metrics_path"] == "/metrics"
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == [SERVICE] and sd["type"] == "A"
    assert sd["port"] == ctr_settings(service_env(spec["services"][SERVICE])).port


def test_grafana_is_provisioned_from_the_committed_files() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in grafana["volumes"] if "./" in v}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = load_yaml(provisioning / "datasources/prometheus.yaml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    provider = load_yaml(provisioning / "dashboards/slatectr.yaml")["providers"][0]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert DASHBOARD.parent == dashboards_dir and DASHBOARD.is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}


def test_dashboard_layout_and_coverage() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    # What the issue asks to see: rate, latency quantiles, queue wait, batch size, inference,
    # history source, shed requests (shadow divergence arrives with issue 6's metrics).
    text = json.dumps([q for _, q, _ in dashboard_queries(dashboard)])
    for metric in (
        "ctr_request_duration_seconds_count",
        "ctr_queue_wait_seconds_bucket",
        "ctr_batch_candidates_bucket",
        "ctr_inference_duration_seconds_bucket",
        "ctr_history_source_total",
        "ctr_requests_rejected_total",
        "ctr_stage_duration_seconds_bucket",
        "ctr_stage_duration_seconds_sum",
        "ctr_event_loop_lag_seconds_bucket",
    ):
        assert metric in text, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, " in text


# --- Kubernetes -------------------------------------------------------------------------------


def _is_custom(document: dict[str, Any]) -> bool:
    return (document["apiVersion"], document["kind"]) in CRD_FILES


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(k8s_version: str) -> None:
    documents = _k8s_documents()
    assert {d["kind"] for _, d in documents} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    for _, document in documents:
        if not _is_custom(document):
            kubernetes_validate.validate(document, k8s_version, strict=True)
    broken = copy.deepcopy(_k8s("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paths"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, k8s_version, strict=True)


def test_vendored_crds_are_the_recorded_ones() -> None:
    for name, digest in CRD_SHA256.items():
        assert hashlib.sha256((ROOT / "tests/schemas" / name).read_bytes()).hexdigest() == digest
    assert set(CRD_SHA256) == set(CRD_FILES.values())


def test_custom_resources_validate_against_their_crds() -> None:
    """The Prometheus Operator's kinds are CRDs, which kubernetes-validate does not know (so
    they are not skipped there for convenience): each is checked against its vendored CRD,
    unknown fields refused as `kubectl apply` refuses them."""
    custom = [d for _, d in _k8s_documents() if _is_custom(d)]
    assert {d["kind"] for d in custom} == {"PrometheusRule", "PodMonitor"}
    for document in custom:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(document, K8S_VERSIONS[-1], strict=True)
        assert custom_resource_errors(document) == [], document["kind"]
    # Not vacuous: a misspelt field, a malformed duration and a missing expr are refused.
    rule = copy.deepcopy(_k8s("PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["records"] = "x"
    alert = next(r for g in rule["spec"]["groups"] for r in g["rules"] if "for" in r)
    alert["for"] = "5 minutes"
    del rule["spec"]["groups"][-1]["rules"][0]["expr"]
    assert len(custom_resource_errors(rule)) == 3
    monitor = copy.deepcopy(_k8s("PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["paths"] = "/metrics"
    assert custom_resource_errors(monitor)


def test_pod_monitor_scrapes_the_pods_under_the_job_the_rules_select(get_routes: GetRoutes) -> None:
    monitor = _k8s("PodMonitor")["spec"]
    pod_labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels[monitor["jobLabel"]] == SERVICE  # job="slatectr", as in compose
    endpoint = monitor["podMetricsEndpoints"][0]
    assert endpoint["port"] in {p["name"] for p in _container()["ports"]}
    assert endpoint["path"] in get_routes


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["images"][0]["name"] == _container()["image"].split(":")[0]


def test_selectors_and_targets_line_up() -> None:
    deployment = _k8s("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert _k8s("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert (
        _k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    )
    target = _k8s("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    port_names = {p["name"] for p in _container()["ports"]}
    assert _k8s("Service")["spec"]["ports"][0]["targetPort"] in port_names
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert _k8s("ServiceAccount", sa)["automountServiceAccountToken"] is False


def test_pod_probes_gpu_and_security(get_routes: GetRoutes) -> None:
    container = _container()
    port_names = {p["name"] for p in container["ports"]}
    probes = {
        k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["path"] in get_routes and probe["port"] in port_names
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    dockerfile = parse_dockerfile()
    uid = dockerfile.args(dockerfile.stage("serve"))["APP_UID"]
    assert (
        pod["securityContext"]["runAsUser"] == int(uid) and pod["securityContext"]["runAsNonRoot"]
    )
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    annotations = _k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])


def test_pod_settings_are_valid_and_the_grace_period_covers_the_drain() -> None:
    container = _container()
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        env |= _k8s("ConfigMap", source["configMapRef"]["name"])["data"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    # Secrets stay out of git; stand-in values of the documented shape.
    env |= {
        "CTR_REDIS_URL": "redis://:pw@redis-cluster:6379",
        "CTR_INGEST_API_KEYS": "k1,k2",
        "CTR_ADMIN_API_KEYS": "k3",
    }
    assert set(secrets) <= set(env)
    settings = ctr_settings(env)
    assert settings.redis_cluster and settings.require_gpu and settings.models == []
    assert settings.port == container["ports"][0]["containerPort"]
    grace = _k8s("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > worst_case_shutdown_s(settings)
    docs = (ROOT / "docs/deploy.md").read_text()
    for ref in secrets.values():  # how to create each Secret is written down
        assert ref["name"] in docs and f"--from-literal={ref['key']}=" in docs, ref
    assert not any(d["kind"] == "Secret" for _, d in _k8s_documents())
