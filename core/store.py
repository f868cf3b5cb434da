"""State store. One protocol, two backends: SQLite (embedded default: WAL, a file beside the
bundles, survives restarts) and Redis (core/redis_store.py, `FUNNEL_REDIS_URL`, for several
workers or hosts). `open_store(settings)` picks one.

What it holds:
- the served-request log (with a TTL), to join feedback to what was served: the user, the
  items, the fusion parameters, and the tuner round and bucket the request was served in;
- the deduplicated feedback log (key: request_id, item_id, type), and from it each user's
  real-time history;
- per tuner round and bucket, the reward statistics (impressions, Σ reward, Σ reward²),
  updated in the same atomic write as the feedback that produced them, so an event counts
  exactly once or not at all (a duplicate never counts twice, a crash never half-counts);
- versioned JSON documents (fusion parameters per scene, tuner config + state) written with
  compare-and-set, and a history of closed rounds and manual changes; `commit` writes
  several documents and history entries in one atomic step, and refuses a second history
  entry of kind "round" for the same (scene, round): a round is closed at most once;
- named locks with an owner and an expiry (the tuner's round closing runs under one).

Per-impression reward statistics. An impression is a (request_id, item_id) pair with any
feedback event; its reward r is the weighted sum of its events (fusion/reward.py). Events of
one impression may arrive in several calls, so the store keeps each impression's running r
and updates the bucket's Σr² by (r + Δ)² − r²: the statistics are exact whatever the order
or batching of the events.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from core.threads import name_native_thread

try:
    import fcntl
except ImportError:  # not POSIX: writers fall back to SQLite's busy handler alone
    fcntl = None

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedRequest:
    request_id: str
    user_id: str
    bucket: str
    params: dict
    items: list[str]
    ts: float
    round_id: int = -1  # tuner round the request was served in (-1: no tuner round)
    scene: str = "home"

    def expired(self, ttl_s: float, now: float | None = None) -> bool:
        """Past the served log's TTL: feedback for it is refused as for an unknown request."""
        return self.ts < (time.time() if now is None else now) - ttl_s

    def to_json(self) -> str:
        """The record as one JSON object (the spool's and Redis's served rows, the worker's LRU)."""
        return json.dumps({"request_id": self.request_id, "user_id": self.user_id, "bucket": self.bucket, "params": self.params,
                           "items": self.items, "ts": self.ts, "round_id": int(self.round_id), "scene": self.scene})

    @classmethod
    def from_json(cls, body: str | bytes) -> "ServedRequest":
        """Records written before the tuner (no round) or scenes (no scene) take the defaults."""
        d = json.loads(body)
        return cls(d["request_id"], d["user_id"], d["bucket"], d["params"], d["items"], d["ts"], int(d.get("round_id", -1)),
                   d.get("scene", "home"))


@dataclass(frozen=True)
class FeedbackEvent:
    item_id: str
    type: str
    value: float | None
    ts: float


@dataclass(frozen=True)
class Tally:
    """Where a feedback call's rewards count: the tuner round and bucket its request was
    served in, and one reward per event (aligned with the events)."""

    scene: str
    round_id: int
    bucket: str
    rewards: tuple[float, ...]


@dataclass(frozen=True)
class BucketStats:
    n: int = 0  # impressions
    sum: float = 0.0  # Σ reward over impressions
    sumsq: float = 0.0  # Σ reward²

    @property
    def mean(self) -> float:
        return self.sum / self.n if self.n else 0.0

    @property
    def var(self) -> float:
        if self.n < 2:
            return 0.0
        return max(0.0, (self.sumsq - self.sum * self.sum / self.n) / (self.n - 1))

    @property
    def se(self) -> float:
        return math.sqrt(self.var / self.n) if self.n else float("inf")

    def __add__(self, other: "BucketStats") -> "BucketStats":
        return BucketStats(self.n + other.n, self.sum + other.sum, self.sumsq + other.sumsq)

    def to_dict(self) -> dict:
        return {"n": self.n, "sum": self.sum, "sumsq": self.sumsq, "mean": self.mean, "se": None if self.n == 0 else self.se}


@dataclass(frozen=True)
class Doc:
    version: int  # >= 1; bumped by every write
    value: dict


@dataclass(frozen=True)
class DocWrite:
    key: str
    value: dict
    expect: int | None = None  # None: unconditional; 0: must not exist; k: current version must be k


class Store(Protocol):
    # served log, feedback, real-time history
    def log_served(self, served: ServedRequest) -> None: ...
    def get_served(self, request_id: str) -> ServedRequest | None: ...
    def add_feedback(self, request_id: str, user_id: str, events: list[FeedbackEvent], tally: Tally | None = None) -> int: ...
    def user_events(self, user_id: str, limit: int) -> list[tuple[str, str, float]]: ...
    def feedback_count(self) -> int: ...
    # tuner statistics, documents, history, locks
    def bucket_stats(self, scene: str, round_id: int, settle_s: float = 0.0) -> dict[str, BucketStats]: ...
    # settle_s: a backend that applies feedback asynchronously may wait up to this long for
    # events already acknowledged but still being applied (closing a round, admin reads)
    def get_doc(self, key: str) -> Doc | None: ...
    def commit(self, writes: list[DocWrite], history: list[dict] | None = None) -> bool: ...
    def history(self, scene: str, limit: int = 100, before: int | None = None, kind: str | None = None) -> list[dict]: ...
    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool: ...
    def release_lock(self, name: str, owner: str) -> None: ...
    def close(self) -> None: ...


def open_store(settings: "Settings") -> Store:
    """Redis when `redis_url` is set, else SQLite at `db_path`."""
    if settings.redis_url:
        from core.redis_store import RedisStore

        return RedisStore(settings.redis_url, prefix=settings.redis_prefix, served_ttl_s=settings.served_log_ttl_s,
                          timeout_s=settings.store_timeout_s)
    return SQLiteStore(settings.db_path, settings.served_log_ttl_s)


def history_entry(scene: str, kind: str, round_id: int | None, data: dict, ts: float | None = None) -> dict:
    """A history entry as stored: data plus scene, kind, round, ts (the store adds seq)."""
    return {**data, "scene": scene, "kind": kind, "round": round_id, "ts": time.time() if ts is None else ts}


_ROWS_PER_INSERT = 140  # 7 parameters a row: within SQLite's oldest limit of 999 parameters a statement


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_feedback_rows(n: int) -> str:
    return "INSERT OR IGNORE INTO feedback VALUES " + ",".join(["(?,?,?,?,?,?,?)"] * n)

_SERVED_SCHEMA = """CREATE TABLE IF NOT EXISTS served (
  request_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, bucket TEXT NOT NULL, params TEXT NOT NULL, items TEXT NOT NULL,
  ts REAL NOT NULL, round INTEGER NOT NULL DEFAULT -1, scene TEXT NOT NULL DEFAULT 'home')"""

# `served` in the main file: state files from before the served log had its own file
_SCHEMA = """
CREATE TABLE IF NOT EXISTS served (
  request_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, bucket TEXT NOT NULL,
  params TEXT NOT NULL, items TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS served_ts ON served(ts);
CREATE TABLE IF NOT EXISTS feedback (
  request_id TEXT NOT NULL, user_id TEXT NOT NULL, item_id TEXT NOT NULL, type TEXT NOT NULL,
  value REAL, ts REAL NOT NULL, received REAL NOT NULL,
  PRIMARY KEY (request_id, item_id, type));
-- A user's recent events (user_events, on every feed) are read from this index alone, with no
-- table lookup per row and no sort: 200 events in ~100 us, against ~200 us with the former
-- index on (user_id, ts), which it replaces.
DROP INDEX IF EXISTS feedback_user;
CREATE INDEX IF NOT EXISTS feedback_user_recent ON feedback(user_id, ts DESC, received DESC, item_id, type);
CREATE TABLE IF NOT EXISTS impression (
  request_id TEXT NOT NULL, item_id TEXT NOT NULL, reward REAL NOT NULL, ts REAL NOT NULL,
  PRIMARY KEY (request_id, item_id));
CREATE INDEX IF NOT EXISTS impression_ts ON impression(ts);
CREATE TABLE IF NOT EXISTS bucket_stats (
  scene TEXT NOT NULL, round INTEGER NOT NULL, bucket TEXT NOT NULL,
  n INTEGER NOT NULL, sum REAL NOT NULL, sumsq REAL NOT NULL,
  PRIMARY KEY (scene, round, bucket));
CREATE TABLE IF NOT EXISTS docs (
  key TEXT PRIMARY KEY, version INTEGER NOT NULL, value TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS history (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, scene TEXT NOT NULL, kind TEXT NOT NULL,
  round INTEGER, ts REAL NOT NULL, data TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS history_round_once ON history(scene, round) WHERE kind = 'round';
CREATE TABLE IF NOT EXISTS locks (
  name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
"""


def set_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch a database to WAL. Two workers opening a new database at once can get "database
    is locked" here at once: SQLite does not run the busy handler for this switch, so retry."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SQLiteStore:
    """One connection guarded by a lock; feedback commits with synchronous=FULL so an
    acknowledged event survives a crash. Several processes may share the file (WAL; writers
    serialise on BEGIN IMMEDIATE).

    WAL checkpoints run on a background thread of their own (PASSIVE, every
    `checkpoint_interval_s`), not in the commit that happens to cross SQLite's automatic
    threshold: that commit would copy the WAL into the database and fsync it while its
    connection lock is held, and every request queued behind the lock waited (1M bundle, 2
    workers, 58 recommend rps: served-log writes and history reads of 200-500 ms, the load
    test's p99).

    The two hot writes (feedback; the served log, in its own file, see __init__) also take an
    exclusive file lock beside their database first. Writers from other processes then queue in the kernel and wake the moment
    the lock is free; left to SQLite they poll with its busy handler, which sleeps 1, 2, 5,
    10 ... 100 ms between tries, so a writer that arrived during another's commit slept far
    longer than that commit took."""

    def __init__(self, path: Path | str, served_ttl_s: float = 7 * 24 * 3600.0, checkpoint_interval_s: float = 1.0):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._lock = threading.Lock()
        self.served_ttl_s = served_ttl_s
        with self._lock:
            set_wal(self._conn, 30.0)
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                cols = {r[1] for r in self._conn.execute("PRAGMA table_info(served)")}
                if "round" not in cols:  # state files from before the tuner
                    self._conn.execute("ALTER TABLE served ADD COLUMN round INTEGER NOT NULL DEFAULT -1")
                if "scene" not in cols:
                    self._conn.execute("ALTER TABLE served ADD COLUMN scene TEXT NOT NULL DEFAULT 'home'")
                self._conn.execute("COMMIT")
            except Exception:
                self._conn.execute("ROLLBACK")
                raise
        # The served log lives in a database file of its own (`<name>-served<suffix>`), written
        # without fsync per commit (WAL + synchronous=NORMAL survives a process crash). SQLite
        # has one write lock per database: in the main file a feed's served-log insert waited
        # for any feedback commit's fsync (FULL), and one slow fsync (~360 ms, seen on this
        # machine's disk) stalled every worker's feeds at once. Served rows of older state files
        # (the main file's `served` table) are still found by get_served.
        if str(path) == ":memory:":
            self._log_conn, self._log_lock = self._conn, self._lock
            self.served_path = None
        else:
            self.served_path = self.path.with_name(f"{self.path.stem}-served{self.path.suffix}")
            self._log_conn = sqlite3.connect(str(self.served_path), check_same_thread=False, isolation_level=None, timeout=30.0)
            set_wal(self._log_conn, 30.0)
            self._log_conn.execute("PRAGMA synchronous=NORMAL")
            self._log_conn.execute(_SERVED_SCHEMA)
            self._log_conn.execute("CREATE INDEX IF NOT EXISTS served_ts ON served(ts)")
            self._log_lock = threading.Lock()
        # Reads on the request path (a user's recent events, a served request) ride on a third
        # connection: under WAL a reader never waits for a writer, so a feed is not held up
        # behind another request's feedback commit (fsync) or served-log insert.
        if str(path) == ":memory:":
            self._read_conn, self._read_lock = self._conn, self._lock
        else:
            self._read_conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
            self._read_conn.execute("ATTACH DATABASE ? AS log", (str(self.served_path),))
            self._read_lock = threading.Lock()
        self._served_tables = ("main.served",) if self.served_path is None else ("log.served", "main.served")
        self._last_purge = 0.0
        # one file object per writing connection: flock excludes other open files, not threads sharing one
        self._feedback_wlock = self._log_wlock = None
        if str(path) != ":memory:" and fcntl is not None:
            self._feedback_wlock = open(f"{self.path}.writers", "a+b")
            self._log_wlock = open(f"{self.served_path}.writers", "a+b")
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if str(path) != ":memory:" and checkpoint_interval_s > 0:
            for conn in (self._conn, self._log_conn, self._read_conn):
                conn.execute("PRAGMA wal_autocheckpoint=0")
            self._read_conn.execute("PRAGMA log.wal_autocheckpoint=0")
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(float(checkpoint_interval_s),),
                                                  name="funnel-sqlite-checkpoint", daemon=True)
            self._checkpointer.start()

    @staticmethod
    @contextlib.contextmanager
    def _writer(f):
        if f is None:
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

    def _checkpoint_loop(self, interval_s: float) -> None:
        name_native_thread("funnel-ckpt")
        conns = [sqlite3.connect(str(p), check_same_thread=False, isolation_level=None, timeout=30.0) for p in (self.path, self.served_path)]
        last_purge = 0.0
        try:
            while not self._stop.wait(interval_s):
                now = time.time()
                if now - last_purge > 600:  # at most every 10 minutes
                    try:
                        self._purge_main(now)
                        last_purge = now
                    except sqlite3.Error as e:
                        log.warning("TTL purge failed: %s", e)
                for conn in conns:
                    try:
                        # PASSIVE: copies what no reader still needs, never waits for readers or writers.
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    except sqlite3.Error as e:  # busy (another process checkpoints) or I/O: try again next time
                        log.debug("WAL checkpoint skipped: %s", e)
        finally:
            for conn in conns:
                conn.close()

    # ------------------------------------------------------------------ served log

    def log_served(self, served: ServedRequest) -> None:
        purge_main = False
        with self._log_lock, self._writer(self._log_wlock):
            self._log_conn.execute(
                "INSERT OR REPLACE INTO served (request_id, user_id, bucket, params, items, ts, round, scene) VALUES (?,?,?,?,?,?,?,?)",
                (served.request_id, served.user_id, served.bucket, json.dumps(served.params), json.dumps(served.items),
                 served.ts, int(served.round_id), served.scene),
            )
            if served.ts - self._last_purge > 600:  # TTL purge, at most every 10 minutes
                cutoff = served.ts - self.served_ttl_s
                self._log_conn.execute("DELETE FROM served WHERE ts < ?", (cutoff,))
                self._last_purge = served.ts
                if self._log_conn is self._conn:  # one database (":memory:"): the tally's impressions too
                    self._conn.execute("DELETE FROM impression WHERE ts < ?", (cutoff,))
                # a file store purges its main file from the checkpoint thread, off the request path
                purge_main = self._log_conn is not self._conn and self._checkpointer is None
        if purge_main:
            self._purge_main(served.ts)

    def _purge_main(self, now: float) -> None:
        """TTL purge of the main file: the tally's impressions, served rows of older versions."""
        cutoff = now - self.served_ttl_s
        with self._lock, self._writer(self._feedback_wlock):
            self._conn.execute("DELETE FROM served WHERE ts < ?", (cutoff,))
            self._conn.execute("DELETE FROM impression WHERE ts < ?", (cutoff,))

    def get_served(self, request_id: str) -> ServedRequest | None:
        with self._read_lock:
            for table in self._served_tables:
                row = self._read_conn.execute(
                    f"SELECT request_id, user_id, bucket, params, items, ts, round, scene FROM {table} WHERE request_id = ?", (request_id,)
                ).fetchone()
                if row is not None:
                    break
        if row is None:
            return None
        served = ServedRequest(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[5], int(row[6]), row[7])
        return None if served.expired(self.served_ttl_s) else served

    # ------------------------------------------------------------------ feedback

    def add_feedback(self, request_id: str, user_id: str, events: list[FeedbackEvent], tally: Tally | None = None) -> int:
        """Insert events, ignoring duplicates of (request_id, item_id, type). Returns how many
        were new. With a tally, the new events' rewards are added to the bucket statistics in
        the same transaction. Committed (fsynced) before returning."""
        now = time.time()
        if tally is not None and len(tally.rewards) != len(events):
            raise ValueError("tally.rewards must align with events")
        rows = [(request_id, user_id, e.item_id, e.type, e.value, e.ts, now) for e in events]
        with self._lock, self._writer(self._feedback_wlock):
            c = self._conn
            if tally is None and len(rows) <= _ROWS_PER_INSERT:
                # No tuner round: one multi-row INSERT, its own (fsynced) transaction. Each SQLite
                # call releases and retakes the GIL, and under load every retake may wait for the
                # compute thread: one call instead of BEGIN, a step per row and COMMIT.
                return self._insert_untallied(c, rows)
            c.execute("BEGIN IMMEDIATE")
            try:
                if tally is None:  # no tuner round: only the count of new rows is needed, few statements for all
                    new = self._insert_untallied(c, rows)
                else:
                    new = self._insert_tallied(c, request_id, rows, tally, now)
                c.execute("COMMIT")
            except Exception:
                c.execute("ROLLBACK")
                raise
            return new

    @staticmethod
    def _insert_untallied(c: sqlite3.Connection, rows: list[tuple]) -> int:
        """Insert rows (duplicates ignored) by multi-row statements; returns how many were new."""
        before = c.total_changes
        for i in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[i:i + _ROWS_PER_INSERT]
            c.execute(_insert_feedback_rows(len(chunk)), [v for r in chunk for v in r])
        return c.total_changes - before

    @staticmethod
    def _insert_tallied(c: sqlite3.Connection, request_id: str, rows: list[tuple], tally: Tally, now: float) -> int:
        """Insert a row at a time (the tally counts only the new events) and add the new events'
        rewards to their impressions and the bucket statistics. Inside the caller's transaction."""
        new = 0
        delta: dict[str, float] = {}
        for k, row in enumerate(rows):
            if c.execute(_insert_feedback_rows(1), row).rowcount == 1:
                new += 1
                delta[row[2]] = delta.get(row[2], 0.0) + float(tally.rewards[k])  # row[2]: item_id
        if delta:
            dn, ds, dss = 0, 0.0, 0.0
            for item, d in delta.items():
                got = c.execute("SELECT reward FROM impression WHERE request_id = ? AND item_id = ?", (request_id, item)).fetchone()
                old = None if got is None else float(got[0])
                r = (old or 0.0) + d
                c.execute("INSERT OR REPLACE INTO impression VALUES (?,?,?,?)", (request_id, item, r, now))
                dn += old is None
                ds += d
                dss += r * r - (old or 0.0) ** 2
            c.execute(
                "INSERT INTO bucket_stats VALUES (?,?,?,?,?,?) ON CONFLICT(scene, round, bucket) DO UPDATE SET "
                "n = n + excluded.n, sum = sum + excluded.sum, sumsq = sumsq + excluded.sumsq",
                (tally.scene, int(tally.round_id), tally.bucket, dn, ds, dss),
            )
        return new

    def user_events(self, user_id: str, limit: int) -> list[tuple[str, str, float]]:
        with self._read_lock:
            rows = self._read_conn.execute(
                "SELECT item_id, type, ts FROM feedback WHERE user_id = ? ORDER BY ts DESC, received DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
        return rows  # (item_id, type, ts) tuples; ts is a REAL column

    def feedback_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])

    # ------------------------------------------------------------------ tuner state

    def bucket_stats(self, scene: str, round_id: int, settle_s: float = 0.0) -> dict[str, BucketStats]:  # applied synchronously
        with self._lock:
            rows = self._conn.execute(
                "SELECT bucket, n, sum, sumsq FROM bucket_stats WHERE scene = ? AND round = ?", (scene, int(round_id))
            ).fetchall()
        return {r[0]: BucketStats(int(r[1]), float(r[2]), float(r[3])) for r in rows}

    def get_doc(self, key: str) -> Doc | None:
        # On the read connection: a feed reads its fusion parameters here (every cache_seconds), and
        # on the write connection it waited behind any feedback commit in flight, fsync included
        # (one slow fsync of ~100 ms put a feed in the p99). Under WAL a reader sees the last commit.
        with self._read_lock:
            row = self._read_conn.execute("SELECT version, value FROM main.docs WHERE key = ?", (key,)).fetchone()
        return None if row is None else Doc(int(row[0]), json.loads(row[1]))

    def commit(self, writes: list[DocWrite], history: list[dict] | None = None) -> bool:
        """All or nothing: every write's version expectation holds and no "round" history
        entry repeats a (scene, round) already recorded, or nothing is written (False)."""
        now = time.time()
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for w in writes:
                    if w.expect is None:
                        continue
                    row = c.execute("SELECT version FROM docs WHERE key = ?", (w.key,)).fetchone()
                    if (0 if row is None else int(row[0])) != w.expect:
                        c.execute("ROLLBACK")
                        return False
                for w in writes:
                    c.execute(
                        "INSERT INTO docs VALUES (?, 1, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                        "version = version + 1, value = excluded.value, updated = excluded.updated",
                        (w.key, json.dumps(w.value), now),
                    )
                for h in history or []:
                    c.execute(
                        "INSERT INTO history (scene, kind, round, ts, data) VALUES (?,?,?,?,?)",
                        (h["scene"], h["kind"], h.get("round"), float(h.get("ts", now)), json.dumps(h)),
                    )
                c.execute("COMMIT")
                return True
            except sqlite3.IntegrityError:  # a second close of the same round
                c.execute("ROLLBACK")
                return False
            except Exception:
                c.execute("ROLLBACK")
                raise

    def history(self, scene: str, limit: int = 100, before: int | None = None, kind: str | None = None) -> list[dict]:
        """Newest first; `before`: only entries with seq < before."""
        q = "SELECT seq, data FROM history WHERE scene = ?"
        args: list = [scene]
        if before is not None:
            q += " AND seq < ?"
            args.append(int(before))
        if kind is not None:
            q += " AND kind = ?"
            args.append(kind)
        q += " ORDER BY seq DESC LIMIT ?"
        args.append(int(limit))
        with self._lock:
            rows = self._conn.execute(q, args).fetchall()
        return [{**json.loads(d), "seq": int(s)} for s, d in rows]

    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        now = time.time()
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                cur = c.execute(
                    "INSERT INTO locks VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET owner = excluded.owner, "
                    "expires = excluded.expires WHERE locks.expires < ? OR locks.owner = excluded.owner",
                    (name, owner, now + ttl_s, now),
                )
                c.execute("COMMIT")
                return cur.rowcount == 1
            except Exception:
                c.execute("ROLLBACK")
                raise

    def release_lock(self, name: str, owner: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5.0)
        for f in {id(f): f for f in (self._feedback_wlock, self._log_wlock) if f is not None}.values():
            f.close()
        with self._lock:
            self._conn.close()
        if self._log_conn is not self._conn:
            with self._log_lock:
                self._log_conn.close()
        if self._read_conn is not self._conn:
            with self._read_lock:
                self._read_conn.close()
