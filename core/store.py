"""State store. One protocol; the embedded default is SQLite (WAL, beside the bundles,
survives restarts). A Redis backend for several workers/hosts comes with the tuner work.

Holds the served-request log (to join feedback to what was served), the deduplicated
feedback log, and from it each user's real-time history.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ServedRequest:
    request_id: str
    user_id: str
    bucket: str
    params: dict
    items: list[str]
    ts: float


@dataclass(frozen=True)
class FeedbackEvent:
    item_id: str
    type: str
    value: float | None
    ts: float


class Store(Protocol):
    def log_served(self, served: ServedRequest) -> None: ...
    def get_served(self, request_id: str) -> ServedRequest | None: ...
    def add_feedback(self, request_id: str, user_id: str, events: list[FeedbackEvent]) -> int: ...
    def user_events(self, user_id: str, limit: int) -> list[tuple[str, str, float]]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS served (
  request_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, bucket TEXT NOT NULL,
  params TEXT NOT NULL, items TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS served_ts ON served(ts);
CREATE TABLE IF NOT EXISTS feedback (
  request_id TEXT NOT NULL, user_id TEXT NOT NULL, item_id TEXT NOT NULL, type TEXT NOT NULL,
  value REAL, ts REAL NOT NULL, received REAL NOT NULL,
  PRIMARY KEY (request_id, item_id, type));
CREATE INDEX IF NOT EXISTS feedback_user ON feedback(user_id, ts);
"""


class SQLiteStore:
    """One connection guarded by a lock; feedback commits with synchronous=FULL so an
    acknowledged event survives a crash."""

    def __init__(self, path: Path | str, served_ttl_s: float = 7 * 24 * 3600.0):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._lock = threading.Lock()
        self.served_ttl_s = served_ttl_s
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        # The served log rides on its own connection without fsync per commit (WAL +
        # synchronous=NORMAL survives a process crash); feedback keeps FULL.
        if str(path) == ":memory:":
            self._log_conn, self._log_lock = self._conn, self._lock
        else:
            self._log_conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
            self._log_conn.execute("PRAGMA synchronous=NORMAL")
            self._log_lock = threading.Lock()
        self._last_purge = 0.0

    def log_served(self, served: ServedRequest) -> None:
        with self._log_lock:
            self._log_conn.execute(
                "INSERT OR REPLACE INTO served VALUES (?,?,?,?,?,?)",
                (served.request_id, served.user_id, served.bucket, json.dumps(served.params), json.dumps(served.items), served.ts),
            )
            if served.ts - self._last_purge > 600:  # TTL purge, at most every 10 minutes
                self._log_conn.execute("DELETE FROM served WHERE ts < ?", (served.ts - self.served_ttl_s,))
                self._last_purge = served.ts

    def get_served(self, request_id: str) -> ServedRequest | None:
        with self._log_lock:
            row = self._log_conn.execute("SELECT * FROM served WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        return ServedRequest(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[5])

    def add_feedback(self, request_id: str, user_id: str, events: list[FeedbackEvent]) -> int:
        """Insert events, ignoring duplicates of (request_id, item_id, type). Returns how many
        were new. Committed (fsynced) before returning."""
        now = time.time()
        rows = [(request_id, user_id, e.item_id, e.type, e.value, e.ts, now) for e in events]
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT OR IGNORE INTO feedback VALUES (?,?,?,?,?,?,?)", rows)
                self._conn.execute("COMMIT")
            except Exception:
                self._conn.execute("ROLLBACK")
                raise
            return self._conn.total_changes - before

    def user_events(self, user_id: str, limit: int) -> list[tuple[str, str, float]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT item_id, type, ts FROM feedback WHERE user_id = ? ORDER BY ts DESC, received DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
        return [(r[0], r[1], float(r[2])) for r in rows]

    def feedback_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        if self._log_conn is not self._conn:
            with self._log_lock:
                self._log_conn.close()
