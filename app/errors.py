"""Error responses: every 4xx names the field it is about."""
from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class FieldError(Exception):
    def __init__(self, loc: tuple, msg: str, status: int = 422, type_: str = "value_error"):
        self.loc, self.msg, self.status, self.type = loc, msg, status, type_


def _loc_str(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _count(request: Request, status: int, kind: str) -> None:
    """funnel_requests_total{endpoint, status} and funnel_errors_total{kind}."""
    state = getattr(request.app.state, "funnel", None)
    if state is None:
        return
    route = request.scope.get("route")
    endpoint = getattr(route, "name", None) or request.url.path
    state.metrics.requests.labels(endpoint, str(status)).inc()
    state.metrics.errors.labels(kind).inc()


def _body(errors: list[dict]) -> dict:
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    return {"detail": detail, "message": "; ".join(f"{_loc_str(e['loc'])}: {e['msg']}" for e in detail)}


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors, status = [], 422
    for e in exc.errors():
        loc = tuple(e.get("loc", ("body",)))
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            loc, msg = ("body",), f"malformed JSON ({e.get('ctx', {}).get('error', 'decode error')})"
            status = 400
        errors.append({"loc": loc, "msg": msg, "type": e.get("type", "value_error")})
    _count(request, status, "malformed_json" if status == 400 else "validation")
    return JSONResponse(_body(errors), status_code=status)


async def field_error_handler(request: Request, exc: FieldError) -> JSONResponse:
    _count(request, exc.status, exc.type)
    return JSONResponse(_body([{"loc": exc.loc, "msg": exc.msg, "type": exc.type}]), status_code=exc.status)


async def store_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    """The state store is down and this route has no fallback (admin): 503, retry later."""
    state = getattr(request.app.state, "funnel", None)
    _count(request, 503, "store_unavailable")
    retry = str(state.settings.retry_after_s if state else 1)
    body = _body([{"loc": ("store",), "msg": f"{exc}; retry later", "type": "store_unavailable"}])
    return JSONResponse(body, status_code=503, headers={"retry-after": retry})


async def spool_full_handler(request: Request, exc: Exception) -> JSONResponse:
    """The store is down and the local spool is full: feedback is not acknowledged (503)."""
    state = getattr(request.app.state, "funnel", None)
    _count(request, 503, "spool_full")
    retry = str(state.settings.retry_after_s if state else 1)
    body = _body([{"loc": ("store",), "msg": f"state store unavailable and the local spool is full ({exc}); retry later", "type": "spool_full"}])
    return JSONResponse(body, status_code=503, headers={"retry-after": retry})


async def http_exception_handler(request: Request, exc) -> JSONResponse:
    """Starlette/FastAPI HTTP errors (unparseable body, unknown route, wrong method) in the
    same shape as every other error."""
    status = exc.status_code
    loc = {404: ("path",), 405: ("method",)}.get(status, ("body",))
    _count(request, status, "http_error")
    return JSONResponse(_body([{"loc": loc, "msg": str(exc.detail), "type": "http_error"}]), status_code=status,
                        headers=getattr(exc, "headers", None))
