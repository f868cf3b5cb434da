from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter

from app.deps import StateDep
from app.errors import FieldError
from app.schemas import FeedbackRequest, FeedbackResponse
from core.store import FeedbackEvent

router = APIRouter(tags=["feedback"])


@router.post("/v1/feedback", status_code=202, response_model=FeedbackResponse)
async def feedback(req: FeedbackRequest, state: StateDep) -> FeedbackResponse:
    """Events are durable once this returns 202, deduplicated by (request_id, item_id, type),
    and must refer to a served request of the same user and to items that request returned.
    For requests served inside a tuner round they also count toward that round's bucket."""
    t0 = time.perf_counter()
    inserted, n = await asyncio.get_running_loop().run_in_executor(None, _store_feedback, state, req)
    for e in req.events:
        state.metrics.feedback_events.labels(e.type).inc()
    state.metrics.request_seconds.labels("feedback").observe(time.perf_counter() - t0)
    state.metrics.requests.labels("feedback", "202").inc()
    return FeedbackResponse(accepted=inserted, duplicates=n - inserted)


def _store_feedback(state, req: FeedbackRequest) -> tuple[int, int]:
    """Validate against the served log and store, in one I/O thread hop (the SQLite commit
    fsyncs; it must not stall the event loop)."""
    served = state.store.get_served(req.request_id)
    if served is None:
        raise FieldError(("body", "request_id"), "unknown request_id (not served, or expired from the served log)")
    if served.user_id != req.user_id:
        raise FieldError(("body", "user_id"), "user_id does not match the user the request was served to")
    served_items = set(served.items)
    for k, e in enumerate(req.events):
        if e.item_id not in served_items:
            raise FieldError(("body", "events", k, "item_id"), f"item {e.item_id!r} was not in the served list of this request")
    now = time.time()
    events = [FeedbackEvent(e.item_id, e.type, e.value, e.ts if e.ts is not None else now) for e in req.events]
    # Joined to the served request's tuner round and bucket: the new events' rewards enter the
    # bucket's statistics in the same atomic write as the events (a duplicate counts once).
    tally = state.fusion.tally(served, events)
    return state.store.add_feedback(req.request_id, req.user_id, events, tally), len(events)
