"""The Store contract, run against both backends (SQLite and Redis): served log with TTL,
feedback dedup and real-time history, per-bucket reward statistics updated with the
feedback (exact Σr², a duplicate never counts twice), versioned documents with
compare-and-set, the history (a round recorded at most once), locks, and persistence."""
import math
import threading
import time
import uuid

import numpy as np
import pytest

from core.store import BucketStats, DocWrite, FeedbackEvent, ServedRequest, Tally, history_entry
from tests.test_store_support import backend, make_store, store  # noqa: F401 (fixtures)


def _served(rid="r1", user="u1", ts=None, round_id=3, bucket="x1"):
    return ServedRequest(rid, user, bucket, {"click": [0.01, 1.0]}, ["a", "b", "c"], time.time() if ts is None else ts, round_id, "home")


def test_served_log_roundtrip_and_ttl(store):
    store.log_served(_served())
    got = store.get_served("r1")
    assert got == _served(ts=got.ts) and got.round_id == 3 and got.scene == "home" and got.bucket == "x1"
    assert store.get_served("nope") is None
    # older than the TTL: gone (never stored, or filtered on read)
    store.log_served(_served("old", ts=time.time() - store.served_ttl_s - 5))
    assert store.get_served("old") is None
    # the old positional form (no round, no scene) still works
    store.log_served(ServedRequest("r2", "u", "main", {}, ["a"], time.time()))
    assert store.get_served("r2").round_id == -1


def test_feedback_dedup_and_user_events(store):
    ev = [FeedbackEvent("a", "impression", None, 10.0), FeedbackEvent("a", "click", None, 11.0), FeedbackEvent("b", "dwell", 42.0, 12.0)]
    assert store.add_feedback("r1", "u1", ev) == 3
    assert store.add_feedback("r1", "u1", ev[:2] + [FeedbackEvent("c", "like", None, 13.0)]) == 1
    assert store.add_feedback("r1", "u1", [FeedbackEvent("c", "like", None, 13.0), FeedbackEvent("c", "like", None, 13.0)]) == 0
    assert store.feedback_count() == 4
    got = store.user_events("u1", 10)
    assert [(i, t) for i, t, _ in got] == [("c", "like"), ("b", "dwell"), ("a", "click"), ("a", "impression")]
    assert store.user_events("u1", 2) == got[:2]
    assert store.user_events("nobody", 5) == []


def test_feedback_beyond_one_statement_counts_and_keeps_every_new_event(store):
    # More events than one multi-row INSERT holds (SQLite: 140 a statement), duplicates among them.
    ev = [FeedbackEvent(f"i{k}", "impression", None, 100.0 + k) for k in range(300)]
    assert store.add_feedback("big", "u9", ev + ev[:50]) == 300
    again = ev[250:] + [FeedbackEvent(f"i{k}", "click", None, 500.0 + k) for k in range(200)]
    assert store.add_feedback("big", "u9", again) == 200
    assert store.feedback_count() == 500
    got = store.user_events("u9", 1000)
    assert len(got) == 500 and got[0][:2] == ("i199", "click") and got[-1][:2] == ("i0", "impression")
    assert all(isinstance(ts, float) for _, _, ts in got)


def test_bucket_stats_exact_and_idempotent(store):
    """Rewards of one impression may arrive over several calls; Σr² is exact for the final
    per-impression rewards, and replaying any call changes nothing."""
    t = lambda *r: Tally("home", 7, "x0", tuple(r))  # noqa: E731
    calls = [
        ("r1", [FeedbackEvent("a", "impression", None, 1.0), FeedbackEvent("a", "click", None, 1.0), FeedbackEvent("b", "impression", None, 1.0)], t(0.0, 1.0, 0.0)),
        ("r1", [FeedbackEvent("a", "like", None, 2.0), FeedbackEvent("a", "dwell", 90.0, 2.0)], t(2.0, 1.5)),
        ("r2", [FeedbackEvent("a", "dislike", None, 3.0)], t(-5.0)),
        ("r2", [FeedbackEvent("c", "share", None, 3.0), FeedbackEvent("c", "impression", None, 3.0)], t(3.0, 0.0)),
    ]
    for rid, ev, tally in calls:
        store.add_feedback(rid, "u1", ev, tally)
    for rid, ev, tally in calls:  # replay: all duplicates
        assert store.add_feedback(rid, "u1", ev, tally) == 0
    # impressions: r1/a = 1 + 2 + 1.5 = 4.5, r1/b = 0, r2/a = -5, r2/c = 3
    r = np.array([4.5, 0.0, -5.0, 3.0])
    s = store.bucket_stats("home", 7)
    assert set(s) == {"x0"}
    assert s["x0"].n == 4
    assert s["x0"].sum == pytest.approx(r.sum())
    assert s["x0"].sumsq == pytest.approx((r**2).sum())
    assert s["x0"].mean == pytest.approx(r.mean())
    assert s["x0"].se == pytest.approx(r.std(ddof=1) / 2)
    assert store.bucket_stats("home", 8) == {} and store.bucket_stats("other", 7) == {}
    # a partly duplicate call counts only its new events
    store.add_feedback("r2", "u1", [FeedbackEvent("c", "share", None, 3.0), FeedbackEvent("c", "like", None, 3.0)], t(3.0, 2.0))
    s = store.bucket_stats("home", 7)["x0"]
    r[3] += 2.0
    assert (s.n, s.sum, s.sumsq) == (4, pytest.approx(r.sum()), pytest.approx((r**2).sum()))


def test_docs_compare_and_set(store):
    assert store.get_doc("k") is None
    assert store.commit([DocWrite("k", {"a": 1}, expect=0)])
    assert not store.commit([DocWrite("k", {"a": 2}, expect=0)])
    d = store.get_doc("k")
    assert (d.version, d.value) == (1, {"a": 1})
    assert store.commit([DocWrite("k", {"a": 3}, expect=1)])
    assert not store.commit([DocWrite("k", {"a": 4}, expect=1)])
    assert store.commit([DocWrite("k", {"a": 5})])  # unconditional
    assert store.get_doc("k").version == 3 and store.get_doc("k").value == {"a": 5}
    # all or nothing: one failed expectation writes nothing
    assert not store.commit([DocWrite("j", {"x": 1}, expect=0), DocWrite("k", {"a": 6}, expect=1)], [history_entry("home", "manual", None, {})])
    assert store.get_doc("j") is None and store.get_doc("k").value == {"a": 5}
    assert store.history("home") == []


def test_history_and_round_once(store):
    assert store.commit([DocWrite("t", {"r": 2})], [history_entry("home", "round", 1, {"x": 1.5}, ts=100.0)])
    assert store.commit([], [history_entry("home", "manual", 2, {"who": "me"}, ts=101.0)])
    # a second record of round 1 is refused, and so is the document write with it
    assert not store.commit([DocWrite("t", {"r": 99})], [history_entry("home", "round", 1, {"x": 2})])
    assert store.get_doc("t").value == {"r": 2}
    assert store.commit([], [history_entry("home", "round", 2, {"x": 3}), history_entry("other", "round", 1, {})])
    h = store.history("home")
    assert [(e["kind"], e["round"]) for e in h] == [("round", 2), ("manual", 2), ("round", 1)]
    assert h[-1]["x"] == 1.5 and h[-1]["ts"] == 100.0 and h[1]["who"] == "me"
    assert h[0]["seq"] > h[1]["seq"] > h[2]["seq"]
    assert [e["round"] for e in store.history("home", kind="round")] == [2, 1]
    assert [e["kind"] for e in store.history("home", limit=1, before=h[0]["seq"])] == ["manual"]
    assert len(store.history("other")) == 1


def test_locks(store):
    assert store.acquire_lock("L", "a", 30)
    assert not store.acquire_lock("L", "b", 30)
    assert store.acquire_lock("L", "a", 30)  # the owner may renew
    store.release_lock("L", "b")  # not the owner: no effect
    assert not store.acquire_lock("L", "b", 30)
    store.release_lock("L", "a")
    assert store.acquire_lock("L", "b", 30)
    assert store.acquire_lock("M", "a", 0.2)
    deadline = time.time() + 10
    while not store.acquire_lock("M", "b", 30):  # expires
        assert time.time() < deadline
        time.sleep(0.1)


def test_concurrent_closers_commit_a_round_once(backend, tmp_path):
    """Eight clients (own connections) race to close round 1 under the lock with a
    compare-and-set: exactly one record, one state write."""
    prefix = f"funnel-test:{uuid.uuid4().hex}:"
    stores = [make_store(backend, tmp_path, prefix) for _ in range(8)]
    try:
        stores[0].commit([DocWrite("tuner:home", {"round": 1}, expect=0)])
        wins = []
        barrier = threading.Barrier(len(stores))

        def closer(k, s):
            barrier.wait()
            for _ in range(50):
                if s.acquire_lock("tuner:home", f"w{k}", 30):
                    try:
                        doc = s.get_doc("tuner:home")
                        if doc.value["round"] == 1:
                            ok = s.commit([DocWrite("tuner:home", {"round": 2}, expect=doc.version)], [history_entry("home", "round", 1, {"by": k})])
                            if ok:
                                wins.append(k)
                    finally:
                        s.release_lock("tuner:home", f"w{k}")
                    return
                time.sleep(0.01)

        threads = [threading.Thread(target=closer, args=(k, s)) for k, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert len(stores[0].history("home", kind="round")) == 1
        # without the lock the store alone still refuses a second close of round 1
        doc = stores[1].get_doc("tuner:home")
        assert not stores[2].commit([DocWrite("tuner:home", {"round": 3}, expect=doc.version - 1)], [history_entry("home", "round", 1, {})])
        assert not stores[2].commit([], [history_entry("home", "round", 1, {})])
    finally:
        if backend == "redis":
            stores[0].flush_prefix()
        for s in stores:
            s.close()


def test_state_survives_reopen(backend, tmp_path):
    prefix = f"funnel-test:{uuid.uuid4().hex}:"
    s = make_store(backend, tmp_path, prefix)
    try:
        s.log_served(_served())
        s.add_feedback("r1", "u1", [FeedbackEvent("a", "click", None, 1.0)], Tally("home", 3, "x1", (1.0,)))
        s.commit([DocWrite("tuner:home", {"round": 3})], [history_entry("home", "round", 2, {})])
        s.close()
        s = make_store(backend, tmp_path, prefix)
        assert s.get_served("r1").round_id == 3
        assert s.feedback_count() == 1
        assert s.bucket_stats("home", 3)["x1"] == BucketStats(1, 1.0, 1.0)
        assert s.get_doc("tuner:home").value == {"round": 3}
        assert len(s.history("home")) == 1
    finally:
        if backend == "redis":
            s.flush_prefix()
        s.close()


def test_bucket_stats_math():
    a, b = BucketStats(2, 3.0, 5.0), BucketStats(1, -1.0, 1.0)
    c = a + b
    assert (c.n, c.sum, c.sumsq) == (3, 2.0, 6.0)
    x = np.array([1.0, 2.0, -1.0])
    assert c.var == pytest.approx(x.var(ddof=1)) and c.se == pytest.approx(x.std(ddof=1) / math.sqrt(3))
    assert BucketStats().mean == 0.0 and BucketStats().se == float("inf")


def test_sqlite_checkpoints_off_the_request_path(tmp_path):
    """Request connections never checkpoint (a commit crossing SQLite's threshold would copy
    the WAL and fsync while holding its lock); the store's own thread does, so the WAL's
    pages reach the database file while requests only append."""
    from core.store import SQLiteStore

    path = tmp_path / "funnel.db"
    st = SQLiteStore(path, checkpoint_interval_s=0.05)
    try:
        assert st._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert st._log_conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        before = path.stat().st_size
        for k in range(40):
            st.add_feedback(f"r{k}", "u1", [FeedbackEvent(f"item-{k}-{j}", "impression", None, float(j)) for j in range(50)])
            st.log_served(_served(f"s{k}"))
        deadline = time.time() + 10.0
        while path.stat().st_size <= before and time.time() < deadline:
            time.sleep(0.05)
        assert path.stat().st_size > before  # the rows reached the database file: a checkpoint ran
        assert st.feedback_count() == 2000
    finally:
        st.close()
    assert not st._checkpointer.is_alive()


def test_sqlite_writers_of_two_stores_interleave_without_loss(tmp_path):
    """Two stores on one file (as two workers): feedback and served-log writes from several
    threads each, serialised by the writers' file lock; every row lands once."""
    from core.store import SQLiteStore

    a, b = SQLiteStore(tmp_path / "f.db"), SQLiteStore(tmp_path / "f.db")
    try:
        def work(st, tag):
            for k in range(30):
                st.add_feedback(f"{tag}{k}", "u", [FeedbackEvent("i", "click", None, float(k))])
                st.log_served(_served(f"{tag}s{k}"))

        threads = [threading.Thread(target=work, args=(st, f"{n}-{m}-")) for n, st in enumerate((a, b)) for m in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a.feedback_count() == b.feedback_count() == 120
        assert all(b.get_served(f"{n}-{m}-s{k}") is not None for n in range(2) for m in range(2) for k in range(30))
    finally:
        a.close()
        b.close()


def test_sqlite_served_log_does_not_wait_for_feedback_writes(tmp_path):
    """The served log has a file of its own: a feed's served-log insert goes through while the
    main file's write lock is held (a feedback commit, say, stuck in a slow fsync), and served
    rows an older version kept in the main file are still found."""
    import sqlite3

    from core.store import SQLiteStore

    path = tmp_path / "funnel.db"
    st = SQLiteStore(path)
    try:
        assert (tmp_path / "funnel-served.db").exists()
        st._conn.execute("INSERT INTO served (request_id, user_id, bucket, params, items, ts, round, scene) VALUES (?,?,?,?,?,?,?,?)",
                         ("legacy", "u1", "x1", "{}", '["a"]', time.time(), 3, "home"))
        holder = sqlite3.connect(str(path), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the main file's write lock, held
        try:
            done = threading.Event()
            t = threading.Thread(target=lambda: (st.log_served(_served("fresh")), done.set()), daemon=True)
            t.start()
            assert done.wait(5.0), "served-log insert waited for the main file's write lock"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert st.get_served("fresh").items == ["a", "b", "c"]
        assert st.get_served("legacy").items == ["a"] and st.get_served("legacy").round_id == 3
        assert st._conn.execute("SELECT COUNT(*) FROM served WHERE request_id = 'fresh'").fetchone()[0] == 0
    finally:
        st.close()


def test_sqlite_get_doc_does_not_wait_for_a_write_in_flight(tmp_path):
    """Feeds read their fusion parameters with get_doc: it must not queue behind a feedback
    commit (whose fsync can take ~100 ms on a slow disk). Under WAL it reads the last commit."""
    from core.store import SQLiteStore

    st = SQLiteStore(tmp_path / "s.db")
    try:
        assert st.commit([DocWrite("fusion:home", {"params": {"click": [0.01, 1.0]}})])
        got = []
        with st._lock:  # the write connection is busy (a feedback transaction holds it)
            st._conn.execute("BEGIN IMMEDIATE")
            st._conn.execute("UPDATE docs SET value = '{}' WHERE key = 'fusion:home'")  # not committed
            t = threading.Thread(target=lambda: got.append(st.get_doc("fusion:home")), daemon=True)
            t.start()
            t.join(10)
            st._conn.execute("ROLLBACK")
        assert got, "get_doc waited for the writer"
        assert got[0].value == {"params": {"click": [0.01, 1.0]}}  # the committed value, not the pending one
    finally:
        st.close()


def test_served_request_json_round_trip_and_records_from_before_rounds_and_scenes():
    """One JSON form for a served record (spool, Redis, the worker's LRU); a record written
    before the tuner's round or scenes existed (Redis may still hold one) reads with the defaults."""
    s = ServedRequest("r1", "u1", "b2", {"click": [0.5, 1.0]}, ["i1", "i2"], 1000.5, round_id=3, scene="video")
    assert ServedRequest.from_json(s.to_json()) == s
    old = '{"request_id": "r0", "user_id": "u0", "bucket": "main", "params": {}, "items": ["i1"], "ts": 999.0}'
    assert ServedRequest.from_json(old) == ServedRequest("r0", "u0", "main", {}, ["i1"], 999.0, round_id=-1, scene="home")
