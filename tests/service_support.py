"""Shared helpers of the service scoring tests: the app factory over the session's tiny model
repository, the loader reference, an in-process HTTP client with the app's lifespan running,
the app under a real uvicorn server on a real socket, and a gate that holds a model's real
`run()` so a test controls what runs and what queues."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from runtime.loader import LoadedModel, ScoringRequest, open_model
from runtime.repository import latest_version, model_dir
from service.http.api import build_app
from service.http.protocol import scoring_protocol
from service.processes import free_port
from service.settings import Settings
from service.store.embedded_redis import RedisServer

AppFactory = Callable[..., FastAPI]
T = TypeVar("T")
HISTORY = [(f"i{k}", f"c{k % 8}") for k in range(14)] + [("never-seen", "c-unknown")]
CANDIDATES = [("i3", "c3"), ("i40", "c0"), ("nope", "c1"), ("i7", "c7")]


@pytest.fixture
def make_app(service_model_repo: Path, redis_server: RedisServer) -> AppFactory:
    def factory(**overrides: Any) -> FastAPI:
        values = {
            "repo": service_model_repo,
            "redis_url": redis_server.url,
            "default_model": "sarn",
            "request_timeout_ms": 5000.0,
            # A shared CI box can hold a Redis reply for more than the production 30 ms; tests
            # about the timeout set their own.
            "redis_read_timeout_ms": 1000.0,
            **overrides,
        }
        return build_app(Settings(**values))

    return factory


@pytest.fixture(scope="module")
def reference(service_model_repo: Path) -> Callable[[str], LoadedModel]:
    cache: dict[str, LoadedModel] = {}

    def get(name: str) -> LoadedModel:
        if name not in cache:
            version = latest_version(service_model_repo, name)
            cache[name] = open_model(model_dir(service_model_repo, name, version))
        return cache[name]

    return get


def expected_scores(
    model: LoadedModel,
    history: list[tuple[str, str]],
    cands: list[tuple[str, str]],
    user: str = "u1",
) -> list[float]:
    (scores,) = model.score([ScoringRequest(user, history, cands)])  # [K, O]
    return [float(s) for s in scores[:, 0]]  # column 0: pCTR


def expected_outputs(
    model: LoadedModel,
    history: list[tuple[str, str]],
    cands: list[tuple[str, str]],
    user: str = "u1",
) -> dict[str, list[float]]:
    """Every output of the loader, by name: what a `/v1/score` body carries under that key."""
    (scores,) = model.score([ScoringRequest(user, history, cands)])  # [K, O]
    return {name: [float(s) for s in scores[:, j]] for j, name in enumerate(model.output_names)}


def score_body(user: str = "u1", cands: list[tuple[str, str]] = CANDIDATES, **extra: Any) -> Any:
    candidates = [{"item_id": i, "category_id": c} for i, c in cands]
    return {"user_id": user, "candidates": candidates, **extra}


def events_body(user: str, history: list[tuple[str, str]]) -> Any:
    events = [
        {"user_id": user, "item_id": i, "category_id": c, "ts": 1000 + k, "event_id": f"{user}-{k}"}
        for k, (i, c) in enumerate(history)
    ]
    return {"events": events}


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            yield client


def uvicorn_server(app: FastAPI, protocol: bool = True) -> uvicorn.Server:
    """A uvicorn server for `app` on a free local port (`server.config.port`), with the
    service's HTTP protocol as `ctr serve` runs it (or uvicorn's own, `protocol=False`)."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free_port(),
        http=scoring_protocol(app) if protocol else "auto",
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    return uvicorn.Server(config)


@contextlib.contextmanager
def served(app: FastAPI) -> Iterator[httpx.Client]:
    """`app` under `uvicorn_server`, its loop on a thread of its own; a client for it. The
    server stops on exit, its lifespan's shutdown included."""
    server = uvicorn_server(app)  # off the main thread it leaves the signals alone
    config = server.config
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{config.port}") as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(30)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def run_value(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Gate:
    """Wraps a loaded model's real `run()`: counts calls and holds them until opened."""

    def __init__(self, model: LoadedModel) -> None:
        self.calls = 0
        self.opened = threading.Event()
        self.entered = threading.Event()
        self._run = model.run
        model.run = self.run  # type: ignore[method-assign]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        self.opened.wait(10)
        return self._run(feeds)


def hold(app: FastAPI, name: str = "sarn") -> Gate:
    gate = Gate(app.state.engine.registry.models[name])
    gate.opened.clear()
    return gate


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)
