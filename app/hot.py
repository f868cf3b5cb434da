"""The two hot routes, POST /v1/recommend and /v1/feedback, without FastAPI's per-request
machinery; their definitions (and OpenAPI) stay in app/routes.

Why: py-spy on a loaded worker (1M bundle, 2 workers, 150 users) put ~45% of its event
loop's time in routing, dependency solving, content-type parsing, body decoding and the
middleware and exception layers around these two endpoints, against ~18% in the endpoints
themselves; the loop took ~2 ms of CPU per feed + feedback pair.

What: a request to a hot route whose body is JSON that validates is parsed by orjson,
validated by the route's own pydantic model in the same (python) mode FastAPI uses, and
handed to the route's own endpoint function with the same dependencies; an exception it
raises goes to the app's registered exception handler, as under FastAPI. Anything else — a
body that does not parse or validate, another content type, an app with dependency
overrides (tests) — is replayed to FastAPI unchanged, so every error response is FastAPI's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable

import orjson
from fastapi import APIRouter
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from app.guard import read_body, replay_body

Endpoint = Callable[[Request, BaseModel], Awaitable[Response]]


@dataclass(frozen=True)
class HotRoute:
    path: str
    model: type[BaseModel]  # the body model FastAPI validates against
    call: Endpoint  # resolves the endpoint's dependencies and calls it
    router: APIRouter  # where the route is defined: its route object names it in metrics and errors
    route: object = field(init=False)

    def __post_init__(self):
        # A hot path with no FastAPI route behind it fails here, when the app is created.
        route = next((r for r in self.router.routes if getattr(r, "path", None) == self.path and "POST" in getattr(r, "methods", ())), None)
        if route is None:
            raise ValueError(f"no POST route {self.path} in the router")
        object.__setattr__(self, "route", route)


def _json_content_type(headers) -> bool:
    for k, v in headers:
        if k == b"content-type":
            media = v.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))
    return False


class HotRoutes:
    """Pure ASGI middleware, inside the admission guard (body limit, load shedding)."""

    def __init__(self, app, routes: list[HotRoute]):
        self.app = app
        self.routes = {r.path: r for r in routes}

    async def __call__(self, scope, receive, send):
        hot = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        fastapi_app = scope.get("app")
        if hot is None or getattr(fastapi_app, "dependency_overrides", None):
            return await self.app(scope, receive, send)
        body, disconnected = await read_body(receive)
        if disconnected:  # before the body arrived: nobody to answer
            return
        try:
            if not _json_content_type(scope["headers"]):
                raise ValueError("not JSON")
            req = hot.model.model_validate(orjson.loads(body))
        except Exception:  # FastAPI answers it (400/422 naming the field), exactly as before
            return await self.app(scope, replay_body(body, receive), send)
        # The matched route, as Starlette's router would set it (errors are counted by its name).
        scope["route"] = hot.route
        request = Request(scope, receive)
        try:
            response = await hot.call(request, req)
        except Exception as exc:
            handler = _handler_for(fastapi_app, exc)
            if handler is None:
                raise  # the server error middleware answers 500, as for any route
            response = await handler(request, exc)
        await response(scope, receive, send)


def _handler_for(app, exc: Exception):
    handlers = getattr(app, "exception_handlers", {})
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
