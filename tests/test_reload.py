"""Bundle reloads: a corrupt or broken bundle is refused with the reason and the old one keeps
serving; a good one is swapped in atomically, while a request already running finishes on
the old one; GET /admin/bundles lists the loaded and available versions."""
from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.settings import Settings

TOKEN = "reload-token"


def _copy(src, dst, version=None):
    shutil.copytree(src, dst)
    if version:
        m = json.loads((dst / "manifest.json").read_text())
        m["version"] = version  # the manifest does not checksum itself
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture()
def reloadable(ml_bundle, tmp_path):
    root = tmp_path / "bundles"
    root.mkdir()
    _copy(ml_bundle, root / "v1", "v1")
    s = Settings(bundle=root / "v1", db_path=tmp_path / "state" / "funnel.db", admin_token=TOKEN, tuner_poll_seconds=0)
    with TestClient(create_app(s, background_load=False)) as c:
        c.headers["authorization"] = f"Bearer {TOKEN}"
        yield c, root


def _corrupt_checksum(d):
    p = d / "ranker.onnx"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF  # same size, other bytes
    p.write_bytes(bytes(b))


def _missing_file(d):
    (d / "graph.npz").unlink()


def _wrong_shape(d):
    import numpy as np

    emb = np.load(d / "item_emb.npy")
    np.save(d / "item_emb.npy", emb[:, :-1])
    m = json.loads((d / "manifest.json").read_text())  # manifest rewritten to match the file: only the shape is wrong
    from core.bundle import sha256_file

    m["files"]["item_emb.npy"] = {"sha256": sha256_file(d / "item_emb.npy"), "bytes": (d / "item_emb.npy").stat().st_size}
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("corrupt,reason", [(_corrupt_checksum, "checksum mismatch for ranker.onnx"), (_missing_file, "missing file graph.npz"),
                                            (_wrong_shape, "item_emb.npy has shape")])
def test_broken_bundle_is_refused_and_the_old_one_keeps_serving(reloadable, corrupt, reason):
    c, root = reloadable
    corrupt(_copy(root / "v1", root / "bad", "bad"))
    r = c.post("/admin/bundles/reload", json={"version": "bad"})
    assert r.status_code == 422, r.text
    msg = r.json()["message"]
    assert msg.startswith("body.version: bundle refused, still serving v1") and reason in msg
    assert c.get("/readyz").json()["bundle_version"] == "v1"
    body = c.post("/v1/recommend", json={"user_id": "1", "count": 20}).json()
    assert body["bundle_version"] == "v1" and len(body["items"]) == 20
    assert 'funnel_bundle_reloads_total{result="refused"} 1.0' in c.get("/metrics").text


def test_reload_refusals_name_the_field(reloadable):
    c, root = reloadable
    r = c.post("/admin/bundles/reload", json={"version": "nope"})
    assert r.status_code == 404 and "body.version" in r.json()["message"]
    r = c.post("/admin/bundles/reload", json={"path": "/etc"})
    assert r.status_code == 422 and "body.path" in r.json()["message"] and "inside the bundles directory" in r.json()["message"]
    r = c.post("/admin/bundles/reload", json={"version": "../v1"})
    assert r.status_code == 422 and "body.version" in r.json()["message"]
    r = c.post("/admin/bundles/reload", json={"version": "v1", "path": str(root / "v1")})
    assert r.status_code == 422 and r.json()["message"].startswith("body:")
    assert c.post("/admin/bundles/reload", json={"version": "v1"}, headers={"authorization": "Bearer wrong"}).status_code == 401


class Gate:
    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.entered, self.open = threading.Event(), threading.Event()

    def __call__(self, ctx, cands):
        self.entered.set()
        assert self.open.wait(30)
        return self.inner(ctx, cands)


def test_good_bundle_swaps_atomically_and_in_flight_requests_finish_on_the_old_one(reloadable, monkeypatch):
    c, root = reloadable
    _copy(root / "v1", root / "v2", "v2")
    old = c.app.state.funnel.pipeline
    stages = list(old.stages)
    gate = Gate(stages[-1])
    stages[-1] = gate
    monkeypatch.setattr(old, "stages", stages)
    with ThreadPoolExecutor(2) as pool:
        inflight = pool.submit(c.post, "/v1/recommend", json={"user_id": "1", "count": 20})
        assert gate.entered.wait(30)  # a request is inside the old pipeline
        r = c.post("/admin/bundles/reload", json={"version": "v2"})
        assert r.status_code == 200, r.text
        assert r.json()["loaded"]["version"] == "v2" and r.json()["previous"] == "v1"
        gate.open.set()
        body = inflight.result(timeout=30).json()
    assert body["bundle_version"] == "v1" and len(body["items"]) == 20
    after = c.post("/v1/recommend", json={"user_id": "1", "count": 20}).json()
    assert after["bundle_version"] == "v2" and len(after["items"]) == 20
    listing = c.get("/admin/bundles").json()
    assert listing["loaded"]["version"] == "v2" and listing["loaded"]["loaded_at"] <= time.time()
    assert {b["version"] for b in listing["available"]} == {"v1", "v2"}
    assert 'funnel_bundle_info{dataset="ml-100k",version="v2"} 1.0' in c.get("/metrics").text
    # no body: the configured FUNNEL_BUNDLE again
    r = c.post("/admin/bundles/reload")
    assert r.status_code == 200 and r.json()["loaded"]["version"] == "v1"
