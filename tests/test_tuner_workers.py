"""Real processes: two uvicorn workers sharing one store close every round exactly once, and
a server killed with SIGKILL in the middle of a round loses no acknowledged feedback and
resumes the round. Both stores. Bounded in time (every wait has a deadline)."""
import json
import os
import signal
import time

import pytest

from tests.serve_support import Server
from tests.test_store_support import REDIS_URL, backend, redis_available, redis_prefix  # noqa: F401 (fixtures)

TOKEN = "worker-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _env(backend, tmp_path, prefix, bundle, tuner: dict, poll: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNNEL_")}
    env.update({
        "FUNNEL_BUNDLE": str(bundle), "FUNNEL_DB_PATH": str(tmp_path / "state" / "funnel.db"), "FUNNEL_ADMIN_TOKEN": TOKEN,
        "FUNNEL_TUNER": json.dumps(tuner), "FUNNEL_TUNER_POLL_SECONDS": str(poll), "FUNNEL_FUSION_CACHE_SECONDS": "0.1",
    })
    if backend == "redis":
        if not redis_available():
            pytest.skip(f"no Redis at {REDIS_URL}")
        env.update({"FUNNEL_REDIS_URL": REDIS_URL, "FUNNEL_REDIS_PREFIX": prefix})
    return env


def _session(http, user: str, n: int = 3) -> tuple[dict, int]:
    rec = http.post("/v1/recommend", json={"user_id": user, "count": 5})
    assert rec.status_code == 200, rec.text
    rec = rec.json()
    ev = [{"item_id": i["item_id"], "type": "impression"} for i in rec["items"][:n]] + [{"item_id": rec["items"][0]["item_id"], "type": "click"}]
    r = http.post("/v1/feedback", json={"request_id": rec["request_id"], "user_id": user, "events": ev})
    assert r.status_code == 202, r.text
    return rec, r.json()["accepted"]


def test_two_workers_close_each_round_once(ml_bundle, backend, tmp_path, redis_prefix):
    tuner = {"enabled": True, "traffic_share": 1.0, "population": 2, "min_impressions": 6, "max_round_seconds": 1e9}
    srv = Server(_env(backend, tmp_path, redis_prefix, ml_bundle, tuner, poll=0.05), workers=2, tmp_path=tmp_path)
    try:
        srv.wait_ready()
        pids = set()
        deadline = time.time() + 60
        while len(pids) < 2 and time.time() < deadline:
            r = srv.http.get("/admin/tuner", headers=AUTH)
            if r.status_code == 200:
                pids.add(r.json()["worker"]["pid"])
            else:  # the other worker may still be loading its bundle
                time.sleep(0.1)
        assert len(pids) == 2, f"saw workers {pids}"
        k = 0
        deadline = time.time() + 150
        rounds = []
        while len(rounds) < 4:
            assert time.time() < deadline, f"only {len(rounds)} rounds closed"
            _session(srv.http, f"user-{k % 50}")
            k += 1
            if k % 5 == 0:
                rounds = srv.http.get("/admin/tuner/history", params={"kind": "round", "limit": 1000}, headers=AUTH).json()["entries"]
        time.sleep(0.5)  # let both pollers race on whatever is ready now
        rounds = srv.http.get("/admin/tuner/history", params={"kind": "round", "limit": 1000}, headers=AUTH).json()["entries"]
        ids = sorted(e["round"] for e in rounds)
        assert ids == list(range(1, len(ids) + 1)), ids  # each round once, none skipped
        live = srv.http.get("/admin/tuner", headers=AUTH).json()
        assert live["state"]["round"] == len(ids) + 1 and live["state"]["rounds_closed"] == len(ids)
        closers = {e["closed_by"].split(":")[1] for e in rounds}
        assert closers <= {str(p) for p in pids}
        print(f"\n{backend}: {len(ids)} rounds closed by worker pids {sorted(closers)} (workers {sorted(pids)})")
    finally:
        srv.stop()


def test_sigkill_mid_round_loses_nothing_and_resumes(ml_bundle, backend, tmp_path, redis_prefix):
    tuner = {"enabled": True, "traffic_share": 1.0, "population": 2, "min_impressions": 100000, "max_round_seconds": 1e9}
    env = _env(backend, tmp_path, redis_prefix, ml_bundle, tuner, poll=0.1)
    srv = Server(env, workers=1, tmp_path=tmp_path)
    served, acked = [], 0
    try:
        srv.wait_ready()
        for k in range(25):
            rec, n = _session(srv.http, f"user-{k}")
            served.append((f"user-{k}", rec))
            acked += n
        before = srv.http.get("/admin/tuner", headers=AUTH).json()
    finally:
        srv.stop(signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
    assert before["state"]["round"] == 1
    srv = Server(env, workers=1, tmp_path=tmp_path)
    try:
        srv.wait_ready()
        after = srv.http.get("/admin/tuner", headers=AUTH).json()
        assert after["state"]["round"] == 1 and after["state"]["round_started_at"] == before["state"]["round_started_at"]
        n = {b: v["n"] for b, v in after["buckets"].items()}
        assert n == {b: v["n"] for b, v in before["buckets"].items()} and sum(n.values()) == 25 * 3
        assert sum(v["sum"] for v in after["buckets"].values()) == pytest.approx(25.0)  # one click each
        # every acknowledged event is still there: replaying them is all duplicates
        for user, rec in served:
            ev = [{"item_id": i["item_id"], "type": "impression"} for i in rec["items"][:3]] + [{"item_id": rec["items"][0]["item_id"], "type": "click"}]
            r = srv.http.post("/v1/feedback", json={"request_id": rec["request_id"], "user_id": user, "events": ev})
            assert r.json() == {"accepted": 0, "duplicates": 4}
        assert acked == 25 * 4
        # the round resumes: new feedback on pre-crash requests counts toward it, and it closes
        for user, rec in served:
            r = srv.http.post("/v1/feedback", json={"request_id": rec["request_id"], "user_id": user, "events": [{"item_id": rec["items"][1]["item_id"], "type": "like"}]})
            assert r.json()["accepted"] == 1
        r = srv.http.put("/admin/tuner", json={"min_impressions": 1}, headers=AUTH)
        assert r.status_code == 200
        deadline = time.time() + 30
        while not (rounds := srv.http.get("/admin/tuner/history", params={"kind": "round"}, headers=AUTH).json()["entries"]):
            assert time.time() < deadline
            time.sleep(0.1)
        assert [e["round"] for e in rounds] == [1]
        b = rounds[0]["buckets"]
        assert sum(v["n"] for v in b.values()) == 25 * 3 and sum(v["sum"] for v in b.values()) == pytest.approx(25.0 + 25 * 2.0)
    finally:
        srv.stop()
