from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from app.deps import PipelineDep, StateDep, get_pipeline, get_state
from app.ids import new_request_id
from app.pipeline import Pipeline
from app.responses import ORJSONResponse
from app.resilience import StoreUnavailable
from app.schemas import ERROR_RESPONSES, RecommendRequest, RecommendResponse
from app.state import AppState
from core.spool import SpoolFull
from core.store import ServedRequest

router = APIRouter(tags=["recommend"])


def _prepare(state: AppState, req: RecommendRequest):
    """Store reads. A store outage degrades instead of failing: the history falls back to the
    user's events in the local spool, the fusion parameters to the last ones read
    (fusion/service.py)."""
    degraded = []
    limit = state.settings.history_limit
    try:
        events = state.store.user_events(req.user_id, limit)
        if state.spool.pending:  # acknowledged while the store was down, not drained yet
            extra = state.spool.user_events(req.user_id, limit)
            if extra:
                events = sorted(events + extra, key=lambda e: -e[2])[:limit]
    except StoreUnavailable:
        events = state.spool.user_events(req.user_id, limit)
        degraded.append({"stage": "history", "reason": "store_unavailable"})
    # The tuner's bucket for this user and round (or "main") and the fusion parameters it serves.
    assigned = state.fusion.assign(req.user_id, req.scene)
    if assigned.stale:
        degraded.append({"stage": "fusion_params", "reason": "store_unavailable"})
    return events, assigned, degraded


def _log_served(state: AppState, served: ServedRequest) -> dict | None:
    """The served log, which feedback joins to; to the spool while the store is down."""
    state.recent_served.put(served)
    try:
        state.store.log_served(served)
        return None
    except StoreUnavailable:
        try:
            state.spool.add_served(served)
            return {"stage": "served_log", "reason": "store_unavailable", "detail": "spooled"}
        except SpoolFull:
            return {"stage": "served_log", "reason": "store_unavailable", "detail": "spool full: feedback only on this worker"}


def _compute(state: AppState, pipeline: Pipeline, req: RecommendRequest, request_id: str, events, assigned, deadline, degraded):
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
        deadline=deadline,
        degraded=degraded,
    )
    cands, trace = pipeline.run(ctx)
    items = pipeline.describe(cands)
    state.metrics.observe_recall(ctx.trace_extra.get("recall_paths", {}))
    return ctx, cands, trace, items


def _serve(state: AppState, pipeline: Pipeline, req: RecommendRequest, request_id: str, deadline: float):
    """One request on the worker's compute thread: store reads, the pipeline, the served log.
    One hand-off from the event loop per request instead of three (store reads on an I/O
    thread, compute, served log on an I/O thread): each hop costs thread wake-ups and GIL
    hand-overs on the loop's side too. The store calls here are a local SQLite read/insert or a
    Redis round trip, bounded by FUNNEL_STORE_TIMEOUT_S and skipped while the store is marked
    down (app/resilience.py)."""
    events, assigned, degraded = _prepare(state, req)
    ctx, cands, trace, items = _compute(state, pipeline, req, request_id, events, assigned, deadline, degraded)
    served = ServedRequest(request_id, req.user_id, ctx.bucket, {k: list(v) for k, v in ctx.fusion.items()}, [i["item_id"] for i in items],
                           ctx.now, round_id=assigned.round_id, scene=req.scene)
    # Logged before the response: feedback for this request may reach another worker at once.
    logged = _log_served(state, served)
    if logged is not None:
        ctx.degraded.append(logged)
    return ctx, cands, trace, items


@router.post("/v1/recommend", response_model=RecommendResponse, response_model_exclude_none=True, response_class=ORJSONResponse,
             responses=ERROR_RESPONSES)
async def recommend(req: RecommendRequest, state: StateDep, pipeline: PipelineDep):
    """A feed. Stage failures and store outages degrade it instead of failing it: `degraded`
    lists what fell back (stage, reason error|late|budget|store_unavailable, detail)."""
    t0 = time.perf_counter()
    # The request budget counts from here (arrival); the pipeline skips optional stages as it runs out.
    deadline = t0 + state.settings.request_budget_ms / 1e3
    request_id = new_request_id()  # not uuid4: see app/ids.py
    # `pipeline` was resolved once for this request: a bundle swap meanwhile does not affect it.
    ctx, cands, trace, items = await asyncio.get_running_loop().run_in_executor(state.compute, _serve, state, pipeline, req, request_id, deadline)
    if ctx.degraded:
        state.metrics.observe_degraded(ctx.degraded)
    elapsed = time.perf_counter() - t0
    state.metrics.request_seconds.labels("recommend").observe(elapsed)
    state.metrics.requests.labels("recommend", "200").inc()
    out = {"request_id": request_id, "bundle_version": pipeline.bundle.version, "bucket": ctx.bucket, "items": items, "degraded": ctx.degraded}
    if req.debug:
        heads = {}
        if cands.heads is not None:
            heads = {t: cands.heads[:, k].round(6).tolist() for k, t in enumerate(pipeline.bundle.schema.task_names)}
        out["trace"] = {
            "stages": [{"stage": t.name, "n_in": t.n_in, "n_out": t.n_out, "ms": t.ms, "sources": t.sources,
                        **({"degraded": t.degraded} if t.degraded else {})} for t in trace],
            "recall_paths": ctx.trace_extra.get("recall_paths", {}),
            "rerank": ctx.trace_extra.get("rerank", {}),
            "heads": heads,
            "total_ms": round(elapsed * 1e3, 3),
        }
    # Returned as a Response: FastAPI skips re-validating it through the response model
    # (which still documents the shape); orjson serialises.
    return ORJSONResponse(out)


async def hot(request: Request, req: RecommendRequest) -> ORJSONResponse:
    """`recommend` with its dependencies resolved, for app/hot.py."""
    state = await get_state(request)
    return await recommend(req, state, await get_pipeline(state))
