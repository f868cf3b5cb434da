"""Admin API (DESIGN.md "HTTP interface"): fusion parameters and the online tuner.

Every route needs `Authorization: Bearer <FUNNEL_ADMIN_TOKEN>` (compared in constant time);
with no token configured the admin API answers 403, a missing or wrong token 401.
Changes are recorded in the tuner history with who made them: the `X-Admin-User` header
when given, else "admin@<client address>".

- GET  /admin/fusion?scene=home      parameters served outside the experiment, bounds, source
- PUT  /admin/fusion                 {scene?, params: {task: {alpha?, beta?}}, note?}; outside
                                     the bounds → 422 naming the parameter; on the tuned scene
                                     the tuner's mean is reset to the new weights
- GET  /admin/tuner                  config, state (mean, σ, round, baseline), live bucket stats
- PUT  /admin/tuner                  partial config, e.g. {"enabled": true, "algo": "es"}
- GET  /admin/tuner/history?limit=&before=&kind=   closed rounds and manual changes, newest first
"""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.deps import PipelineDep, StateDep
from app.errors import FieldError
from app.schemas import ADMIN_RESPONSES
from fusion.service import ParamsError

async def forbid_unknown_query(request: Request) -> None:
    """Admin routes refuse query parameters they do not declare (422 naming the first)."""
    if request.query_params:
        route = request.scope.get("route")
        known = {p.alias for p in getattr(getattr(route, "dependant", None), "query_params", [])}
        for k in request.query_params:
            if k not in known:
                raise FieldError(("query", k), "unknown query parameter")


router = APIRouter(prefix="/admin", tags=["admin"], responses=ADMIN_RESPONSES, dependencies=[Depends(forbid_unknown_query)])


_bearer = HTTPBearer(auto_error=False, description="FUNNEL_ADMIN_TOKEN")


def require_admin(request: Request, state: StateDep, _doc: Annotated[object, Depends(_bearer)] = None) -> str:
    """The caller's name for the history, once the bearer token checks out. (`_doc` only
    declares the bearer scheme in the OpenAPI schema; the header is checked here.)"""
    token = state.settings.admin_secret()
    if not token:
        raise FieldError(("header", "authorization"), "admin API disabled: no FUNNEL_ADMIN_TOKEN configured", status=403, type_="forbidden")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Constant time, and over fixed-length digests so not even the token's length leaks. The
    # token is never logged or echoed (Settings keeps it as a SecretStr).
    given_d = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given_d, hashlib.sha256(token.encode()).digest()):
        raise FieldError(("header", "authorization"), "missing or wrong bearer token", status=401, type_="unauthorized")
    who = request.headers.get("x-admin-user", "").strip()[:128]
    return who or f"admin@{request.client.host if request.client else 'unknown'}"


AdminDep = Annotated[str, Depends(require_admin)]
Scene = Annotated[str, Query(min_length=1, max_length=64)]


class WeightPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float | None = None
    beta: float | None = None


class FusionPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scene: str = Field("home", min_length=1, max_length=64)
    params: dict[str, WeightPatch] = Field(min_length=1)
    note: str | None = Field(None, max_length=1000)


def _fusion_view(state, scene: str) -> dict:
    svc = state.fusion
    params, meta = svc.served_params(scene)
    return {
        "scene": scene,
        "params": {t: {"alpha": a, "beta": b} for t, (a, b) in params.items()},
        "bounds": svc.bounds.to_dict(svc.schema),
        "prior": {t: {"alpha": a, "beta": b} for t, (a, b) in svc.prior.items()},
        **{k: v for k, v in meta.items() if k != "version"},
    }


@router.get("/fusion")
async def get_fusion(state: StateDep, pipeline: PipelineDep, who: AdminDep, scene: Scene = "home") -> dict:
    return await run_in_threadpool(_fusion_view, state, scene)


@router.put("/fusion")
async def put_fusion(body: FusionPut, state: StateDep, pipeline: PipelineDep, who: AdminDep) -> dict:
    patch = {t: w.model_dump(exclude_none=True) for t, w in body.params.items()}
    empty = [t for t, w in patch.items() if not w]
    if empty:
        raise FieldError(("body", "params", empty[0]), "give alpha and/or beta")
    try:
        entry = await run_in_threadpool(state.fusion.put_params, body.scene, patch, who, body.note)
    except ParamsError as e:
        raise RequestValidationError([{"loc": ("body", "params", *loc), "msg": msg, "type": "value_error"} for loc, msg in e.errors])
    return {**await run_in_threadpool(_fusion_view, state, body.scene), "recorded": {"who": who, "at": entry["at"]}}


@router.get("/tuner")
async def get_tuner(state: StateDep, pipeline: PipelineDep, who: AdminDep) -> dict:
    out = await run_in_threadpool(state.fusion.tuner.live)
    out["worker"] = {"pid": os.getpid(), "id": state.fusion.owner}
    return out


@router.put("/tuner")
async def put_tuner(state: StateDep, pipeline: PipelineDep, who: AdminDep, body: Annotated[dict, Body()]) -> dict:
    try:
        await run_in_threadpool(state.fusion.tuner.update_config, body, who)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            loc = tuple(err.get("loc", ()))
            msg = err.get("msg", "invalid")
            if not loc:  # model-level check: name the fields it is about
                loc = ("config",)
            errors.append({"loc": ("body", *loc), "msg": msg, "type": err.get("type", "value_error")})
        raise RequestValidationError(errors)
    except ValueError as e:
        field = str(e).split(":", 1)[0] if ":" in str(e) else "config"
        raise FieldError(("body", field), str(e))
    state.fusion.invalidate()
    out = await run_in_threadpool(state.fusion.tuner.live)
    out["worker"] = {"pid": os.getpid(), "id": state.fusion.owner}
    return out


@router.get("/tuner/history")
async def tuner_history(
    state: StateDep, pipeline: PipelineDep, who: AdminDep, scene: Scene = "home",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100, before: Annotated[int | None, Query(ge=1)] = None,
    kind: Annotated[str | None, Query(pattern="^(round|manual|config|reinit)$")] = None,
) -> dict:
    entries = await run_in_threadpool(state.store.history, scene, limit, before, kind)
    return {"scene": scene, "entries": entries, "next_before": entries[-1]["seq"] if len(entries) == limit else None}
