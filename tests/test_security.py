"""Hostile input and admin security: body size limit (with and without Content-Length),
per-field limits, CORS off by default, the admin token never shown or logged, the Docker
image's non-root user."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.settings import Settings

TOKEN = "very-secret-admin-token-123"


@pytest.fixture()
def small(ml_bundle, tmp_path):
    s = Settings(bundle=ml_bundle, db_path=tmp_path / "state" / "funnel.db", admin_token=TOKEN, max_body_bytes=4096, tuner_poll_seconds=0)
    with TestClient(create_app(s, background_load=False)) as c:
        yield c


def test_body_over_the_limit_is_413_before_it_is_read(small):
    big = {"user_id": "1", "exclude_item_ids": [f"item-{i}" for i in range(1000)]}
    r = small.post("/v1/recommend", json=big)
    assert r.status_code == 413 and r.json()["message"].startswith("body:") and "4096" in r.json()["message"]
    # without Content-Length (chunked): read up to the limit, then refused
    r = small.post("/v1/recommend", content=(b"x" * 1024 for _ in range(10)), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["message"]
    # a chunked body within the limit is served as usual
    r = small.post("/v1/recommend", content=(part for part in [b'{"user_id": ', b'"1", "count": 3}']), headers={"content-type": "application/json"})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert 'funnel_requests_total{endpoint="recommend",status="200"}' in small.get("/metrics").text


@pytest.mark.parametrize("body,field", [
    ({"user_id": "a\x00b"}, "user_id"),
    ({"user_id": "a\nb"}, "user_id"),
    ({"user_id": "x" * 257}, "user_id"),
    ({"user_id": "1", "scene": "home page"}, "scene"),
    ({"user_id": "1", "exclude_item_ids": ["x" * 257]}, "exclude_item_ids[0]"),
    ({"user_id": "1", "count": 20.5}, "count"),
    ({"user_id": "1", "count": True}, "count"),
])
def test_field_limits_name_the_field(small, body, field):
    r = small.post("/v1/recommend", json=body)
    assert r.status_code == 422 and field in r.json()["message"], r.text


def test_integral_float_count_is_an_integer(small):
    r = small.post("/v1/recommend", json={"user_id": "1", "count": 7.0})
    assert r.status_code == 200 and len(r.json()["items"]) == 7


def test_cors_is_off_by_default_and_on_for_listed_origins(small, ml_bundle, tmp_path):
    h = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    assert "access-control-allow-origin" not in small.options("/v1/recommend", headers=h).headers
    assert "access-control-allow-origin" not in small.post("/v1/recommend", json={"user_id": "1"}, headers={"origin": "https://evil.example"}).headers
    s = Settings(bundle=ml_bundle, db_path=tmp_path / "s2" / "funnel.db", cors_origins=["https://app.example"], tuner_poll_seconds=0)
    with TestClient(create_app(s, background_load=False)) as c:
        r = c.post("/v1/recommend", json={"user_id": "1"}, headers={"origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.post("/v1/recommend", json={"user_id": "1"}, headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_admin_token_is_never_shown_or_logged(small, caplog):
    s = small.app.state.funnel.settings
    assert TOKEN not in repr(s) and TOKEN not in str(s.model_dump()) and TOKEN not in s.model_dump_json()
    with caplog.at_level(logging.DEBUG):
        r = small.get("/admin/fusion", headers={"authorization": f"Bearer {TOKEN}x"})
        assert r.status_code == 401 and TOKEN not in r.text
        assert small.get("/admin/fusion", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert small.post("/admin/bundles/reload", json={"version": "nope"}, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert not [rec for rec in caplog.records if TOKEN in rec.getMessage()]
    r = small.get("/admin/fusion", params={"token": "x"}, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and "query.token" in r.json()["message"]


def test_admin_bundle_routes_need_the_token(small, ml_bundle, tmp_path):
    assert small.get("/admin/bundles").status_code == 401
    assert small.post("/admin/bundles/reload").status_code == 401
    s = Settings(bundle=ml_bundle, db_path=tmp_path / "s3" / "funnel.db", tuner_poll_seconds=0)
    with TestClient(create_app(s, background_load=False)) as c:
        assert c.get("/admin/bundles", headers={"authorization": "Bearer x"}).status_code == 403


def test_unknown_route_and_method_use_the_error_shape(small):
    r = small.get("/nope")
    assert r.status_code == 404 and r.json()["message"].startswith("path:")
    r = small.get("/v1/recommend")
    assert r.status_code == 405 and r.json()["message"].startswith("method:")


def test_docker_image_runs_as_a_non_root_user():
    lines = [ln.split() for ln in (Path(__file__).resolve().parents[1] / "Dockerfile").read_text().splitlines()]
    users = [ln[1] for ln in lines if ln and ln[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
