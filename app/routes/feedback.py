from __future__ import annotations

import asyncio
import time
from collections import Counter

from fastapi import APIRouter, Request

from app.deps import StateDep, get_state
from app.resilience import record_feedback
from app.responses import ORJSONResponse
from app.schemas import ERROR_RESPONSES, FeedbackRequest, FeedbackResponse
from core.store import FeedbackEvent

router = APIRouter(tags=["feedback"])


@router.post("/v1/feedback", status_code=202, response_model=FeedbackResponse, response_model_exclude_none=True, response_class=ORJSONResponse,
             responses=ERROR_RESPONSES)
async def feedback(req: FeedbackRequest, state: StateDep):
    """Events are durable once this returns 202, deduplicated by (request_id, item_id, type),
    and must refer to a served request of the same user and to items that request returned.
    For requests served inside a tuner round they also count toward that round's bucket.
    While the state store is down they are kept in the local durable spool (`spooled: true`)
    and reach the store when it returns (app/resilience.py); 503 + Retry-After only when the
    store is down and the spool is full (nothing acknowledged then)."""
    t0 = time.perf_counter()
    now = time.time()
    events = [FeedbackEvent(e.item_id, e.type, e.value, e.ts if e.ts is not None else now) for e in req.events]
    # One hop to the worker's feedback thread: validation against the served log, then the write
    # (the SQLite commit fsyncs; it must not stall the event loop).
    inserted, spooled = await asyncio.get_running_loop().run_in_executor(state.feedback_io, record_feedback, state, req.request_id, req.user_id, events)
    for t, n in Counter(e.type for e in req.events).items():  # one labelled increment per type, not per event
        state.metrics.feedback_events.labels(t).inc(n)
    if spooled:
        state.metrics.degraded.labels("feedback", "store_unavailable").inc()
        state.metrics.spool_events.set(state.spool.pending)
    state.metrics.request_seconds.labels("feedback").observe(time.perf_counter() - t0)
    state.metrics.requests.labels("feedback", "202").inc()
    out = {"accepted": inserted, "duplicates": len(events) - inserted}
    if spooled:
        out["spooled"] = True
    # A Response: FastAPI skips re-validating it through FeedbackResponse (which documents it).
    return ORJSONResponse(out, status_code=202)


async def hot(request: Request, req: FeedbackRequest) -> ORJSONResponse:
    """`feedback` with its dependencies resolved, for app/hot.py."""
    return await feedback(req, await get_state(request))
