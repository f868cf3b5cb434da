"""The local feedback spool: where acknowledged feedback waits while the state store is down.

A SQLite file on the worker's host (`FUNNEL_SPOOL_PATH`, default `spool.db` beside the
SQLite state), WAL with synchronous=FULL: every write is fsynced before the caller answers
202, so a spooled event survives a crash of the process or the host's power. Workers on one
host may share the file (SQLite serialises writers).

It holds two kinds of rows:
- feedback events, deduplicated by (request_id, item_id, type) like the store itself;
- served requests whose served-log write failed (so their feedback can still be joined).

Bounded: at most `max_rows` rows; beyond that `SpoolFull` is raised and the feedback call
answers 503 + Retry-After (never acknowledged, so nothing is lost: the client retries).

`drain` hands the rows back, oldest first, to callbacks that write them to the store; a row
leaves the spool only after its callback returned, so a crash mid-drain replays rows, which
the store's dedup turns into no-ops (the tuner's tally counts only new events). Draining is
therefore safe from several workers at once.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Callable

from core.store import FeedbackEvent, ServedRequest, set_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS served (
  request_id TEXT PRIMARY KEY, body TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, user_id TEXT NOT NULL,
  item_id TEXT NOT NULL, type TEXT NOT NULL, value REAL, ts REAL NOT NULL,
  UNIQUE (request_id, item_id, type));
CREATE INDEX IF NOT EXISTS spool_user ON feedback(user_id, ts);
"""


class SpoolFull(Exception):
    """The spool holds its maximum number of rows."""


class Spool:
    def __init__(self, path: Path | str, max_rows: int = 100_000):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = int(max_rows)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._lock = threading.Lock()
        with self._lock:
            set_wal(self._conn, 30.0)
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        self.pending = self.count()  # this process's last view of the row count (refreshed by count())

    # ------------------------------------------------------------------ writes (fsynced)

    def _room(self, c, n: int) -> None:
        rows = c.execute("SELECT (SELECT COUNT(*) FROM feedback) + (SELECT COUNT(*) FROM served)").fetchone()[0]
        if rows + n > self.max_rows:
            raise SpoolFull(f"spool holds {rows} rows (max {self.max_rows})")

    def add_served(self, served: ServedRequest) -> None:
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                self._room(c, 1)
                c.execute("INSERT OR REPLACE INTO served VALUES (?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM served))",
                          (served.request_id, served.to_json()))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            self.pending += 1

    def add_feedback(self, request_id: str, user_id: str, events: list[FeedbackEvent]) -> int:
        """Insert events, ignoring duplicates of (request_id, item_id, type) already spooled.
        Returns how many were new. Committed (fsynced) before returning."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                self._room(c, len(events))
                new = 0
                for e in events:
                    cur = c.execute(
                        "INSERT OR IGNORE INTO feedback (request_id, user_id, item_id, type, value, ts) VALUES (?,?,?,?,?,?)",
                        (request_id, user_id, e.item_id, e.type, e.value, e.ts),
                    )
                    new += cur.rowcount
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            self.pending += new
            return new

    # ------------------------------------------------------------------ reads

    def get_served(self, request_id: str) -> ServedRequest | None:
        with self._lock:
            row = self._conn.execute("SELECT body FROM served WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else ServedRequest.from_json(row[0])

    def user_events(self, user_id: str, limit: int) -> list[tuple[str, str, float]]:
        """The user's spooled events, newest first (same shape as Store.user_events)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT item_id, type, ts FROM feedback WHERE user_id = ? ORDER BY ts DESC, seq DESC LIMIT ?", (user_id, int(limit))
            ).fetchall()
        return [(r[0], r[1], float(r[2])) for r in rows]

    def count(self) -> int:
        with self._lock:
            n = int(self._conn.execute("SELECT (SELECT COUNT(*) FROM feedback) + (SELECT COUNT(*) FROM served)").fetchone()[0])
        self.pending = n
        return n

    # ------------------------------------------------------------------ drain

    def drain(
        self,
        write_served: Callable[[ServedRequest], None],
        write_feedback: Callable[[str, str, list[FeedbackEvent]], None],
        batch: int = 500,
    ) -> tuple[int, int]:
        """Served records first (feedback joins to them), then feedback grouped by request,
        oldest first. A callback that raises stops the drain (rows stay for the next try).
        Returns (served rows, feedback events) drained."""
        n_served = n_fb = 0
        while True:
            with self._lock:
                rows = self._conn.execute("SELECT request_id, body FROM served ORDER BY seq LIMIT ?", (batch,)).fetchall()
            if not rows:
                break
            for rid, body in rows:
                write_served(ServedRequest.from_json(body))
                with self._lock:
                    self._conn.execute("DELETE FROM served WHERE request_id = ?", (rid,))
                n_served += 1
        while True:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT seq, request_id, user_id, item_id, type, value, ts FROM feedback ORDER BY seq LIMIT ?", (batch,)
                ).fetchall()
            if not rows:
                break
            groups: dict[tuple[str, str], list] = {}
            for seq, rid, user, item, typ, value, ts in rows:
                groups.setdefault((rid, user), []).append((seq, FeedbackEvent(item, typ, value, float(ts))))
            done: list[tuple[int]] = []
            try:
                for (rid, user), evs in groups.items():
                    write_feedback(rid, user, [e for _, e in evs])
                    done += [(seq,) for seq, _ in evs]
            finally:  # one transaction per batch; a crash before it replays the batch (a no-op for the store's dedup)
                if done:
                    with self._lock:
                        self._conn.execute("BEGIN IMMEDIATE")
                        self._conn.executemany("DELETE FROM feedback WHERE seq = ?", done)
                        self._conn.execute("COMMIT")
                    n_fb += len(done)
        self.count()
        return n_served, n_fb

    def close(self) -> None:
        with self._lock:
            self._conn.close()
