"""The routes' dependencies: the engine and the settings the app was built with."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.contracts import Engine
from service.settings import Settings


# `async def`, though they await nothing: FastAPI runs a plain `def` dependency in its thread
# pool, two hops per request that cost 0.5 ms and, in a burst, queued requests behind the
# pool's 40 threads before the handler (and the deadline's clock) even started.
async def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


EngineDep = Annotated[Engine, Depends(_engine)]
SettingsDep = Annotated[Settings, Depends(_settings)]
