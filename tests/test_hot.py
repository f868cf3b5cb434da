"""app/hot.py: valid recommend and feedback calls skip FastAPI's per-request machinery, and
nothing about the answers changes: invalid ones get FastAPI's own answers, errors raised in
the endpoints get the app's handlers and are counted under the route's name."""
import fastapi.routing
import pytest
from fastapi.testclient import TestClient

from app.deps import get_state
from app.main import create_app
from tests.test_store_support import metric


@pytest.fixture()
def solved(monkeypatch):
    """The /v1/* requests FastAPI resolved dependencies for (its per-request path)."""
    calls = []
    real = fastapi.routing.solve_dependencies

    async def counting(*a, **kw):
        if kw["request"].url.path.startswith("/v1/"):
            calls.append(kw["request"].url.path)
        return await real(*a, **kw)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return calls


def _user(c):
    return str(c.app.state.funnel.pipeline.bundle.user_ids[3])


def test_valid_calls_skip_fastapi_and_invalid_ones_get_its_answers(settings, solved):
    with TestClient(create_app(settings, background_load=False)) as c:
        user = _user(c)
        r = c.post("/v1/recommend", json={"user_id": user, "count": 5})
        assert r.status_code == 200 and len(r.json()["items"]) == 5
        rid, item = r.json()["request_id"], r.json()["items"][0]["item_id"]
        r = c.post("/v1/feedback", json={"request_id": rid, "user_id": user, "events": [{"item_id": item, "type": "click"}]})
        assert r.status_code == 202 and r.json() == {"accepted": 1, "duplicates": 0}
        assert solved == []
        # A body that does not validate, one that does not parse, another content type: FastAPI answers.
        r = c.post("/v1/recommend", json={"user_id": user, "count": 0})
        assert r.status_code == 422 and "count" in r.json()["message"]
        r = c.post("/v1/feedback", content=b'{"request_id": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["message"]
        r = c.post("/v1/recommend", content=b'{"user_id": "1"}', headers={"content-type": "text/plain"})
        assert 400 <= r.status_code < 500 and "body" in r.json()["message"]
        # (FastAPI refuses malformed JSON before it resolves dependencies: two, not three)
        assert solved == ["/v1/recommend", "/v1/recommend"]


def test_endpoint_errors_get_the_apps_handlers_and_route_names(settings, solved):
    with TestClient(create_app(settings, background_load=False)) as c:
        user = _user(c)
        before = metric(c, "funnel_requests_total", endpoint="feedback", status="422")
        r = c.post("/v1/feedback", json={"request_id": "never-served", "user_id": user, "events": [{"item_id": "1", "type": "click"}]})
        assert r.status_code == 422 and r.json()["message"].startswith("body.request_id: unknown request_id")
        assert metric(c, "funnel_requests_total", endpoint="feedback", status="422") == before + 1
        assert solved == []  # raised inside the endpoint on the hot path, answered by FieldError's handler


def test_chunked_body_is_read_whole(settings, solved):
    with TestClient(create_app(settings, background_load=False)) as c:
        user = _user(c)
        body = f'{{"user_id": "{user}", "count": 4}}'.encode()
        r = c.post("/v1/recommend", content=iter([body[:7], body[7:]]), headers={"content-type": "application/json"})
        assert r.status_code == 200 and len(r.json()["items"]) == 4
        assert solved == []


def test_dependency_overrides_take_fastapis_path(settings, solved):
    app = create_app(settings, background_load=False)
    seen = []

    async def spy(request: fastapi.Request):
        seen.append(request.url.path)
        return request.app.state.funnel

    app.dependency_overrides[get_state] = spy
    with TestClient(app) as c:
        r = c.post("/v1/recommend", json={"user_id": _user(c), "count": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert seen == ["/v1/recommend"] and solved == ["/v1/recommend"]


def test_a_hot_route_needs_a_fastapi_route_behind_it():
    from app.hot import HotRoute
    from app.routes import recommend
    from app.schemas import RecommendRequest

    with pytest.raises(ValueError, match="/v1/recommendations"):
        HotRoute("/v1/recommendations", RecommendRequest, recommend.hot, recommend.router)
