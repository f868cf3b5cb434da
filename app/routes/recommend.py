from __future__ import annotations

import time
import uuid

from fastapi import APIRouter

from app.deps import PipelineDep, StateDep
from app.schemas import RecommendRequest, RecommendResponse
from core.store import ServedRequest

router = APIRouter(tags=["recommend"])


@router.post("/v1/recommend", response_model=RecommendResponse, response_model_exclude_none=True)
async def recommend(req: RecommendRequest, state: StateDep, pipeline: PipelineDep) -> dict:
    t0 = time.perf_counter()
    request_id = uuid.uuid4().hex
    events = state.store.user_events(req.user_id, state.settings.history_limit)
    # The tuner's bucket for this user and round (or "main") and the fusion parameters it serves.
    assigned = state.fusion.assign(req.user_id, req.scene)
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
    state.store.log_served(
        ServedRequest(request_id, req.user_id, ctx.bucket, {k: list(v) for k, v in ctx.fusion.items()}, [i["item_id"] for i in items],
                      ctx.now, round_id=assigned.round_id, scene=req.scene)
    )
    elapsed = time.perf_counter() - t0
    state.metrics.request_seconds.labels("recommend").observe(elapsed)
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
    return out
