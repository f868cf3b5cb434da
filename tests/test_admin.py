"""Admin API: bearer auth (none configured → 403), fusion parameters (bounds → 422 naming the
parameter, who/when in the history, the tuner's mean reset), the tuner's config, live
bucket stats and history; and the serving side: buckets named in responses, the served log
joined to feedback, rewards tallied once. Runs against both stores."""
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.test_store_support import backend, redis_prefix, settings_for  # noqa: F401 (fixtures)

TOKEN = "s3cret-token"


@pytest.fixture()
def admin(ml_bundle, backend, tmp_path, redis_prefix):
    s = settings_for(backend, tmp_path, redis_prefix, bundle=ml_bundle, admin_token=TOKEN, tuner_poll_seconds=0, fusion_cache_seconds=0)
    with TestClient(create_app(s, background_load=False)) as c:
        c.headers["authorization"] = f"Bearer {TOKEN}"
        yield c


def _users(c, n):
    b = c.app.state.funnel.pipeline.bundle
    return [str(u) for u in b.user_ids[:n]]


def test_no_token_configured_is_403(ml_bundle, tmp_path):
    s = settings_for("sqlite", tmp_path, "x", bundle=ml_bundle, tuner_poll_seconds=0)
    with TestClient(create_app(s, background_load=False)) as c:
        for method, path in [("get", "/admin/fusion"), ("put", "/admin/fusion"), ("get", "/admin/tuner"), ("put", "/admin/tuner"), ("get", "/admin/tuner/history")]:
            r = getattr(c, method)(path, headers={"authorization": "Bearer anything"}, **({"json": {}} if method == "put" else {}))
            assert r.status_code == 403, (path, r.text)
            assert "authorization" in r.json()["message"]


def test_missing_or_wrong_token_is_401(admin):
    assert admin.get("/admin/fusion", headers={"authorization": ""}).status_code == 401
    assert admin.get("/admin/fusion", headers={"authorization": "Bearer nope"}).status_code == 401
    assert admin.get("/admin/fusion", headers={"authorization": f"Basic {TOKEN}"}).status_code == 401
    r = admin.put("/admin/tuner", json={"enabled": True}, headers={"authorization": f"Bearer {TOKEN}x"})
    assert r.status_code == 401 and "authorization" in r.json()["message"]
    assert admin.get("/admin/fusion").status_code == 200


def test_get_fusion_shows_prior_and_bounds(admin):
    body = admin.get("/admin/fusion").json()
    assert body["scene"] == "home" and body["source"] == "settings"
    assert body["params"] == {"click": {"alpha": 0.01, "beta": 1.0}, "like": {"alpha": 0.01, "beta": 0.5}, "dislike": {"alpha": 0.01, "beta": -0.5}}
    assert body["bounds"]["dislike"]["beta"] == [-5.0, -0.01] and body["bounds"]["click"]["alpha"] == [0.0, 1.0]


@pytest.mark.parametrize(
    "params,field",
    [
        ({"click": {"beta": 7.5}}, "params.click.beta"),
        ({"dislike": {"beta": 0.4}}, "params.dislike.beta"),
        ({"like": {"alpha": 2.0}}, "params.like.alpha"),
        ({"nope": {"beta": 1.0}}, "params.nope"),
        ({"click": {"beta": "high"}}, "params.click.beta"),
        ({"click": {"gamma": 1}}, "params.click.gamma"),
        ({"click": {}}, "params.click"),
        ({}, "params"),
    ],
)
def test_put_fusion_outside_bounds_names_the_parameter(admin, params, field):
    r = admin.put("/admin/fusion", json={"params": params})
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]
    assert admin.get("/admin/fusion").json()["source"] == "settings"  # nothing written


def test_put_fusion_serves_records_and_other_scenes(admin):
    r = admin.put("/admin/fusion", json={"params": {"click": {"beta": 2.0}, "dislike": {"alpha": 0.05, "beta": -1.5}}, "note": "more clicks"},
                  headers={"x-admin-user": "alice"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["params"]["click"] == {"alpha": 0.01, "beta": 2.0} and body["params"]["dislike"] == {"alpha": 0.05, "beta": -1.5}
    assert body["source"] == "manual" and body["updated_by"] == "alice" and body["recorded"]["who"] == "alice"
    # served with the new weights, and the served log keeps them for the feedback join
    rec = admin.post("/v1/recommend", json={"user_id": _users(admin, 1)[0], "count": 5}).json()
    assert rec["bucket"] == "main"
    served = admin.app.state.funnel.store.get_served(rec["request_id"])
    assert served.params["click"] == [0.01, 2.0] and served.params["dislike"] == [0.05, -1.5] and served.round_id == -1
    # another scene keeps the prior until it gets its own
    assert admin.get("/admin/fusion", params={"scene": "search"}).json()["params"]["click"]["beta"] == 1.0
    admin.put("/admin/fusion", json={"scene": "search", "params": {"click": {"beta": 0.3}}})
    assert admin.get("/admin/fusion", params={"scene": "search"}).json()["params"]["click"]["beta"] == 0.3
    assert admin.get("/admin/fusion").json()["params"]["click"]["beta"] == 2.0
    h = admin.get("/admin/tuner/history", params={"kind": "manual"}).json()["entries"]
    assert len(h) == 1 and h[0]["who"] == "alice" and h[0]["note"] == "more clicks" and h[0]["at"] > 0
    assert h[0]["before"]["click"]["beta"] == 1.0 and h[0]["after"]["click"]["beta"] == 2.0
    assert admin.get("/admin/tuner/history", params={"scene": "search"}).json()["entries"][0]["who"].startswith("admin@")


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"population": 1}, "population"),
        ({"traffic_share": 1.5}, "traffic_share"),
        ({"algo": "sgd"}, "algo"),
        ({"surprise": 1}, "surprise"),
        ({"min_impressions": "many"}, "min_impressions"),
        ({"algo": "es", "population": 5}, "population"),
        ({"sigma_min": 0.9, "sigma_init": 0.5}, "sigma_min"),
        ({"tasks": ["click", "nope"]}, "tasks"),
        ({"reward_weights": {"poke": 1.0}}, "reward_weights"),
    ],
)
def test_put_tuner_bad_config_names_the_field(admin, patch, field):
    r = admin.put("/admin/tuner", json=patch)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]
    assert admin.get("/admin/tuner").json()["config"]["enabled"] is False


def _enable(c, **kw):
    cfg = {"enabled": True, "traffic_share": 1.0, "population": 4, "min_impressions": 5, "algo": "cem", **kw}
    r = c.put("/admin/tuner", json=cfg)
    assert r.status_code == 200, r.text
    return r.json()


def _session(c, user, events=("impression", "click")):
    rec = c.post("/v1/recommend", json={"user_id": user, "count": 5}).json()
    ev = [{"item_id": i["item_id"], "type": t} for i in rec["items"][:3] for t in events]
    r = c.post("/v1/feedback", json={"request_id": rec["request_id"], "user_id": user, "events": ev})
    assert r.status_code == 202, r.text
    return rec, ev


def test_tuner_buckets_tally_and_close_once(admin):
    live = _enable(admin)
    assert live["config"]["enabled"] and live["state"]["round"] == 1 and "salt" not in live["config"]
    assert set(live["buckets"]) == {"x0", "x1", "x2", "x3", "control", "main"}
    seen = {}
    for u in _users(admin, 40):
        rec, ev = _session(admin, u)
        seen[rec["bucket"]] = seen.get(rec["bucket"], 0) + 1
        served = admin.app.state.funnel.store.get_served(rec["request_id"])
        assert served.round_id == 1 and served.bucket == rec["bucket"]
        assert served.params["click"][1] == pytest.approx(live["buckets"][rec["bucket"]]["beta"]["click"])
    assert set(seen) <= {"x0", "x1", "x2", "x3", "control"} and len(seen) >= 4
    live = admin.get("/admin/tuner").json()
    # three impressions per session, each with a click (reward 1)
    for b, n in seen.items():
        assert live["buckets"][b]["n"] == 3 * n and live["buckets"][b]["sum"] == pytest.approx(3 * n)
    # a replayed feedback call counts nothing
    rec, ev = _session(admin, _users(admin, 41)[-1])
    before = admin.get("/admin/tuner").json()["buckets"][rec["bucket"]]["n"]
    r = admin.post("/v1/feedback", json={"request_id": rec["request_id"], "user_id": _users(admin, 41)[-1], "events": ev})
    assert r.json() == {"accepted": 0, "duplicates": len(ev)}
    assert admin.get("/admin/tuner").json()["buckets"][rec["bucket"]]["n"] == before
    # close: every bucket has >= 5 impressions (top up any thin one)
    fusion = admin.app.state.funnel.fusion
    k = 41
    while any(b["n"] < 5 for name, b in admin.get("/admin/tuner").json()["buckets"].items() if name != "main"):
        k += 1
        _session(admin, f"extra-{k}")
    entry = fusion.maybe_close()
    assert entry is not None and entry["round"] == 1 and entry["reason"] == "impressions" and entry["update"] == "cem"
    assert fusion.maybe_close() is None  # nothing more to close
    h = admin.get("/admin/tuner/history", params={"kind": "round"}).json()["entries"]
    assert len(h) == 1 and set(h[0]["buckets"]) == {"x0", "x1", "x2", "x3", "control", "main"}
    assert all(h[0]["buckets"][b]["n"] >= 5 for b in ("x0", "x1", "x2", "x3", "control"))
    live = admin.get("/admin/tuner").json()
    assert live["state"]["round"] == 2 and live["state"]["rounds_closed"] == 1
    # the served mean is mirrored into the scene's parameters
    fus = admin.get("/admin/fusion").json()
    assert fus["params"]["click"]["beta"] == pytest.approx(live["state"]["mean"]["click"]["beta"])


def test_manual_weights_reset_the_tuner_mean(admin):
    _enable(admin)
    r = admin.put("/admin/fusion", json={"params": {"click": {"beta": 3.0}, "like": {"beta": 0.2}}}, headers={"x-admin-user": "bob"})
    assert r.status_code == 200, r.text
    live = admin.get("/admin/tuner").json()
    assert live["state"]["mean"]["click"]["beta"] == pytest.approx(3.0)
    assert live["state"]["mean"]["like"]["beta"] == pytest.approx(0.2)
    assert live["state"]["last_good_mean"]["click"] == pytest.approx(3.0)
    assert live["state"]["round"] == 2  # a new round around the new mean
    assert live["buckets"]["control"]["beta"]["click"] == pytest.approx(3.0)
    h = admin.get("/admin/tuner/history", params={"kind": "manual"}).json()["entries"][0]
    assert h["who"] == "bob" and h["tuner_mean_reset"] is True and h["round"] == 2


def test_disable_serves_the_mean_to_everyone(admin):
    _enable(admin, algo="es")
    r = admin.put("/admin/tuner", json={"enabled": False})
    assert r.status_code == 200 and r.json()["config"]["enabled"] is False
    rec = admin.post("/v1/recommend", json={"user_id": _users(admin, 1)[0], "count": 5}).json()
    assert rec["bucket"] == "main"
    assert admin.app.state.funnel.store.get_served(rec["request_id"]).round_id == -1
    # re-enabling opens a fresh round
    live = _enable(admin, algo="es")
    assert live["state"]["round"] == 2
    cfgs = admin.get("/admin/tuner/history", params={"kind": "config"}).json()["entries"]
    assert [e["changed"].get("enabled") for e in cfgs] == [True, False, True]


def test_bucket_named_in_every_response(admin):
    _enable(admin, traffic_share=0.5)
    buckets = {admin.post("/v1/recommend", json={"user_id": u, "count": 3}).json()["bucket"] for u in _users(admin, 60)}
    assert "main" in buckets and buckets - {"main"} <= {"x0", "x1", "x2", "x3", "control"} and len(buckets) >= 3
    other = admin.post("/v1/recommend", json={"user_id": _users(admin, 1)[0], "scene": "search", "count": 3}).json()
    assert other["bucket"] == "main"  # only the tuned scene experiments
