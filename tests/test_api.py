"""HTTP contract: recommend, feedback (dedup, durability across restart, effect on the
next feed), health/readiness/metrics, and every bad input from the foundation issue."""
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.settings import Settings


def _known_user(client):
    b = client.app.state.funnel.pipeline.bundle
    return b, str(b.user_ids[5])


def test_recommend_known_user(client):
    b, user = _known_user(client)
    r = client.post("/v1/recommend", json={"user_id": user, "count": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 20 and len(set(ids)) == 20
    seen = {str(b.item_ids[i]) for i in b.user_history(5)[0]}
    assert not seen & set(ids), "served already-seen items"
    sources = {s for i in body["items"] for s in i["sources"]}
    assert len(sources) >= 2
    assert body["bundle_version"] == b.version and body["bucket"] == "main" and "trace" not in body
    scores = [i["score"] for i in body["items"]]
    pipe = client.app.state.funnel.pipeline
    if pipe.settings.rerank_mode == "sort":
        assert scores == sorted(scores, reverse=True)
    else:  # beam/greedy reorder by the list reward; every item keeps its fused score
        from fusion.formula import fused_log_score

        dbg = client.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True}).json()
        heads = np.array([dbg["trace"]["heads"][t] for t in b.schema.task_names]).T
        alpha, beta = (np.array([pipe.fusion_params[t][k] for t in b.schema.task_names]) for k in (0, 1))
        np.testing.assert_allclose([i["score"] for i in dbg["items"]], fused_log_score(heads, alpha, beta), rtol=1e-3, atol=1e-3)


def test_recommend_debug_trace(client):
    _, user = _known_user(client)
    body = client.post("/v1/recommend", json={"user_id": user, "count": 5, "debug": True}).json()
    stages = [s["stage"] for s in body["trace"]["stages"]]
    assert stages == ["user_tower", "recall", "prerank_a", "prerank_b", "rank", "fusion", "rerank"]
    recall = body["trace"]["stages"][1]
    assert recall["n_out"] > 0 and recall["sources"]
    assert set(body["trace"]["recall_paths"]) == {"ann", "itemcf", "graph", "popular", "fresh"}
    assert set(body["trace"]["heads"]) == {"click", "like", "dislike"}
    assert all(len(v) == 5 for v in body["trace"]["heads"].values())


def test_cold_start_user_gets_popular_and_fresh(client):
    r = client.post("/v1/recommend", json={"user_id": "never-seen-before", "count": 20})
    assert r.status_code == 200
    items = r.json()["items"]
    assert len(items) == 20
    assert all(set(i["sources"]) <= {"popular", "fresh"} for i in items)


def test_exclusions_are_honoured(client):
    _, user = _known_user(client)
    first = [i["item_id"] for i in client.post("/v1/recommend", json={"user_id": user}).json()["items"]]
    second = client.post("/v1/recommend", json={"user_id": user, "exclude_item_ids": first[:10] + ["not-an-item"]}).json()
    assert not set(first[:10]) & {i["item_id"] for i in second["items"]}
    assert len(second["items"]) == 20


@pytest.mark.parametrize(
    "body,field,status",
    [
        ({"count": 5}, "user_id", 422),
        ({"user_id": "1", "count": 0}, "count", 422),
        ({"user_id": "1", "count": 201}, "count", 422),
        ({"user_id": 1}, "user_id", 422),
        ({"user_id": "1", "count": "20"}, "count", 422),
        ({"user_id": "1", "debug": "yes"}, "debug", 422),
        ({"user_id": "1", "exclude_item_ids": "a"}, "exclude_item_ids", 422),
        ({"user_id": "1", "exclude_item_ids": [str(i) for i in range(1001)]}, "exclude_item_ids", 422),
        ({"user_id": "1", "surprise": 1}, "surprise", 422),
        ({"user_id": ""}, "user_id", 422),
    ],
)
def test_recommend_bad_input_names_the_field(client, body, field, status):
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == status, r.text
    assert field in r.json()["message"]


def test_malformed_json_is_400(client):
    r = client.post("/v1/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "body" in r.json()["message"]
    r = client.post("/v1/feedback", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400


def _serve(client, user, count=10):
    body = client.post("/v1/recommend", json={"user_id": user, "count": count}).json()
    return body["request_id"], [i["item_id"] for i in body["items"]]


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"events": [{"item_id": "X", "type": "poke"}]}, "events[0].type"),
        ({"events": []}, "events"),
        ({"request_id": "no-such-request"}, "request_id"),
        ({"user_id": "someone-else"}, "user_id"),
        ({"events": [{"item_id": "not-served", "type": "click"}]}, "events[0].item_id"),
        ({"events": [{"item_id": "X", "type": "dwell", "value": "long"}]}, "events[0].value"),
        ({"events": [{"item_id": "X", "type": "click", "extra": 1}]}, "events[0].extra"),
    ],
)
def test_feedback_bad_input_names_the_field(client, patch, field):
    _, user = _known_user(client)
    rid, items = _serve(client, user)
    body = {"request_id": rid, "user_id": user, "events": [{"item_id": items[0], "type": "click"}]}
    body.update(patch)
    for e in body["events"]:
        if e.get("item_id") == "X":
            e["item_id"] = items[0]
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]


def test_feedback_dedup_and_durability_across_restart(settings):
    with TestClient(create_app(settings, background_load=False)) as c:
        _, user = _known_user(c)
        rid, items = _serve(c, user)
        events = [{"item_id": items[0], "type": "impression"}, {"item_id": items[0], "type": "click"}, {"item_id": items[1], "type": "dwell", "value": 42}]
        r = c.post("/v1/feedback", json={"request_id": rid, "user_id": user, "events": events})
        assert r.status_code == 202 and r.json() == {"accepted": 3, "duplicates": 0}
        r = c.post("/v1/feedback", json={"request_id": rid, "user_id": user, "events": events[:2] + [{"item_id": items[2], "type": "like"}]})
        assert r.status_code == 202 and r.json() == {"accepted": 1, "duplicates": 2}
    # A new app on the same state file still has every acknowledged event, and serves after it.
    with TestClient(create_app(settings, background_load=False)) as c:
        st = c.app.state.funnel.store
        assert st.feedback_count() == 4
        types = sorted(t for _, t, _ in st.user_events(user, 100))
        assert types == ["click", "dwell", "impression", "like"]
        r = c.post("/v1/feedback", json={"request_id": rid, "user_id": user, "events": events})
        assert r.json()["duplicates"] == 3
        after = {i["item_id"] for i in c.post("/v1/recommend", json={"user_id": user, "count": 50}).json()["items"]}
        assert not after & {items[0], items[1], items[2]}


def test_feedback_after_the_served_log_ttl_is_refused(settings):
    """Within the TTL feedback is checked against this worker's own copy of the served request
    (no store read); past it the request counts as expired, as the store's served log has it."""
    import time

    settings = settings.model_copy(update={"served_log_ttl_s": 1.0})
    with TestClient(create_app(settings, background_load=False)) as c:
        _, user = _known_user(c)
        rid, items = _serve(c, user)
        ev = {"request_id": rid, "user_id": user, "events": [{"item_id": items[0], "type": "impression"}]}
        assert c.app.state.funnel.recent_served.get(rid) is not None
        r = c.post("/v1/feedback", json=ev)
        assert r.status_code == 202 and r.json() == {"accepted": 1, "duplicates": 0}
        time.sleep(1.2)
        r = c.post("/v1/feedback", json={**ev, "events": [{"item_id": items[1], "type": "impression"}]})
        assert r.status_code == 422 and "request_id" in r.json()["message"], r.text
        assert c.app.state.funnel.store.feedback_count() == 1


def test_click_changes_the_next_feed(client):
    """The clicked item leaves the feed and its item-CF neighbours can enter."""
    b, _ = _known_user(client)
    pipe = client.app.state.funnel.pipeline
    user = str(b.user_ids[11])
    rid, before = _serve(client, user, count=20)
    clicked = before[0]
    r = client.post("/v1/feedback", json={"request_id": rid, "user_id": user, "events": [{"item_id": clicked, "type": "click"}]})
    assert r.status_code == 202
    _, after = _serve(client, user, count=20)
    assert clicked not in after
    assert after != [i for i in before if i != clicked], "the click did not change the feed"
    # The clicked item now seeds item-CF: its neighbours lead that path's candidates.
    st = client.app.state.funnel.store
    ctx = pipe.context(request_id="x", user_id=user, count=20, scene="home", exclude_item_ids=[], events=st.user_events(user, 200), seed=0)
    ci = b.item_index[clicked]
    assert ctx.history[0] == ci
    neigh = b.itemcf_indices[b.itemcf_indptr[ci] : b.itemcf_indptr[ci + 1]]
    itemcf = next(s for s in pipe.stage("recall").sources if s.name == "itemcf")
    top = itemcf(ctx).item[:50]
    assert np.isin(neigh[:10], top).sum() >= 5


def test_health_ready_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    client.post("/v1/recommend", json={"user_id": "1"})
    text = client.get("/metrics").text
    assert 'funnel_stage_seconds_count{stage="rank"}' in text
    assert "funnel_bundle_info" in text


def test_not_ready_without_bundle(tmp_path):
    s = Settings(bundle=tmp_path / "missing", db_path=tmp_path / "s.db")
    with TestClient(create_app(s, background_load=False)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "funnel build" in r.json()["reason"]
        r = c.post("/v1/recommend", json={"user_id": "1"})
        assert r.status_code == 503 and "bundle" in r.json()["message"]


def test_serve_without_bundle_exits_with_instructions(tmp_path):
    from typer.testing import CliRunner

    from app.cli import app

    res = CliRunner().invoke(app, ["serve", "--bundle", str(tmp_path / "none")])
    assert res.exit_code == 2
    assert "funnel build --dataset ml-100k" in res.output


def test_cold_user_feedback_personalises_the_next_feed(client):
    user = "brand-new-user"
    rid, items = _serve(client, user, count=20)
    r = client.post("/v1/feedback", json={"request_id": rid, "user_id": user, "events": [{"item_id": items[0], "type": "click"}, {"item_id": items[1], "type": "like"}]})
    assert r.status_code == 202
    body = client.post("/v1/recommend", json={"user_id": user, "count": 20, "debug": True}).json()
    ids = [i["item_id"] for i in body["items"]]
    assert items[0] not in ids and items[1] not in ids
    paths = body["trace"]["recall_paths"]
    assert paths["itemcf"]["n"] > 0 and paths["ann"]["n"] > 0
    assert any(set(i["sources"]) - {"popular", "fresh"} for i in body["items"])


def test_debug_trace_reports_the_reranker(client):
    _, user = _known_user(client)
    body = client.post("/v1/recommend", json={"user_id": user, "count": 10, "debug": True}).json()
    assert body["trace"]["rerank"], "the reranker's notes are missing from the trace"


def test_worker_sets_the_configured_gil_switch_interval(settings):
    """Each worker process applies FUNNEL_GIL_SWITCH_INTERVAL_MS when its app starts."""
    import sys

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        with TestClient(create_app(settings.model_copy(update={"gil_switch_interval_ms": 2.5}), background_load=False)) as c:
            assert c.get("/healthz").status_code == 200
            assert sys.getswitchinterval() == pytest.approx(0.0025)
    finally:
        sys.setswitchinterval(before)
