"""`POST /v1/score` handed straight to its endpoint (`service.http.routes.score`).

Every other request goes down the whole stack: Starlette's exception middleware, FastAPI's
exit-stack middleware, the router matching the path against every route, and FastAPI's
request handler. For the scoring route all of that does nothing the endpoint needs (it takes
no dependencies and decodes its own body: `service.http.score_input`), and it runs on the one
thread every request shares: past it, a request reached its endpoint 0.1–0.35 ms sooner at
concurrency 1 and the saturated service answered more per second (docs/performance.md "Third
pass").

What the stack did for the route is done here as well: the scope names the matched route (the
access log, the request-duration metric and the traces read it), and an exception the endpoint
raises is answered by the handler the app registered for its class, as Starlette's exception
middleware would. The FastAPI route stays declared: it is the OpenAPI operation, and other
methods on the path still get their 405 from the router.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.http.routes import router, score

SCORE_PATH = "/v1/score"


def is_score(scope: Scope) -> bool:
    return scope["path"] == SCORE_PATH and scope["method"] == "POST"


def score_route() -> Route:
    """The scoring route as `service.http.routes` declares it (the app includes that router
    as it is, with no prefix): what the router would have matched."""
    for route in router.routes:
        if isinstance(route, Route) and route.path == SCORE_PATH and route.endpoint is score:
            return route
    raise LookupError(f"service.http.routes declares no {SCORE_PATH} route")


async def serve_score(route: Route, scope: Scope, receive: Receive, send: Send) -> None:
    """Answers a `POST /v1/score` (`is_score`) through `route` (`score_route`), without the
    router."""
    app = scope["app"]
    scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, {}
    request = Request(scope, receive)
    try:
        response = await score(request)
    except Exception as exc:
        handler = _handler(app.exception_handlers, exc)
        if handler is None:
            raise
        response = await handler(request, exc)
    await response(scope, receive, send)


def _handler(handlers: dict[Any, Any], exc: Exception) -> Any:
    """The handler registered for the nearest class of `exc`, as Starlette looks it up."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
