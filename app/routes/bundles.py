"""Admin: model bundles (bearer token like every admin route).

- GET  /admin/bundles          the loaded bundle and the versions available beside it (the
                               directories with a manifest.json in the bundles directory,
                               FUNNEL_BUNDLES_DIR, default the parent of FUNNEL_BUNDLE)
- POST /admin/bundles/reload   optional body {"version": "<directory name in the bundles dir>"}
                               or {"path": "<bundle directory inside the bundles dir>"}; neither: the configured
                               FUNNEL_BUNDLE again (e.g. after `bundles/current` was relinked).
                               The new bundle is validated in full (manifest, files, checksums,
                               shapes, ONNX signatures, faiss index) and warmed up through every
                               stage off the request path; only then is it swapped in, in one
                               reference assignment. Requests already running finish on the old
                               pipeline (each request resolved it once); the old bundle is freed
                               when the last of them ends. A bundle that fails is refused with the
                               reason (422; 404 for a version that does not exist; 409 while
                               another reload runs) and the old one keeps serving.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Body, Depends
from pydantic import BaseModel, ConfigDict, Field

from app.deps import StateDep
from app.errors import FieldError
from app.routes.admin import AdminDep, forbid_unknown_query
from app.schemas import ADMIN_RESPONSES
from core.bundle import MANIFEST, BundleError

router = APIRouter(prefix="/admin/bundles", tags=["admin"], responses={**ADMIN_RESPONSES, 404: ADMIN_RESPONSES[422], 409: ADMIN_RESPONSES[422]},
                   dependencies=[Depends(forbid_unknown_query)])


class ReloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: str | None = Field(None, min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str | None = Field(None, min_length=1, max_length=4096, pattern=r"^[^\x00]+$")


def _describe(path: Path) -> dict:
    out: dict = {"version": path.name, "path": str(path)}
    if path.is_symlink():
        out["link_to"] = str(path.resolve())
    try:
        m = json.loads((path / MANIFEST).read_text())
        out.update({"version": m.get("version", path.name), "dataset": m.get("dataset"), "created_at": m.get("created_at")})
    except (OSError, ValueError) as e:
        out["error"] = f"manifest unreadable: {type(e).__name__}"
    return out


def _listing(state) -> dict:
    root = state.settings.bundles_root()
    pipe = state.pipeline
    loaded = None
    if pipe is not None:
        b = pipe.bundle
        loaded = {"version": b.version, "path": str(b.path), "dataset": b.schema.dataset, "items": b.n_items,
                  "created_at": b.manifest.get("created_at"), "loaded_at": state.loaded_at}
    available = []
    try:
        for p in sorted(root.iterdir()):
            if p.is_dir() and (p / MANIFEST).exists():
                available.append(_describe(p))
    except OSError:
        pass
    return {"bundles_dir": str(root), "loaded": loaded, "load_error": state.load_error, "available": available}


@router.get("")
async def list_bundles(state: StateDep, who: AdminDep) -> dict:
    return await asyncio.get_running_loop().run_in_executor(None, _listing, state)


def _target(state, body: ReloadBody | None) -> tuple[Path, tuple]:
    if body is not None and body.version and body.path:
        raise FieldError(("body",), "give version or path, not both")
    if body is not None and body.version:
        root = state.settings.bundles_root()
        p = root / body.version
        if not (p / MANIFEST).exists():
            raise FieldError(("body", "version"), f"no bundle {body.version!r} in {root}", status=404, type_="not_found")
        return p, ("body", "version")
    if body is not None and body.path:
        p = Path(body.path)
        root = state.settings.bundles_root().resolve()
        if not p.resolve().is_relative_to(root):
            raise FieldError(("body", "path"), f"must be inside the bundles directory {root}")
        if not p.exists():
            raise FieldError(("body", "path"), f"no bundle at {body.path}", status=404, type_="not_found")
        return p, ("body", "path")
    return Path(state.settings.bundle), ("bundle",)


@router.post("/reload")
async def reload_bundle(state: StateDep, who: AdminDep, body: ReloadBody | None = Body(None)) -> dict:
    path, loc = _target(state, body)
    if not state.reload_lock.acquire(blocking=False):
        state.metrics.bundle_reloads.labels("busy").inc()
        raise FieldError(loc, "another bundle reload is running", status=409, type_="conflict")
    try:
        before = state.pipeline.bundle.version if state.pipeline is not None else None
        try:
            pipeline = await asyncio.get_running_loop().run_in_executor(None, state.prepare, path)
        except BundleError as e:
            state.metrics.bundle_reloads.labels("refused").inc()
            raise FieldError(loc, f"bundle refused, still serving {before}: {e}", status=422, type_="bundle_invalid")
        state.install(pipeline)
    finally:
        state.reload_lock.release()
    state.metrics.bundle_reloads.labels("ok").inc()
    b = pipeline.bundle
    return {"loaded": {"version": b.version, "path": str(b.path), "dataset": b.schema.dataset, "items": b.n_items}, "previous": before, "by": who}
