from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep):
    if state.pipeline is None:
        return JSONResponse({"status": "not ready", "reason": state.load_error or "loading bundle"}, status_code=503)
    return {"status": "ready", "bundle_version": state.pipeline.bundle.version}


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    # Scrape-time collectors read the state store: off the event loop.
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
