"""Scale-out on Redis: two workers (two app instances, each with its own store connection and
feedback-stream consumer) share one key prefix. A click sent to one is reflected in the feed
the other serves next; the tuner's tally, applied from the feedback stream by the consumer
group, counts every impression exactly once, whichever worker took the feedback; a stream
entry delivered twice (a consumer that died holding it) is applied once."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.test_store_support import REDIS_URL, redis_available, redis_prefix, settings_for  # noqa: F401 (fixtures)

TOKEN = "scale-token"
pytestmark = pytest.mark.skipif(not redis_available(), reason=f"no Redis at {REDIS_URL}")


@pytest.fixture()
def two_workers(ml_bundle, tmp_path, redis_prefix):
    def worker(name):
        s = settings_for("redis", tmp_path / name, redis_prefix, bundle=ml_bundle, admin_token=TOKEN, tuner_poll_seconds=0, fusion_cache_seconds=0)
        return TestClient(create_app(s, background_load=False))

    with worker("a") as a, worker("b") as b:
        a.headers["authorization"] = b.headers["authorization"] = f"Bearer {TOKEN}"
        yield a, b


def _feed(c, user, count=20):
    body = c.post("/v1/recommend", json={"user_id": user, "count": count}).json()
    return body, [i["item_id"] for i in body["items"]]


def test_a_click_on_one_worker_shapes_the_next_feed_on_the_other(two_workers):
    a, b = two_workers
    assert a.app.state.funnel is not b.app.state.funnel and a.app.state.funnel.store is not b.app.state.funnel.store
    bundle = a.app.state.funnel.pipeline.bundle
    user = str(bundle.user_ids[11])
    first, before = _feed(a, user)
    clicked = before[:2]
    r = a.post("/v1/feedback", json={"request_id": first["request_id"], "user_id": user, "events": [{"item_id": i, "type": "click"} for i in clicked]})
    assert r.status_code == 202 and r.json() == {"accepted": 2, "duplicates": 0}
    _, after = _feed(b, user)
    assert not set(clicked) & set(after), "the other worker served the clicked items again"
    assert after != [i for i in before if i not in clicked], "the click did not change the other worker's feed"
    # and the other way round: feedback for a request served by b, sent to a, is joined and deduplicated
    second, items = _feed(b, user)
    ev = [{"item_id": items[0], "type": "like"}]
    assert a.post("/v1/feedback", json={"request_id": second["request_id"], "user_id": user, "events": ev}).json() == {"accepted": 1, "duplicates": 0}
    assert b.post("/v1/feedback", json={"request_id": second["request_id"], "user_id": user, "events": ev}).json() == {"accepted": 0, "duplicates": 1}
    _, third = _feed(a, user)
    assert items[0] not in third


def test_stream_tally_counts_each_impression_once_across_workers(two_workers):
    a, b = two_workers
    r = a.put("/admin/tuner", json={"enabled": True, "traffic_share": 1.0, "population": 2, "min_impressions": 10_000})
    assert r.status_code == 200
    rnd = r.json()["state"]["round"]
    users = [str(u) for u in a.app.state.funnel.pipeline.bundle.user_ids[:12]]
    n = 0
    for k, user in enumerate(users):
        serve, send = (a, b) if k % 2 else (b, a)
        body, items = _feed(serve, user, 5)
        ev = [{"item_id": i, "type": t} for i in items[:3] for t in ("impression", "click")]
        assert send.post("/v1/feedback", json={"request_id": body["request_id"], "user_id": user, "events": ev}).status_code == 202
        assert serve.post("/v1/feedback", json={"request_id": body["request_id"], "user_id": user, "events": ev}).json()["accepted"] == 0
        n += 3
    # the consumers (one thread per worker) apply the stream in the background; the stats read
    # catches up with whatever they have not applied yet
    live = b.get("/admin/tuner").json()["buckets"]
    assert sum(v["n"] for v in live.values()) == n and sum(v["sum"] for v in live.values()) == pytest.approx(n)
    store = a.app.state.funnel.store
    assert store.stream_backlog() == 0
    assert sum(s.n for s in store.bucket_stats("home", rnd).values()) == n


def test_a_stream_entry_delivered_twice_is_applied_once(redis_prefix, monkeypatch):
    from core.redis_store import RedisStore
    from core.store import FeedbackEvent, Tally

    s = RedisStore(REDIS_URL, prefix=redis_prefix)
    try:
        ev = [FeedbackEvent("a", "impression", None, 1.0), FeedbackEvent("a", "click", None, 1.0), FeedbackEvent("b", "like", None, 1.0)]
        assert s.add_feedback("r1", "u1", ev, Tally("home", 4, "x0", (0.0, 1.0, 2.0))) == 3
        assert s.add_feedback("r1", "u1", ev, Tally("home", 4, "x0", (0.0, 1.0, 2.0))) == 0  # a duplicate never reaches the stream
        assert s.stream_backlog() == 1
        # consumer "dead" reads the entry and dies before applying it
        got = s.r.xreadgroup(s.GROUP, "dead", {s.stream: ">"}, count=10)
        held = got[0][1]
        assert len(held) == 1
        assert s.consume_feedback("live") == 0  # not claimable yet: "dead" holds it
        # after the claim time another consumer takes it over and applies it
        monkeypatch.setattr(RedisStore, "CLAIM_IDLE_MS", 0)
        s._next_claim = 0.0
        time.sleep(0.01)
        assert s.consume_feedback("live") == 1
        # "dead" wakes up and applies its copy: nothing happens
        assert s._apply_entries(held) == 0
        st = s.bucket_stats("home", 4)["x0"]
        assert (st.n, st.sum, st.sumsq) == (2, pytest.approx(3.0), pytest.approx(1.0 + 4.0))
        assert s.stream_backlog() == 0
    finally:
        s.flush_prefix()
        s.close()
