"""A/B routing: the routing file, stable assignment, the split, and the variant over real HTTP.

Assignment is checked against an independent implementation of the documented rule
(blake2b(salt NUL user) as a 64-bit fraction against cumulative weights), in two processes
whose PYTHONHASHSEED differ (shown to matter: their `hash()` of the same string differs), and
through two real `ctr serve` processes started with different seeds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from routing_support import (
    Server,
    ab_repo,
    ab_template,
    items,
    launch,
    sample,
    wait_ready,
)
from service_support import running

from service.contracts import ScoringRequest
from service.http.api import build_app
from service.routing import (
    ExperimentRouter,
    LoadedRouting,
    RoutingError,
    parse_routing,
    read_routing,
)
from service.settings import Settings
from service.shadow import average_ranks, spearman

__all__ = ["ab_repo", "ab_template"]  # fixtures used below

SPLIT = """
experiments:
  - name: ranker
    salt: ranker-2024
    variants:
      - {name: control, model: sarn, version: 1, weight: 70}
      - {name: treatment, model: sarn, version: 2, weight: 20}
      - {name: slate, model: ncm, weight: 10}
"""
WEIGHTS = {"control": 0.7, "treatment": 0.2, "slate": 0.1}
USERS = [f"user-{k}" for k in range(10_000)]
ASSIGN = """
import hashlib, json, sys
from service.contracts import ScoringRequest
from service.routing import ExperimentRouter, LoadedRouting, parse_routing
router = ExperimentRouter(LoadedRouting(parse_routing(sys.stdin.read(), ".yaml"), "", None), None)
variants = [router.route(ScoringRequest(f"user-{k}", None, [("i", "c")])).variant
            for k in range(10_000)]
print(json.dumps({"hash": hash("ranker-2024"), "variants": variants}))
"""


def _expected(salt: str, user: str, weights: dict[str, float]) -> str:
    """The documented rule, written out again independently of service.routing."""
    digest = hashlib.blake2b(f"{salt}\0{user}".encode(), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2.0**64
    edge = 0.0
    for name, weight in weights.items():
        edge += weight / sum(weights.values())
        if position < edge:
            return name
    return list(weights)[-1]


def _router(text: str, default: str | None = "sarn") -> ExperimentRouter:
    return ExperimentRouter(LoadedRouting(parse_routing(text, ".yaml"), "", None), default)


def _request(user: str, model: str | None = None, **context: str) -> ScoringRequest:
    return ScoringRequest(user, None, [("i1", "c1")], context, model=model)


def test_assignment_is_identical_across_hash_seeds_and_splits_by_weight() -> None:
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", ASSIGN],
            input=SPLIT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        runs.append(json.loads(done.stdout))
    assert runs[0]["hash"] != runs[1]["hash"]  # the seeds really change Python's hash()
    assert runs[0]["variants"] == runs[1]["variants"]
    assert runs[0]["variants"] == [_expected("ranker-2024", u, WEIGHTS) for u in USERS]
    counts = Counter(runs[0]["variants"])
    for variant, weight in WEIGHTS.items():
        assert abs(counts[variant] / len(USERS) - weight) <= 0.01, (variant, counts)


def test_pinned_model_bypasses_routing_and_match_picks_the_experiment() -> None:
    router = _router("""
experiments:
  - name: home-test
    match: {surface: home}
    variants:
      - {name: home-a, model: ncm, weight: 1}
      - {name: never, model: sarn, weight: 0}
  - name: everyone
    variants: [{name: rest, model: sarn, version: 1, weight: 1}]
""")
    home = router.route(_request("u1", surface="home"))
    assert (home.model, home.variant, home.experiment) == ("ncm", "home-a", "home-test")
    other = router.route(_request("u1", surface="search"))
    assert (other.model, other.version, other.variant) == ("sarn", 1, "rest")
    pinned = router.route(_request("u1", model="ncm", surface="home"))
    assert (pinned.model, pinned.variant, pinned.experiment) == ("ncm", "pinned", None)
    # Weight 0 gets nobody, over many users.
    assert {router.route(_request(f"u{k}", surface="home")).variant for k in range(500)} == {
        "home-a"
    }
    assert _router("experiments: []").route(_request("u1")).variant == "default"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("experiments: [{name: a, variants: [{name: x, model: sarn, weight: 0}]}]", "weights"),
        (
            "experiments: [{name: a, variants: [{name: default, model: sarn, weight: 1}]}]",
            "reserved",
        ),
        (
            "experiments: [{name: a, variants: [{name: x, model: sarn, weight: 1}]},"
            " {name: b, variants: [{name: x, model: ncm, weight: 1}]}]",
            "unique",
        ),
        ("experiments: [{name: a, variants: [{name: x, model: ../etc, weight: 1}]}]", "pattern"),
        (
            "experiments: [{name: a, variants: [{name: x, model: sarn, weight: 1, path: /m}]}]",
            "Extra inputs",
        ),
        (
            "experiments: [{name: a, variants: [{name: x, model: sarn, version: '2', weight: 1}]}]",
            "integer",
        ),
        (
            "experiments: [{name: a, variants: [{name: x, model: sarn, weight: 1,"
            " shadow: {model: ncm, fraction: 1.5}}]}]",
            "less than or equal",
        ),
        ("experiments: [", "does not parse: expected the node content"),
        ("experiments: [ {name: x", "(line 1, column 24)"),
    ],
)
def test_invalid_routing_files_are_refused_with_locations(text: str, fragment: str) -> None:
    with pytest.raises(RoutingError) as caught:
        parse_routing(text, ".yaml")
    # the message alone says where and why, on one line: it is all a refused start-up shows
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_routing_file_suffix_and_json(tmp_path: Path) -> None:
    json_file = tmp_path / "routing.json"
    json_file.write_text(
        json.dumps(
            {
                "experiments": [
                    {"name": "a", "variants": [{"name": "x", "model": "sarn", "weight": 1}]}
                ]
            }
        )
    )
    loaded = read_routing(json_file)
    assert loaded.config.experiments[0].variants[0].model == "sarn"
    assert loaded.sha256 == hashlib.sha256(json_file.read_bytes()).hexdigest()
    assert loaded.file == "routing.json"
    with pytest.raises(RoutingError, match="suffix"):
        read_routing(tmp_path / "routing.txt")
    with pytest.raises(RoutingError, match="cannot be read"):
        read_routing(tmp_path / "missing.yaml")


def test_the_kubernetes_routing_file_is_valid() -> None:
    """The ConfigMap's routing.yaml is what every replica reads at start: it must validate, and
    the settings must point at the file the Deployment mounts."""
    root = Path(__file__).resolve().parents[1]
    documents = list(yaml.safe_load_all((root / "deploy/k8s/configmap.yaml").read_text()))
    data = next(d for d in documents if d["metadata"]["name"] == "slatectr-routing")["data"]
    assert parse_routing(data["routing.yaml"], ".yaml").experiments == []
    deployment = yaml.safe_load((root / "deploy/k8s/deployment.yaml").read_text())
    mount = next(
        m
        for m in deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["name"] == "routing"
    )
    assert data["CTR_ROUTING_FILE"] == f"{mount['mountPath']}/routing.yaml"


def test_an_invalid_routing_file_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "routing.yaml"
    bad.write_text("experiments: [{name: a}]")
    app = build_app(Settings(repo=tmp_path, routing_file=bad))

    async def scenario() -> None:
        async with running(app):
            pass

    with pytest.raises(RoutingError, match=r"experiments\.0\.variants: Field required"):
        asyncio.run(scenario())


def test_spearman_with_ties_and_degenerate_slates() -> None:
    # Ranks [1,4,3,2] vs [2,1,4,3]: d = (-1,3,-1,-1), rho = 1 - 6*12 / (4*15) = -0.2.
    assert spearman(np.array([0.1, 0.4, 0.3, 0.2]), np.array([0.2, 0.1, 0.4, 0.3])) == (
        pytest.approx(-0.2)
    )
    # Ties share the mean rank: [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5).
    assert average_ranks(np.array([1.0, 2.0, 2.0, 3.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    tied = spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert tied == pytest.approx(3 / np.sqrt(10))
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman(np.array([0.5]), np.array([0.9])) is None  # K = 1: no ordering
    assert spearman(np.array([0.3, 0.3, 0.3]), np.array([0.1, 0.2, 0.3])) is None  # all tied
    assert spearman(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.6, 0.9])) == 1.0
    assert spearman(np.array([0.1, 0.2, 0.3]), np.array([0.9, 0.6, 0.5])) == -1.0


def _score_variants(server: Server, users: list[str]) -> list[tuple[str, str, str]]:
    with server.client() as client:
        answers = [
            client.post(
                "/v1/score",
                json={"user_id": user, "candidates": items([("i1", "c1"), ("i2", "c2")])},
            )
            for user in users
        ]
    assert all(a.status_code == 200 for a in answers)
    return [(a.json()["variant"], a.json()["model"], a.json()["version"]) for a in answers]


def test_two_servers_with_different_hash_seeds_route_users_alike(
    ab_repo: Path, tmp_path: Path
) -> None:
    routing = tmp_path / "routing.yaml"
    routing.write_text(SPLIT)
    servers = [
        launch(
            ab_repo,
            tmp_path / f"seed{seed}.log",
            CTR_ROUTING_FILE=str(routing),
            PYTHONHASHSEED=seed,
        )
        for seed in ("11", "22")
    ]
    try:
        for server in servers:
            wait_ready(server)
        users = USERS[:150]
        first, second = (_score_variants(server, users) for server in servers)
        with servers[0].client() as client:
            pinned = client.post(
                "/v1/score",
                json={"user_id": users[0], "candidates": items([("i1", "c1")]), "model": "ncm"},
            ).json()
            listed = client.get("/v1/models").json()
        metrics = servers[0].metrics()
    finally:
        for server in servers:
            server.stop()
    assert first == second
    models = {"control": ("sarn", "1"), "treatment": ("sarn", "2"), "slate": ("ncm", "1")}
    assert first == [(v, *models[v]) for v in (_expected("ranker-2024", u, WEIGHTS) for u in users)]
    assert (pinned["variant"], pinned["model"]) == ("pinned", "ncm")
    # The variant is a metric label bounded by the file, and it is in each access log line.
    variants = {
        dict(labels).get("variant")
        for (name, labels) in metrics
        if name == "ctr_request_duration_seconds_count"
    }
    assert variants <= {"control", "treatment", "slate", "pinned", ""}
    assert sample(metrics, "ctr_request_duration_seconds_count", endpoint="/v1/score") == 151
    lines = [json.loads(line) for line in servers[0].log.read_text().splitlines() if line.strip()]
    logged = [(x["variant"], x["experiment"]) for x in lines if x.get("endpoint") == "/v1/score"]
    assert logged[:150] == [(v, "ranker") for v, _, _ in first]
    assert listed["routing"]["experiments"][0]["name"] == "ranker"
    assert "salt" not in json.dumps(listed["routing"])
    sarn = next(m for m in listed["models"] if m["name"] == "sarn")
    assert [v["version"] for v in sarn["versions"]] == ["1", "2"]  # v1 pinned, v2 current
    assert sarn["version"] == "2"
