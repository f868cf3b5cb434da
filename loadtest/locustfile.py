"""Locust users for Funnel: each asks for a feed, answers it with feedback drawn from the
synthetic world's behaviour model (impressions down to where the user stopped scrolling,
clicks, dwell, likes, shares, follows, dislikes), then thinks.

Configured by environment variables (`funnel loadtest` sets them):
- FUNNEL_LT_BUNDLE      bundle directory; its manifest's `source.world` rebuilds the world
                        (synthetic bundles only; others get impressions and random clicks)
- FUNNEL_LT_THINK_MIN / FUNNEL_LT_THINK_MAX   think time between feeds, seconds (0.5 / 1.5)
- FUNNEL_LT_FEEDBACK    share of feeds answered with feedback (1.0)
- FUNNEL_LT_COLD        share of requests for unknown (cold-start) users (0.02)
- FUNNEL_LT_COUNT       feed length asked for (20)
- FUNNEL_LT_SEED        random seed (0)
- FUNNEL_LT_RUN_FILE    where to write the wall-clock time and this process's CPU seconds at
                        the test's start and stop (JSON; `funnel loadtest` reads it)

Run by hand (the server must already listen on 127.0.0.1):
    locust -f loadtest/locustfile.py --headless -u 100 -r 50 -t 30s --host http://127.0.0.1:8000
"""
from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path

import gevent
import numpy as np
import orjson
from locust import FastHttpUser, between, events, task

_world_lock = threading.Lock()
_WORLD: dict = {}


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def load_world(bundle: str | os.PathLike | None):
    """(world or None, n_users, user id list or None) for the bundle the server serves."""
    with _world_lock:
        if "n_users" in _WORLD:
            return _WORLD["world"], _WORLD["n_users"], _WORLD["user_ids"]
        world, user_ids, n_users = None, None, 1000
        if bundle:
            manifest = json.loads((Path(bundle) / "manifest.json").read_text())
            src = manifest.get("source", {})
            if src.get("dataset") == "synthetic" and "world" in src:
                from sim.synthetic import SyntheticWorld, WorldConfig

                world = SyntheticWorld(WorldConfig(**src["world"]))
                world.respond(0, np.zeros(1, np.int64), np.random.default_rng(0))  # compiles (or loads) the kernel before any user runs
                n_users = world.n_users  # bundle ids are "u<k>" / "i<k>" in world order
            else:
                with np.load(Path(bundle) / "users.npz", allow_pickle=False) as z:
                    user_ids = [str(u) for u in z["user_ids"]]
                n_users = len(user_ids)
        _WORLD.update(world=world, n_users=n_users, user_ids=user_ids)
        return world, n_users, user_ids


def feedback_events(world, user: int | None, item_ids: list[str], rng: np.random.Generator) -> list[dict]:
    """The events one simulated session produces for a served list (world order = list order)."""
    if not item_ids:
        return []
    if world is None or user is None:
        n = int(rng.integers(1, len(item_ids) + 1))
        ev = [{"item_id": i, "type": "impression"} for i in item_ids[:n]]
        ev += [{"item_id": i, "type": "click"} for i in item_ids[:n] if rng.random() < 0.1]
        return ev
    items = np.array([int(i[1:]) for i in item_ids], np.int64)
    out = {k: v.tolist() for k, v in world.respond(user, items, rng).items()}  # one session, compiled
    ev = []
    for t, iid in enumerate(item_ids):
        if not out["viewed"][t]:
            break
        ev.append({"item_id": iid, "type": "impression"})
        if out["click"][t]:
            ev.append({"item_id": iid, "type": "click"})
            ev.append({"item_id": iid, "type": "dwell", "value": round(out["dwell"][t], 3)})
        for k in ("like", "share", "follow", "dislike"):
            if out[k][t]:
                ev.append({"item_id": iid, "type": k})
    return ev


@events.init.add_listener
def _on_init(environment, **_kw):
    load_world(os.environ.get("FUNNEL_LT_BUNDLE"))
    # Building a 1M-item world blocks gevent's loop for ~15 s, and the loop's clock is only read
    # when it runs: locust's `-t` timer, armed next, would count from before the build, and a
    # "60 s" run sent load for ~45 s. Refresh the clock so the run time counts from here.
    gevent.get_hub().loop.update_now()
    # The world (~140k Python objects at 1M items) lives as long as the process: out of the
    # collector's reach. A full collection walked it in ~65 ms with gevent's loop blocked, and
    # every response due meanwhile was timed that much late.
    gc.collect()
    gc.freeze()


_MARKS: dict[str, dict] = {}


def _mark(key: str) -> None:
    """Tell `funnel loadtest` when this process started and stopped sending load and how much
    CPU it had used before (imports, the world): its figures count only the load itself."""
    _MARKS[key] = {"wall": time.time(), "cpu": time.process_time()}
    path = os.environ.get("FUNNEL_LT_RUN_FILE")
    if path:
        Path(path).write_text(json.dumps(_MARKS))


@events.test_start.add_listener
def _on_test_start(environment, **_kw):
    _mark("start")


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw):
    _mark("stop")


def _fail(r, name: str) -> None:
    """A load-shedding 503 that says when to retry is counted under `<name> shed`, so the
    endpoint's own row holds the accepted requests (their latency is what overload must not
    ruin); any other non-success status stays a failure of the endpoint itself."""
    if r.status_code == 503 and r.headers.get("retry-after"):
        r.request_meta["name"] = f"{name} shed"
    r.failure(f"status {r.status_code}: {r.text[:200]}")


# orjson both ways: the load generator shares the server's two cores, so its own CPU per feed
# is taken from the server's (the stdlib json calls were ~4% of locust's samples under py-spy).
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


class FeedUser(FastHttpUser):
    wait_time = between(_env("FUNNEL_LT_THINK_MIN", 0.5), _env("FUNNEL_LT_THINK_MAX", 1.5))
    _next_seed = 0

    def on_start(self) -> None:
        self.world, self.n_users, self.user_ids = load_world(os.environ.get("FUNNEL_LT_BUNDLE"))
        FeedUser._next_seed += 1
        self.rng = np.random.default_rng([int(_env("FUNNEL_LT_SEED", 0)), FeedUser._next_seed])
        self.feedback_share = _env("FUNNEL_LT_FEEDBACK", 1.0)
        self.cold_share = _env("FUNNEL_LT_COLD", 0.02)
        self.count = int(_env("FUNNEL_LT_COUNT", 20))
        # Arrive at a random point of one think time, as independent users do: users spawned in
        # the same second would otherwise send their first feeds together, a burst that queues
        # behind one compute thread per worker and lands in the p99 of every short run.
        gevent.sleep(self.rng.uniform(0.0, _env("FUNNEL_LT_THINK_MAX", 1.5)))

    def _user(self) -> tuple[str, int | None]:
        if self.rng.random() < self.cold_share:
            return f"cold-{int(self.rng.integers(1 << 30))}", None
        u = int(self.rng.integers(self.n_users))
        return (self.user_ids[u] if self.user_ids is not None else f"u{u}"), u

    @task
    def feed(self) -> None:
        user_id, u = self._user()
        with self.client.post("/v1/recommend", data=orjson.dumps({"user_id": user_id, "count": self.count}), headers=_JSON_HEADERS,
                              name="recommend", catch_response=True) as r:
            if r.status_code != 200:
                _fail(r, "recommend")
                return
            body = orjson.loads(r.content)
            if not body.get("items"):
                r.failure("empty feed")
                return
        if self.rng.random() >= self.feedback_share:
            return
        item_ids = [it["item_id"] for it in body["items"]]
        ev = feedback_events(self.world if u is not None else None, u, item_ids, self.rng)
        if not ev:
            return
        with self.client.post("/v1/feedback", data=orjson.dumps({"request_id": body["request_id"], "user_id": user_id, "events": ev}),
                              headers=_JSON_HEADERS, name="feedback", catch_response=True) as r:
            if r.status_code != 202:
                _fail(r, "feedback")
