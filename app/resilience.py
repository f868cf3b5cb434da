"""Keeping serving while the state store is down (issue "Keeps serving under faults").

- `GuardedStore` wraps the configured store with a circuit breaker: a call that fails with a
  store error (SQLite, Redis, socket) raises `StoreUnavailable` and opens the breaker; for
  `store_retry_seconds` after that every call fails at once instead of waiting on a dead
  server, then the next call probes. Everything that reads the store (the request path, the
  fusion service, the tuner, admin, /metrics) goes through it and has a fallback:
    * a user's real-time history: the events waiting in the local spool (items seen before
      the outage may come back; the response says `history` degraded);
    * fusion parameters and the tuner's round: the last values this worker read (any age),
      else the configured prior (`fusion_params` degraded);
    * the served log: the record goes to the spool (`served_log` degraded), so its feedback
      can still be joined;
    * admin routes: 503 + Retry-After.
- Feedback (`record_feedback`): validated against the served log as usual; when the store
  cannot be reached the events are validated against what this worker knows (its recent
  served requests, the spool) and written to the local spool (core/spool.py: durable,
  bounded); `drain_spool` replays them through the same path once the store answers, and
  the store's dedup keeps the tuner tally exact (a replay counts nothing twice). Events for
  a request this worker cannot see during the outage (served by another worker) are spooled
  too and validated when drained; any that then fail validation are dropped and counted
  (funnel_spool_dropped_total): they would have been refused had the store been up.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict

from app.errors import FieldError
from core.spool import Spool
from core.store import FeedbackEvent, ServedRequest

log = logging.getLogger("funnel")


class StoreUnavailable(Exception):
    """The state store did not answer (or is considered down for a short while)."""


try:
    import redis as _redis

    STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError, _redis.RedisError, StoreUnavailable)
except ImportError:  # pragma: no cover - redis is a dependency
    STORE_ERRORS = (sqlite3.Error, OSError, StoreUnavailable)

_PASSTHROUGH = frozenset({"close", "flush_prefix"})


class GuardedStore:
    """A circuit breaker around a Store (same methods)."""

    def __init__(self, inner, retry_s: float = 1.0, on_change=None):
        self.inner = inner
        self.retry_s = float(retry_s)
        self.on_change = on_change  # callable(up: bool)
        self.up = True
        self.last_error: str | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr) or name in _PASSTHROUGH or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            if not self.up and time.monotonic() < self._retry_at:
                raise StoreUnavailable(f"state store unavailable ({self.last_error})")
            try:
                out = attr(*args, **kwargs)
            except STORE_ERRORS as e:
                self.mark_down(e)
                raise StoreUnavailable(f"state store unavailable ({type(e).__name__}: {e})") from e
            if not self.up:
                self.mark_up()
            return out

        return call

    def mark_down(self, exc: BaseException) -> None:
        with self._lock:
            was_up = self.up
            self.up = False
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            self._retry_at = time.monotonic() + self.retry_s
        if was_up:
            log.error("state store down: %s", self.last_error)
            if self.on_change:
                self.on_change(False)

    def mark_up(self) -> None:
        with self._lock:
            was_up = self.up
            self.up = True
        if not was_up:
            log.warning("state store back")
            if self.on_change:
                self.on_change(True)

    def probe(self) -> bool:
        """Ask the store something cheap (ignores the breaker's wait); True when it answers."""
        try:
            self.inner.get_doc("__probe__")
        except STORE_ERRORS as e:
            self.mark_down(e)
            return False
        self.mark_up()
        return True


class RecentServed:
    """This worker's most recent served requests (bounded LRU): validates feedback while the
    store is down, and spares the store a read for feedback on this worker's own feeds.

    Held as JSON strings (`ServedRequest.to_json`), rebuilt on `get`: a string is never tracked by
    the collector. 10,000 ServedRequests (a dataclass, a dict and a list per task, a list of
    items) were ~100k tracked objects that the gen-1 and full collections walked with the GIL
    held: 38 ms a full collection in isolation, 0.15 ms as strings; a loaded worker on the 1M
    bundle ended a run tracking ~70k objects, ~6k with untracked rows."""

    def __init__(self, cap: int = 10_000):
        self.cap = cap
        self._d: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, s: ServedRequest) -> None:
        body = s.to_json()
        with self._lock:
            self._d[s.request_id] = body
            if len(self._d) > self.cap:
                self._d.popitem(last=False)

    def get(self, request_id: str) -> ServedRequest | None:
        with self._lock:
            body = self._d.get(request_id)
        return None if body is None else ServedRequest.from_json(body)


# ---------------------------------------------------------------------- feedback


def check_feedback(served: ServedRequest | None, user_id: str, events: list[FeedbackEvent]) -> ServedRequest:
    """The feedback contract: a served request, of this user, naming items it returned."""
    if served is None:
        raise FieldError(("body", "request_id"), "unknown request_id (not served, or expired from the served log)")
    if served.user_id != user_id:
        raise FieldError(("body", "user_id"), "user_id does not match the user the request was served to")
    served_items = set(served.items)
    for k, e in enumerate(events):
        if e.item_id not in served_items:
            raise FieldError(("body", "events", k, "item_id"), f"item {e.item_id!r} was not in the served list of this request")
    return served


def _write(state, request_id: str, user_id: str, events: list[FeedbackEvent], served: ServedRequest | None = None) -> int:
    """Validate against the served log and write to the store with the tuner tally (raises
    FieldError on bad input, StoreUnavailable when the store cannot be reached)."""
    if served is None:
        # Served by this worker: its own copy (a served record never changes) spares the store a read.
        served = state.recent_served.get(request_id)
        if served is not None and served.expired(state.settings.served_log_ttl_s):
            served = None  # expired from the served log as the store sees it
    if served is None:
        served = state.store.get_served(request_id)
        if served is None and state.spool.pending:  # served while the store was down, not drained yet
            served = state.spool.get_served(request_id)
    check_feedback(served, user_id, events)
    # Joined to the served request's tuner round and bucket: the new events' rewards enter the
    # bucket's statistics in the same atomic write as the events (a duplicate counts once).
    tally = state.fusion.tally(served, events)
    return state.store.add_feedback(request_id, user_id, events, tally)


def record_feedback(state, request_id: str, user_id: str, events: list[FeedbackEvent]) -> tuple[int, bool]:
    """(new events, spooled?). Durable when it returns: in the store, or fsynced in the spool.
    Raises FieldError (4xx) on bad input, SpoolFull when the store is down and the spool full."""
    try:
        return _write(state, request_id, user_id, events), False
    except StoreUnavailable:
        pass
    served = state.recent_served.get(request_id) or state.spool.get_served(request_id)
    if served is not None:
        check_feedback(served, user_id, events)
    return state.spool.add_feedback(request_id, user_id, events), True


def drain_spool(state) -> tuple[int, int]:
    """Write spooled rows to the store (no-op while it is down). Returns (served, events)."""
    spool: Spool = state.spool
    if not spool.pending and not spool.count():
        return 0, 0
    if not state.store.probe():
        return 0, 0

    def write_feedback(rid: str, user: str, events: list[FeedbackEvent]) -> None:
        try:
            _write(state, rid, user, events)
        except FieldError as e:
            state.metrics.spool_dropped.labels(e.type if e.type != "value_error" else "invalid").inc(len(events))
            log.warning("spooled feedback dropped at drain (%d events of request %s): %s", len(events), rid, e.msg)

    try:
        n_served, n_fb = spool.drain(state.store.log_served, write_feedback)
    except StoreUnavailable:
        return 0, 0
    finally:
        state.metrics.spool_events.set(spool.pending)
    if n_served:
        state.metrics.spool_drained.labels("served").inc(n_served)
    if n_fb:
        state.metrics.spool_drained.labels("feedback").inc(n_fb)
        log.warning("spool drained: %d served records, %d feedback events", n_served, n_fb)
    return n_served, n_fb
