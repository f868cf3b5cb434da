from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "No bundle loaded yet, or it failed to load (`reason`)"}})
async def readyz(state: StateDep):
    if state.pipeline is None:
        return JSONResponse({"status": "not ready", "reason": state.load_error or "loading bundle"}, status_code=503)
    return {"status": "ready", "bundle_version": state.pipeline.bundle.version}


@router.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
async def metrics(state: StateDep) -> Response:
    # Scrape-time collectors read the state store: off the event loop.
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
