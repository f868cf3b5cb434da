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
    return JSONResponse(_body(errors), status_code=status)


async def field_error_handler(request: Request, exc: FieldError) -> JSONResponse:
    return JSONResponse(_body([{"loc": exc.loc, "msg": exc.msg, "type": exc.type}]), status_code=exc.status)
