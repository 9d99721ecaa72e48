"""HTTP API without a model: validation, limits, auth, ingestion, history, health, metrics.

The app runs under a real uvicorn server with the service's HTTP protocol (in this process, on
a thread: `service_support.served`) against a real redis-server, and the tests talk to it over
a socket; the model repository is empty, so the service is live but not ready, as a service
whose models failed.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_support import served

from service.http.api import build_app
from service.settings import Settings
from service.store.embedded_redis import RedisServer

INGEST, ADMIN = "ingest-key-1", "admin-key"


@pytest.fixture
def client(redis_server: RedisServer, tmp_path: Path) -> Iterator[httpx.Client]:
    settings = Settings(
        repo=tmp_path / "empty-repo",
        redis_url=redis_server.url,
        ingest_api_keys=[INGEST, "ingest-key-2"],  # type: ignore[list-item]
        admin_api_keys=[ADMIN],  # type: ignore[list-item]
        max_candidates=50,
        max_inline_history=20,
        max_events=5,
        max_body_bytes=4096,
    )
    with served(build_app(settings)) as http_client:
        yield http_client


def _event(k: int, user: str = "u1", **extra: Any) -> dict[str, Any]:
    return {
        "user_id": user,
        "item_id": f"i{k}",
        "category_id": "c1",
        "ts": 1000 + k,
        "event_id": f"e{k}",
        **extra,
    }


def _post_events(
    client: httpx.Client, events: list[dict[str, Any]], key: str | None = INGEST
) -> Any:
    headers = {"X-API-Key": key} if key else {}
    return client.post("/v1/events", json={"events": events}, headers=headers)


def _assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert body["request_id"] == response.headers["X-Request-ID"]
    return dict(body)


def test_liveness_is_up_and_readiness_says_why_not(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not_ready", "reasons": ["default model not loaded"]}
    assert "\nctr_ready 0.0\n" in client.get("/metrics").text  # what an alert sees


def test_scoring_without_a_model_is_a_503_not_a_crash(client: httpx.Client) -> None:
    body = {"user_id": "u1", "candidates": [{"item_id": "i1", "category_id": "c1"}]}
    response = client.post("/v1/score", json=body)
    _assert_error(response, 503, "model_unavailable")
    assert "Retry-After" in response.headers


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"user_id": "u1", "candidates": []}, ["body", "candidates"]),
        (
            {"user_id": "u 1", "candidates": [{"item_id": "i", "category_id": "c"}]},
            ["body", "user_id"],
        ),
        (
            {"user_id": "u1", "candidates": [{"item_id": "i", "category_id": "c", "x": 1}]},
            ["body", "candidates", 0, "x"],
        ),
        (
            {"user_id": "u1", "candidates": [{"item_id": "i", "category_id": "c"}], "extra": 1},
            ["body", "extra"],
        ),
        ({"user_id": 5, "candidates": [{"item_id": "i", "category_id": "c"}]}, ["body", "user_id"]),
        (
            {
                "user_id": "u1",
                "candidates": [{"item_id": "i", "category_id": "c"}],
                "model": "../etc",
            },
            ["body", "model"],
        ),
        (
            {"user_id": "u1", "candidates": [{"item_id": "i" * 65, "category_id": "c"}]},
            ["body", "candidates", 0, "item_id"],
        ),
    ],
)
def test_malformed_score_requests_get_422_with_the_location(
    client: httpx.Client, body: dict[str, Any], where: list[Any]
) -> None:
    response = client.post("/v1/score", json=body)
    details = _assert_error(response, 422, "invalid_request")["error"]["details"]
    assert where in [d["loc"] for d in details]
    assert '"input"' not in response.text  # the submitted values are not echoed back
    assert client.get("/healthz").status_code == 200


def test_a_timeout_header_that_is_not_a_finite_number_says_so(client: httpx.Client) -> None:
    body = {"user_id": "u1", "candidates": [{"item_id": "i1", "category_id": "c1"}]}
    response = client.post("/v1/score", json=body, headers={"X-Request-Timeout-Ms": "nan"})
    (detail,) = _assert_error(response, 422, "invalid_request")["error"]["details"]
    assert detail["loc"] == ["header", "x-request-timeout-ms"]
    assert "finite number" in detail["msg"]


def test_configured_limits_give_422(client: httpx.Client) -> None:
    candidates = [{"item_id": f"i{k}", "category_id": "c"} for k in range(51)]
    over = client.post("/v1/score", json={"user_id": "u1", "candidates": candidates})
    assert _assert_error(over, 422, "invalid_request")["error"]["details"][0]["loc"] == [
        "body",
        "candidates",
    ]
    history = [{"item_id": "h", "category_id": "c"}] * 21
    body = {"user_id": "u1", "candidates": candidates[:1], "history": history}
    _assert_error(client.post("/v1/score", json=body), 422, "invalid_request")
    _assert_error(_post_events(client, [_event(k) for k in range(6)]), 422, "invalid_request")


def test_oversized_and_broken_bodies_get_4xx(client: httpx.Client) -> None:
    big = json.dumps({"user_id": "u1", "candidates": [], "pad": "x" * 5000}).encode()
    headers = {"content-type": "application/json"}
    _assert_error(client.post("/v1/score", content=big, headers=headers), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield from (b" " * 1000 for _ in range(6))

    _assert_error(
        client.post("/v1/score", content=chunks(), headers=headers), 413, "payload_too_large"
    )
    _assert_error(
        client.post("/v1/score", content=b"{not json", headers=headers), 422, "invalid_request"
    )
    deep = b"[" * 2000 + b"]" * 2000  # within the byte limit, deeper than the JSON parser allows
    _assert_error(client.post("/v1/score", content=deep, headers=headers), 400, "bad_request")
    _assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    _assert_error(client.put("/v1/score"), 405, "method_not_allowed")
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("content", "content_type", "status", "where"),
    [
        # What FastAPI's own body parameter answered, kept by the hand-decoded scoring body.
        (b'{"user_id": "u1",', "application/json", 422, ["body", 17]),  # offset of the end
        (b'{"user_id": "u1"}', "text/plain", 422, ["body"]),
        (b'{"user_id": "u1"}', None, 422, ["body"]),
        (b"", "application/json", 422, ["body"]),
        (b'{"user_id": "\xff"}', "application/json", 400, None),  # not UTF-8
        (b"[" * 300 + b"]" * 300, "application/json", 422, ["body"]),  # deep, but decodable
    ],
)
def test_scoring_bodies_that_are_not_a_request_say_where(
    client: httpx.Client, content: bytes, content_type: str | None, status: int, where: Any
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post("/v1/score", content=content, headers=headers)
    error = _assert_error(response, status, "invalid_request" if status == 422 else "bad_request")
    if where is not None:
        assert [d["loc"] for d in error["error"]["details"]] == [where]


def test_a_bad_timeout_header_and_a_bad_body_are_reported_together(client: httpx.Client) -> None:
    body = {"user_id": "u 1", "candidates": [{"item_id": "i1", "category_id": "c1"}]}
    response = client.post("/v1/score", json=body, headers={"X-Request-Timeout-Ms": "nan"})
    details = _assert_error(response, 422, "invalid_request")["error"]["details"]
    assert [d["loc"] for d in details] == [["header", "x-request-timeout-ms"], ["body", "user_id"]]
    broken = client.post(  # not JSON at all: that alone, as it fails before any validation
        "/v1/score",
        content=b"{not json",
        headers={"content-type": "application/json", "X-Request-Timeout-Ms": "nan"},
    )
    assert [
        d["type"] for d in _assert_error(broken, 422, "invalid_request")["error"]["details"]
    ] == ["json_invalid"]


def test_json_media_types_with_parameters_or_suffixes_are_json(client: httpx.Client) -> None:
    body = json.dumps({"user_id": "u1", "candidates": [{"item_id": "i", "category_id": "c"}]})
    for media in ("application/json; charset=utf-8", "application/vnd.score+json"):
        answer = client.post("/v1/score", content=body, headers={"content-type": media})
        _assert_error(answer, 503, "model_unavailable")  # decoded and valid; no model loaded


def test_event_timestamps_are_checked(client: httpx.Client) -> None:
    bad = [_event(1, ts=True), _event(1, ts=-1), _event(1, ts=4e9), _event(1, ts="soon")]
    for event in bad:
        _assert_error(_post_events(client, [event]), 422, "invalid_request")


def test_ingest_requires_an_ingest_key(client: httpx.Client) -> None:
    _assert_error(_post_events(client, [_event(1)], key=None), 401, "unauthorized")
    _assert_error(_post_events(client, [_event(1)], key="wrong"), 403, "forbidden")
    _assert_error(_post_events(client, [_event(1)], key=ADMIN), 403, "forbidden")  # other scope
    assert _post_events(client, [_event(1)], key="ingest-key-2").status_code == 202  # rotation


def test_history_endpoints_require_the_admin_key(client: httpx.Client) -> None:
    _assert_error(client.get("/v1/users/u1/history"), 401, "unauthorized")
    _assert_error(
        client.get("/v1/users/u1/history", headers={"X-API-Key": INGEST}), 403, "forbidden"
    )
    _assert_error(
        client.delete("/v1/users/u1/history", headers={"X-API-Key": "x"}), 403, "forbidden"
    )


def test_events_are_idempotent_and_history_round_trips(client: httpx.Client) -> None:
    first = _post_events(client, [_event(2), _event(1), _event(3)])
    assert first.status_code == 202
    assert first.json() == {"accepted": 3, "duplicates": 0, "ignored": 0}
    assert _post_events(client, [_event(3), _event(4)]).json() == {
        "accepted": 1,
        "duplicates": 1,
        "ignored": 0,
    }
    admin = {"X-API-Key": ADMIN}
    history = client.get("/v1/users/u1/history", headers=admin).json()
    assert history["user_id"] == "u1"
    assert [h["item_id"] for h in history["items"]] == ["i1", "i2", "i3", "i4"]  # oldest first
    assert history["items"][0] == {"item_id": "i1", "category_id": "c1", "ts": 1001.0}
    assert client.delete("/v1/users/u1/history", headers=admin).status_code == 204
    assert client.get("/v1/users/u1/history", headers=admin).json()["items"] == []
    _assert_error(client.get("/v1/users/bad%20id/history", headers=admin), 422, "invalid_request")


def test_only_click_events_join_the_history(client: httpx.Client) -> None:
    """The models were trained on click histories: a conversion sent to the same endpoint
    must not show up as a second click of the item."""
    types: list[dict[str, Any]] = [{}, {"type": "click"}, {"type": "conversion"}, {"type": "view"}]
    events = [_event(k + 1, user="t1", **extra) for k, extra in enumerate(types)]
    assert _post_events(client, events).json() == {"accepted": 2, "duplicates": 0, "ignored": 2}
    history = client.get("/v1/users/t1/history", headers={"X-API-Key": ADMIN}).json()
    assert [h["item_id"] for h in history["items"]] == ["i1", "i2"]
    only = _post_events(client, [_event(5, user="t2", type="purchase")])
    assert (only.status_code, only.json()) == (202, {"accepted": 0, "duplicates": 0, "ignored": 1})
    assert 'ctr_events_total{outcome="ignored"} 3.0' in client.get("/metrics").text


def test_ingest_answers_503_while_redis_is_down(
    client: httpx.Client, redis_server: RedisServer
) -> None:
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        response = _post_events(client, [_event(1)])
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    _assert_error(response, 503, "store_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert _post_events(client, [_event(1)]).status_code == 202  # and recovers
    assert client.get("/readyz").json()["reasons"] == ["default model not loaded"]  # not Redis


def test_request_id_is_echoed_or_generated(client: httpx.Client) -> None:
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    unsafe = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["X-Request-ID"] != "bad id\twith spaces"
    assert len(unsafe.headers["X-Request-ID"]) == 32


def test_metrics_carry_histograms_with_route_templates(client: httpx.Client) -> None:
    _post_events(client, [_event(1)])
    client.get("/v1/users/u1/history", headers={"X-API-Key": ADMIN})
    text = client.get("/metrics").text
    assert "# TYPE ctr_request_duration_seconds histogram" in text
    assert 'ctr_request_duration_seconds_bucket{endpoint="/v1/users/{user_id}/history"' in text
    assert 'endpoint="/v1/events",le="0.01",model="",status="202",variant=""' in text
    assert 'ctr_store_duration_seconds_count{operation="ingest",outcome="ok"} 1.0' in text
    assert 'ctr_events_total{outcome="accepted"} 1.0' in text
    assert "u1" not in text  # no user ids in labels
    listing = client.get("/v1/models").json()
    assert (listing["default_model"], listing["models"]) == (None, [])
    assert listing["routing"]["experiments"] == []


def test_openapi_shows_the_limits(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    score = schema["components"]["schemas"]["ScoreRequest"]
    assert score["additionalProperties"] is False
    assert score["properties"]["candidates"]["minItems"] == 1
    assert "X-API-Key" in json.dumps(schema["components"]["securitySchemes"])


def test_the_openapi_limits_are_the_configured_ones_and_the_enforced_ones(
    client: httpx.Client,
) -> None:
    """The client fixture configures 50 candidates, 20 inline history items, 5 events: the
    document says so, N passes validation and N + 1 is refused."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    score, events = schemas["ScoreRequest"]["properties"], schemas["EventsRequest"]["properties"]
    history = next(b for b in score["history"]["anyOf"] if b.get("type") == "array")
    assert (score["candidates"]["maxItems"], history["maxItems"]) == (50, 20)
    assert events["events"]["maxItems"] == 5
    candidates = [{"item_id": f"i{k}", "category_id": "c"} for k in range(51)]
    inline = [{"item_id": "h", "category_id": "c"}] * 21
    at_limit = {"user_id": "u1", "candidates": candidates[:50], "history": inline[:20]}
    assert client.post("/v1/score", json=at_limit).status_code == 503  # valid; no model
    for over in ({"candidates": candidates}, {"history": inline}):
        _assert_error(client.post("/v1/score", json=at_limit | over), 422, "invalid_request")
    assert _post_events(client, [_event(k) for k in range(5)]).status_code == 202
    _assert_error(_post_events(client, [_event(k) for k in range(6)]), 422, "invalid_request")


def test_the_openapi_document_uses_json_schema_keywords(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    ts = document["components"]["schemas"]["EventIn"]["properties"]["ts"]
    assert (ts["minimum"], ts["maximum"]) == (0, 1e11) and not {"ge", "le"} & ts.keys()
    (header,) = document["paths"]["/v1/score"]["post"]["parameters"]
    assert header["name"] == "x-request-timeout-ms" and header["schema"]["type"] == "number"
    assert "anyOf" not in header["schema"]  # optional, but never null
    posts = [
        (path, operation["responses"])
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method == "post"
    ]
    assert all("413" in responses for _, responses in posts), posts
    assert all("400" in responses for path, responses in posts if "routing" not in path)


def test_the_document_refuses_what_the_service_refuses(client: httpx.Client) -> None:
    """Found by the API fuzz test: `patternProperties` alone let any other context key through
    in JSON Schema, and nothing told a client about the clock-skew bound of `ts`."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    context = schemas["ScoreRequest"]["properties"]["context"]
    assert context["additionalProperties"] is False and context["patternProperties"]
    body = {"user_id": "u1", "candidates": [{"item_id": "i1", "category_id": "c1"}]}
    answer = client.post("/v1/score", json={**body, "context": {"not a key": "x"}})
    _assert_error(answer, 422, "invalid_request")
    assert "CTR_EVENT_MAX_FUTURE_S" in schemas["EventIn"]["properties"]["ts"]["description"]
    assert "ts" in schemas["EventIn"]["required"]


def test_a_body_that_is_not_text_is_a_400(client: httpx.Client) -> None:
    answer = client.post(
        "/v1/score",
        content=b'{"user_id": "\xff\xfe"}',
        headers={"content-type": "application/json"},
    )
    _assert_error(answer, 400, "bad_request")


def test_a_wrong_method_names_every_allowed_one(client: httpx.Client) -> None:
    for method in ("OPTIONS", "PUT", "POST", "HEAD"):
        answer = client.request(method, "/v1/users/u1/history", headers={"X-API-Key": ADMIN})
        assert answer.status_code == 405
        assert set(answer.headers["allow"].split(", ")) == {"DELETE", "GET"}


@pytest.mark.parametrize("value", [" , ", ",", "   "])
def test_an_api_key_variable_set_to_blanks_refuses_to_start(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTR_ADMIN_API_KEYS", value)
    with pytest.raises(ValueError, match="CTR_ADMIN_API_KEYS is set but holds no key"):
        Settings()
    monkeypatch.setenv("CTR_ADMIN_API_KEYS", "")  # empty: the documented open scope
    assert Settings().admin_api_keys == []
