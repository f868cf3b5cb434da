from __future__ import annotations

import asyncio
import time
import uuid

import orjson
from fastapi import APIRouter, Response

from app.deps import PipelineDep, StateDep
from app.pipeline import Pipeline
from app.schemas import RecommendRequest, RecommendResponse
from app.state import AppState
from core.store import ServedRequest

router = APIRouter(tags=["recommend"])


class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _prepare(state: AppState, req: RecommendRequest):
    """Store reads (I/O threads: a SQLite read or a Redis round trip must not stall the loop)."""
    events = state.store.user_events(req.user_id, state.settings.history_limit)
    # The tuner's bucket for this user and round (or "main") and the fusion parameters it serves.
    assigned = state.fusion.assign(req.user_id, req.scene)
    return events, assigned


def _compute(state: AppState, pipeline: Pipeline, req: RecommendRequest, request_id: str, events, assigned):
    """The pipeline, on the worker's one compute thread."""
    ctx = pipeline.context(
        request_id=request_id,
        user_id=req.user_id,
        count=req.count,
        scene=req.scene,
        exclude_item_ids=req.exclude_item_ids,
        events=events,
        debug=req.debug,
        fusion=assigned.params,
        bucket=assigned.bucket,
    )
    cands, trace = pipeline.run(ctx)
    items = pipeline.describe(cands)
    state.metrics.observe_recall(ctx.trace_extra.get("recall_paths", {}))
    return ctx, cands, trace, items


@router.post("/v1/recommend", response_model=RecommendResponse, response_model_exclude_none=True, response_class=ORJSONResponse)
async def recommend(req: RecommendRequest, state: StateDep, pipeline: PipelineDep):
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    request_id = uuid.uuid4().hex
    events, assigned = await loop.run_in_executor(None, _prepare, state, req)
    ctx, cands, trace, items = await loop.run_in_executor(state.compute, _compute, state, pipeline, req, request_id, events, assigned)
    served = ServedRequest(request_id, req.user_id, ctx.bucket, {k: list(v) for k, v in ctx.fusion.items()}, [i["item_id"] for i in items],
                           ctx.now, round_id=assigned.round_id, scene=req.scene)
    # Logged before the response: feedback for this request may reach another worker at once.
    await loop.run_in_executor(None, state.store.log_served, served)
    elapsed = time.perf_counter() - t0
    state.metrics.request_seconds.labels("recommend").observe(elapsed)
    state.metrics.requests.labels("recommend", "200").inc()
    out = {"request_id": request_id, "bundle_version": pipeline.bundle.version, "bucket": ctx.bucket, "items": items}
    if req.debug:
        heads = {}
        if cands.heads is not None:
            heads = {t: cands.heads[:, k].round(6).tolist() for k, t in enumerate(pipeline.bundle.schema.task_names)}
        out["trace"] = {
            "stages": [{"stage": t.name, "n_in": t.n_in, "n_out": t.n_out, "ms": t.ms, "sources": t.sources} for t in trace],
            "recall_paths": ctx.trace_extra.get("recall_paths", {}),
            "rerank": ctx.trace_extra.get("rerank", {}),
            "heads": heads,
            "total_ms": round(elapsed * 1e3, 3),
        }
    # Returned as a Response: FastAPI skips re-validating it through the response model
    # (which still documents the shape); orjson serialises.
    return ORJSONResponse(out)
