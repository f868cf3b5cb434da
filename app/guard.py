"""Admission control, as one pure ASGI middleware (no per-request task or body copy on the
common path):

- Body size: a request whose Content-Length exceeds `max_body_bytes` gets 413 before its
  body is read; a body without Content-Length (chunked) is read up to the limit and refused
  past it.
- Overload: at most `max_inflight` requests to /v1/* are handled at once by this worker
  (one process, one event loop: a plain counter). Past that a request is answered at once
  with 503 and `Retry-After`, instead of queueing in front of the compute thread until
  clients time out. Health, readiness, metrics and admin routes are not limited, so the
  orchestrator and the operator can always look in.

Every refusal has the error body of app/errors.py (`message` names what it is about).
"""
from __future__ import annotations

import orjson

LIMITED_PREFIX = "/v1/"


class GuardMiddleware:
    def __init__(self, app, max_body_bytes: int, max_inflight: int, retry_after_s: int = 1):
        self.app = app
        self.max_body = int(max_body_bytes)
        self.max_inflight = int(max_inflight)
        self.retry_after = str(int(retry_after_s)).encode()
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    return await _refuse(send, 400, "header.content-length", "not a number")
                break
        if length is not None and length > self.max_body:
            return await _refuse(send, 413, "body", f"request body of {length} bytes exceeds the limit of {self.max_body} bytes")
        limited = scope["path"].startswith(LIMITED_PREFIX)
        metrics = _metrics(scope)
        if limited and self.inflight >= self.max_inflight:
            if metrics is not None:
                endpoint = scope["path"].rsplit("/", 1)[-1]
                metrics.shed.labels(endpoint).inc()
                metrics.requests.labels(endpoint, "503").inc()
            return await _refuse(send, 503, "server", f"overloaded: {self.inflight} requests in flight (limit {self.max_inflight}); retry later",
                                 [(b"retry-after", self.retry_after)])
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # No Content-Length (chunked): read the body here, within the limit, and replay it.
            body, _ = await read_body(receive, self.max_body)
            if body is None:
                return await _refuse(send, 413, "body", f"request body exceeds the limit of {self.max_body} bytes")
            receive = replay_body(body, receive)
        if not limited:
            return await self.app(scope, receive, send)
        self.inflight += 1
        if metrics is not None:
            metrics.inflight.set(self.inflight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
            if metrics is not None:
                metrics.inflight.set(self.inflight)


def _metrics(scope):
    app = scope.get("app")
    state = getattr(getattr(app, "state", None), "funnel", None)
    return getattr(state, "metrics", None)


async def read_body(receive, limit: int | None = None) -> tuple[bytes | None, bool]:
    """The request body from an ASGI `receive`, and whether the client disconnected before its
    end (the body is then what arrived). Body None: it grew beyond `limit` bytes."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return b"".join(chunks), True
        size += len(msg.get("body", b""))
        if limit is not None and size > limit:
            return None, False
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks), False


def replay_body(body: bytes, receive):
    """An ASGI `receive` that hands over an already-read body once, then waits as usual."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: wait for the disconnect as usual

    return replay


async def _refuse(send, status: int, field: str, msg: str, headers: list | None = None) -> None:
    body = orjson.dumps({"detail": [{"loc": field.split("."), "msg": msg, "type": {413: "too_large", 503: "overloaded"}.get(status, "bad_request")}],
                         "message": f"{field}: {msg}"})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body})
