"""Faults injected one at a time (issue "Keeps serving under faults, overload and hostile
input"): a recall path raising or running late, the ranker raising or sleeping past its
budget, the fusion and the reranker raising, the state store down (both backends), and
overload past the in-flight limit. Each shows a full, valid feed with the degradation
reported in the response and in /metrics, and, for the store, no acknowledged feedback lost
once it returns. No timing thresholds: a sleep only guarantees a budget is overrun."""
from __future__ import annotations

import gc
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.resilience import RecentServed, drain_spool
from core.settings import Settings
from core.store import ServedRequest
from fusion.formula import fused_log_score
from tests.test_store_support import backend, make_store, redis_prefix, settings_for  # noqa: F401 (fixtures)
from tests.test_store_support import metric as _metric

TOKEN = "fault-token"


class Raising:
    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args):
        raise RuntimeError(f"injected fault in {self.name}")


class Slow:
    """Delegates to the real stage (or recall path) after sleeping."""

    def __init__(self, inner, seconds: float):
        self.inner, self.name, self.seconds = inner, inner.name, seconds

    def __call__(self, *args):
        time.sleep(self.seconds)
        return self.inner(*args)


def _replace_stage(monkeypatch, pipe, name, make):
    stages = list(pipe.stages)
    k = [s.name for s in stages].index(name)
    stages[k] = make(stages[k])
    monkeypatch.setattr(pipe, "stages", stages)


def _replace_path(monkeypatch, pipe, name, make):
    merge = pipe.stage("recall")
    sources = [make(s) if s.name == name else s for s in merge.sources]
    monkeypatch.setattr(merge, "sources", sources)


def _user(c, k=5):
    b = c.app.state.funnel.pipeline.bundle
    return b, str(b.user_ids[k]), k


def _assert_full_valid_feed(c, body, k, count=20):
    b = c.app.state.funnel.pipeline.bundle
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == count and len(set(ids)) == count
    assert all(i in b.item_index for i in ids)
    seen = {str(b.item_ids[i]) for i in b.user_history(k)[0]}
    assert not seen & set(ids), "served already-seen items"
    assert all(np.isfinite(i["score"]) and i["sources"] for i in body["items"])


def _degraded(body) -> set[tuple[str, str]]:
    return {(d["stage"], d["reason"]) for d in body["degraded"]}


def test_healthy_feed_reports_no_degradation(client):
    _, user, _ = _user(client)
    body = client.post("/v1/recommend", json={"user_id": user}).json()
    assert body["degraded"] == []


def test_recall_path_raising_is_skipped(client, monkeypatch):
    pipe = client.app.state.funnel.pipeline
    _replace_path(monkeypatch, pipe, "graph", lambda s: Raising("graph"))
    _, user, k = _user(client)
    r = client.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True})
    assert r.status_code == 200
    body = r.json()
    _assert_full_valid_feed(client, body, k)
    assert ("recall.graph", "error") in _degraded(body)
    assert body["trace"]["recall_paths"]["graph"] == {"n": 0, "error": "RuntimeError"}
    assert not any("graph" in i["sources"] for i in body["items"])
    assert _metric(client, "funnel_degraded_total", stage="recall.graph", reason="error") == 1


def test_recall_path_late_is_dropped(ml_bundle, tmp_path, monkeypatch):
    s = Settings(bundle=ml_bundle, db_path=tmp_path / "state" / "funnel.db", recall_path_budget_ms=5)
    with TestClient(create_app(s, background_load=False)) as c:
        _replace_path(monkeypatch, c.app.state.funnel.pipeline, "ann", lambda p: Slow(p, 0.05))
        _, user, k = _user(c)
        body = c.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True}).json()
        _assert_full_valid_feed(c, body, k)
        assert ("recall.ann", "late") in _degraded(body)
        assert body["trace"]["recall_paths"]["ann"]["dropped"] == "late"
        assert not any("ann" in i["sources"] for i in body["items"])


def test_recall_budget_spent_skips_remaining_paths_but_keeps_the_feed_full(ml_bundle, tmp_path, monkeypatch):
    s = Settings(bundle=ml_bundle, db_path=tmp_path / "state" / "funnel.db", recall_budget_ms=10, recall_path_budget_ms=1000)
    with TestClient(create_app(s, background_load=False)) as c:
        _replace_path(monkeypatch, c.app.state.funnel.pipeline, "ann", lambda p: Slow(p, 0.05))
        _, user, k = _user(c)
        body = c.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True}).json()
        _assert_full_valid_feed(c, body, k)
        got = _degraded(body)
        assert {("recall.itemcf", "budget"), ("recall.graph", "budget")} <= got
        paths = body["trace"]["recall_paths"]
        assert paths["popular"]["n"] > 0 and paths["fresh"]["n"] > 0  # the cheap paths always run


def test_ranker_raising_falls_back_to_the_prerank_order(client, monkeypatch):
    pipe = client.app.state.funnel.pipeline
    _replace_stage(monkeypatch, pipe, "rank", lambda s: Raising("rank"))
    _, user, k = _user(client)
    r = client.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True})
    assert r.status_code == 200
    body = r.json()
    _assert_full_valid_feed(client, body, k)
    assert ("rank", "error") in _degraded(body)
    stages = {t["stage"]: t for t in body["trace"]["stages"]}
    assert stages["rank"]["degraded"] == "error"
    assert body["trace"]["heads"] == {}
    # the pre-ranker's scores, in its order: stage B's fused heads where the bundle has stage B,
    # else stage A's dot products
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    b = pipe.bundle
    ctx = pipe.context(request_id="x", user_id=user, count=20, scene="home", exclude_item_ids=[], events=[])
    pipe.stage("user_tower")(ctx, None)
    items = b.item_index.lookup([i["item_id"] for i in body["items"]])
    if b.prerank is not None:
        from fusion.formula import fused_log_score, params_vectors
        from rank.features import pad_history, ranker_inputs

        feeds = ranker_inputs(pipe.stage("prerank_b").table, np.array([ctx.user_idx]), ctx.user_fields.reshape(1, -1),
                              pad_history(ctx.history, b.schema.history_len).reshape(1, -1), items)
        alpha, beta = params_vectors(b.schema.task_names, ctx.fusion or pipe.fusion_params)
        want = fused_log_score(b.prerank.run(["probs"], feeds)[0], alpha, beta)
    else:
        want = b.item_emb[items] @ ctx.user_emb
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
    assert _metric(client, "funnel_degraded_total", stage="rank", reason="error") == 1


def test_ranker_sleeping_past_budget_is_late_and_rerank_is_skipped(ml_bundle, tmp_path, monkeypatch):
    s = Settings(bundle=ml_bundle, db_path=tmp_path / "state" / "funnel.db", request_budget_ms=100, rank_budget_ms=20, rerank_budget_ms=30)
    with TestClient(create_app(s, background_load=False)) as c:
        pipe = c.app.state.funnel.pipeline
        _replace_stage(monkeypatch, pipe, "rank", lambda st: Slow(st, 0.12))  # past the whole request budget
        _, user, k = _user(c)
        body = c.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True}).json()
        _assert_full_valid_feed(c, body, k)
        assert {("rank", "late"), ("rerank", "budget")} <= _degraded(body)
        # the ranker's output was used (heads present), served in fused order (the rerank fallback)
        assert set(body["trace"]["heads"]) == {"click", "like", "dislike"}
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert _metric(c, "funnel_degraded_total", stage="rerank", reason="budget") == 1


def test_fusion_and_reranker_raising_fall_back(client, monkeypatch):
    pipe = client.app.state.funnel.pipeline
    _replace_stage(monkeypatch, pipe, "rerank", lambda s: Raising("rerank"))
    _, user, k = _user(client)
    body = client.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True}).json()
    _assert_full_valid_feed(client, body, k)
    assert ("rerank", "error") in _degraded(body)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)  # the fused order
    heads = np.array([body["trace"]["heads"][t] for t in pipe.bundle.schema.task_names]).T
    alpha, beta = (np.array([pipe.fusion_params[t][j] for t in pipe.bundle.schema.task_names]) for j in (0, 1))
    np.testing.assert_allclose(scores, fused_log_score(heads, alpha, beta), rtol=1e-3, atol=1e-3)

    _replace_stage(monkeypatch, pipe, "fusion", lambda s: Raising("fusion"))
    body = client.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True}).json()
    _assert_full_valid_feed(client, body, k)
    assert {("fusion", "error"), ("rerank", "error")} <= _degraded(body)
    np.testing.assert_allclose([i["score"] for i in body["items"]], body["trace"]["heads"]["click"], atol=1e-5)


def test_every_stage_failing_still_serves_popular(client, monkeypatch):
    pipe = client.app.state.funnel.pipeline
    for name in ("user_tower", "recall", "prerank_a", "rank", "fusion", "rerank"):
        _replace_stage(monkeypatch, pipe, name, lambda s: Raising(s.name))
    _, user, k = _user(client)
    r = client.post("/v1/recommend", json={"user_id": user, "count": 20})
    assert r.status_code == 200
    body = r.json()
    _assert_full_valid_feed(client, body, k)
    assert {d["stage"] for d in body["degraded"]} == {"user_tower", "recall", "prerank_a", "rank", "fusion", "rerank"}
    assert all(i["sources"] == ["popular"] for i in body["items"])


# ---------------------------------------------------------------------- the state store down


class FlakyStore:
    """A store that fails every call while `down` (as a dead SQLite disk or Redis server would)."""

    def __init__(self, inner, error: type[Exception]):
        self.inner, self.error, self.down = inner, error, False

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr) or name in ("close", "flush_prefix"):
            return attr

        def call(*args, **kwargs):
            if self.down:
                raise self.error("injected: store down")
            return attr(*args, **kwargs)

        return call


def _error_for(backend):
    if backend == "sqlite":
        return sqlite3.OperationalError
    import redis

    return redis.ConnectionError


def test_store_down_keeps_serving_spools_feedback_and_loses_nothing(ml_bundle, backend, tmp_path, redis_prefix):
    s = settings_for(backend, tmp_path, redis_prefix, bundle=ml_bundle, admin_token=TOKEN, tuner_poll_seconds=0,
                     fusion_cache_seconds=0, store_retry_seconds=0, spool_drain_seconds=3600)
    inner = make_store(backend, tmp_path, redis_prefix)
    flaky = FlakyStore(inner, _error_for(backend))
    with TestClient(create_app(s, store=flaky, background_load=False)) as c:
        c.headers["authorization"] = f"Bearer {TOKEN}"
        state = c.app.state.funnel
        r = c.put("/admin/tuner", json={"enabled": True, "traffic_share": 1.0, "population": 2, "min_impressions": 10_000})
        assert r.status_code == 200, r.text
        rnd = r.json()["state"]["round"]
        b, user, k = _user(c, 7)
        first = c.post("/v1/recommend", json={"user_id": user, "count": 20}).json()
        known = inner.get_served(first["request_id"])

        flaky.down = True
        # A full feed, served with the last known fusion weights of the user's bucket.
        r = c.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True})
        assert r.status_code == 200, r.text
        during = r.json()
        _assert_full_valid_feed(c, during, k)
        assert {("history", "store_unavailable"), ("fusion_params", "store_unavailable"), ("served_log", "store_unavailable")} <= _degraded(during)
        assert during["bucket"] == first["bucket"] == known.bucket
        heads = np.array([during["trace"]["heads"][t] for t in b.schema.task_names]).T
        alpha, beta = (np.array([known.params[t][j] for t in b.schema.task_names]) for j in (0, 1))
        np.testing.assert_allclose([i["score"] for i in during["items"]], fused_log_score(heads, alpha, beta), rtol=1e-3, atol=1e-3)

        # Feedback: for a request served before the outage and one served during it.
        ev1 = [{"item_id": i["item_id"], "type": t} for i in first["items"][:3] for t in ("impression", "click")]
        ev2 = [{"item_id": i["item_id"], "type": t} for i in during["items"][:2] for t in ("impression", "click")]
        r = c.post("/v1/feedback", json={"request_id": first["request_id"], "user_id": user, "events": ev1})
        assert r.status_code == 202 and r.json() == {"accepted": 6, "duplicates": 0, "spooled": True}
        r = c.post("/v1/feedback", json={"request_id": during["request_id"], "user_id": user, "events": ev2})
        assert r.status_code == 202 and r.json()["spooled"] is True
        r = c.post("/v1/feedback", json={"request_id": first["request_id"], "user_id": user, "events": ev1[:2]})
        assert r.json() == {"accepted": 0, "duplicates": 2, "spooled": True}
        # still validated against what this worker served
        r = c.post("/v1/feedback", json={"request_id": first["request_id"], "user_id": "someone-else", "events": ev1[:1]})
        assert r.status_code == 422 and "user_id" in r.json()["message"]
        # the next feed already leaves the clicked items out (the spool is read as history)
        clicked = {e["item_id"] for e in ev1 + ev2}
        nxt = c.post("/v1/recommend", json={"user_id": user, "count": 20}).json()
        assert not clicked & {i["item_id"] for i in nxt["items"]}
        # admin needs the store: 503 with Retry-After, not 500
        r = c.get("/admin/fusion")
        assert r.status_code == 503 and r.headers["retry-after"] and "store" in r.json()["message"]
        assert _metric(c, "funnel_store_up") == 0
        assert _metric(c, "funnel_degraded_total", stage="feedback", reason="store_unavailable") == 3
        assert _metric(c, "funnel_spool_events") > 0
        assert drain_spool(state) == (0, 0)  # nothing moves while the store is down

        # The store returns: the spool drains, every acknowledged event is in the store,
        # the served-during-outage request too, and each impression is tallied once.
        flaky.down = False
        n_served, n_events = drain_spool(state)
        assert (n_served, n_events) >= (2, 10)
        assert state.spool.count() == 0 and _metric(c, "funnel_store_up") == 1
        assert inner.feedback_count() == 10
        assert {(i, t) for i, t, _ in inner.user_events(user, 100)} == {(e["item_id"], e["type"]) for e in ev1 + ev2}
        assert inner.get_served(during["request_id"]).bucket == during["bucket"]
        stats = inner.bucket_stats("home", rnd)
        assert sum(st.n for st in stats.values()) == 5 and sum(st.sum for st in stats.values()) == pytest.approx(5.0)
        # a drain replayed after a crash (rows written again) changes nothing
        from core.store import FeedbackEvent

        state.spool.add_feedback(first["request_id"], user, [FeedbackEvent(e["item_id"], e["type"], None, time.time()) for e in ev1])
        assert drain_spool(state) == (0, 6)
        assert inner.feedback_count() == 10
        assert sum(st.n for st in inner.bucket_stats("home", rnd).values()) == 5
        assert c.get("/admin/fusion").status_code == 200
    inner.close()


def test_recent_served_gives_back_what_was_served_and_keeps_it_out_of_the_collector():
    """The worker's LRU of its own served requests returns each as served (feedback is checked
    against it), forgets the oldest past its cap, and its rows are not tracked by the collector:
    full collections do not walk 10,000 served requests."""
    recent = RecentServed(cap=3)
    served = [ServedRequest(f"r{k}", f"u{k}", "b1", {"click": [0.5, 1.0], "dislike": [0.1, -2.0]}, [f"i{k}", "i9"], 1000.0 + k,
                            round_id=k, scene="home") for k in range(4)]
    for s in served:
        recent.put(s)
    assert recent.get("r0") is None and recent.get("nope") is None
    for s in served[1:]:
        got = recent.get(s.request_id)
        assert got == s and got is not s
        got.items.append("i7")  # a caller's copy: the record it came from stays as served
        assert recent.get(s.request_id) == s
    gc.collect()
    assert not any(gc.is_tracked(row) for row in recent._d.values())


def test_spool_is_durable_bounded_and_drops_what_fails_validation(tmp_path):
    from core.spool import Spool, SpoolFull
    from core.store import FeedbackEvent, ServedRequest

    path = tmp_path / "spool.db"
    sp = Spool(path, max_rows=4)
    sp.add_served(ServedRequest("r1", "u", "main", {}, ["a", "b"], time.time()))
    assert sp.add_feedback("r1", "u", [FeedbackEvent("a", "click", None, 1.0), FeedbackEvent("a", "click", None, 1.0)]) == 1
    with pytest.raises(SpoolFull):
        sp.add_feedback("r1", "u", [FeedbackEvent("b", "click", None, 2.0), FeedbackEvent("b", "like", None, 2.0), FeedbackEvent("a", "like", None, 2.0)])
    sp.close()
    sp = Spool(path, max_rows=4)  # reopened (a restart): everything acknowledged is there
    assert sp.count() == 2 and sp.get_served("r1").items == ["a", "b"] and sp.user_events("u", 10) == [("a", "click", 1.0)]
    got = []

    def fail_once(rid, user, events):
        if not got:
            got.append("failed")
            raise ConnectionError("store went away mid-drain")
        got.append((rid, user, [e.item_id for e in events]))

    with pytest.raises(ConnectionError):
        sp.drain(lambda s: None, fail_once)
    assert sp.count() == 1  # the served row went through; the feedback stays for the next drain
    assert sp.drain(lambda s: None, fail_once) == (0, 1) and got[-1] == ("r1", "u", ["a"]) and sp.count() == 0
    sp.close()


# ---------------------------------------------------------------------- overload


class Gate:
    """A rerank stage that waits for the test to open the gate (holds requests in flight)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.open = threading.Event()

    def __call__(self, ctx, cands):
        assert self.open.wait(30), "gate never opened"
        return self.inner(ctx, cands)


def test_overload_sheds_with_503_and_retry_after_while_accepted_requests_succeed(ml_bundle, tmp_path, monkeypatch):
    s = Settings(bundle=ml_bundle, db_path=tmp_path / "state" / "funnel.db", max_inflight=2, retry_after_s=2, request_budget_ms=60_000,
                 rerank_budget_ms=1)
    with TestClient(create_app(s, background_load=False)) as c:
        gate = None

        def make(st):
            nonlocal gate
            gate = Gate(st)
            return gate

        _replace_stage(monkeypatch, c.app.state.funnel.pipeline, "rerank", make)
        _, user, k = _user(c)
        with ThreadPoolExecutor(6) as pool:
            held = [pool.submit(c.post, "/v1/recommend", json={"user_id": user, "count": 20}) for _ in range(2)]
            deadline = time.time() + 30
            while _metric(c, "funnel_inflight") < 2 and time.time() < deadline:  # both admitted and waiting
                time.sleep(0.01)
            assert _metric(c, "funnel_inflight") == 2
            excess = [pool.submit(c.post, "/v1/recommend", json={"user_id": user}) for _ in range(3)]
            excess += [pool.submit(c.post, "/v1/feedback", json={"request_id": "r", "user_id": user, "events": [{"item_id": "1", "type": "click"}]})]
            shed = [f.result(timeout=30) for f in excess]  # answered while the gate is still shut
            assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # never limited
            gate.open.set()
            ok = [f.result(timeout=30) for f in held]
        for r in shed:
            assert r.status_code == 503 and r.headers["retry-after"] == "2" and "overloaded" in r.json()["message"]
        for r in ok:
            assert r.status_code == 200
            _assert_full_valid_feed(c, r.json(), k)
        assert _metric(c, "funnel_shed_total", endpoint="recommend") == 3 and _metric(c, "funnel_shed_total", endpoint="feedback") == 1
        # recovers at once
        assert c.post("/v1/recommend", json={"user_id": user}).status_code == 200
        assert _metric(c, "funnel_inflight") == 0
