"""Hostile input: schemathesis against the app's own OpenAPI schema (every operation, valid
and invalid inputs, with and without the admin token): no 500s, no responses outside the
schema; and hypothesis properties of the fusion formula and the recall merge.

Bounded: FUZZ_EXAMPLES examples per operation (env FUNNEL_FUZZ_EXAMPLES to raise it)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import schemathesis
from schemathesis.generation.modes import GenerationMode
from schemathesis.python.asgi import get_client
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.candidates import SOURCE_BITS, Candidates
from core.schema import Schema, TaskSpec
from fusion.formula import FusionBounds, check_params, fused_log_score
from retrieval.merge import MergeModel, merge_candidates

TOKEN = "fuzz-token"
FUZZ_EXAMPLES = int(os.environ.get("FUNNEL_FUZZ_EXAMPLES", "50"))
CASES = {"n": 0, "by_status": {}}


# (method, path, has inputs: negative cases possible)
OPERATIONS = [
    ("POST", "/v1/recommend", True), ("POST", "/v1/feedback", True), ("GET", "/healthz", False), ("GET", "/readyz", False),
    ("GET", "/metrics", False), ("GET", "/admin/fusion", True), ("PUT", "/admin/fusion", True), ("GET", "/admin/tuner", False),
    ("PUT", "/admin/tuner", True), ("GET", "/admin/tuner/history", True), ("GET", "/admin/bundles", False),
    ("POST", "/admin/bundles/reload", True),
]
CASES_ = [(m, p, mode) for m, p, inputs in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
          if inputs or mode == GenerationMode.POSITIVE]


@pytest.fixture(scope="module")
def api(ml_bundle, tmp_path_factory):
    from app.main import create_app
    from core.settings import Settings

    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "bundles").mkdir()
    s = Settings(bundle=ml_bundle, db_path=tmp / "state" / "funnel.db", admin_token=TOKEN, tuner_poll_seconds=0,
                 bundles_dir=tmp / "bundles", spool_drain_seconds=3600)
    app = create_app(s, background_load=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # schemathesis's in-process client starts the app's lifespan once (bundle loaded) and keeps
    # it; the same client is the side door for feeds that positive feedback cases refer to.
    with get_client(app) as side:
        yield schema, side
    print(f"\nschemathesis: {CASES['n']} cases, statuses {dict(sorted(CASES['by_status'].items()))}")


def test_schema_lists_every_operation(api):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api[0].get_all_operations()}
    assert listed == {(m, p) for m, p, _ in OPERATIONS}


def _served_feedback(side, case) -> bool:
    """Point a schema-valid feedback body at a real served request of its user and its items."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("user_id"), str) or not body.get("events"):
        return False
    r = side.post("/v1/recommend", json={"user_id": body["user_id"], "count": 20})
    items = [i["item_id"] for i in r.json()["items"]]
    body["request_id"] = r.json()["request_id"]
    for k, e in enumerate(body["events"]):
        e["item_id"] = items[k % len(items)]
    return True


@pytest.mark.parametrize("method,path,mode", CASES_, ids=lambda v: str(v))
def test_api_never_500s_and_keeps_to_its_schema(api, method, path, mode):
    """Checks: schemathesis's defaults (no server error, status code, content type and body
    conform to the schema, negative data refused, ...) minus two that cannot hold here:
    `positive_data_acceptance` (feedback must name a served request, admin patches must name
    the bundle's tasks: rules no JSON schema states; asserted by hand below where the schema
    says it all) and `ignored_auth` (the token is sent on purpose; tests/test_admin.py and
    tests/test_security.py check that admin routes refuse requests without it)."""
    schema, side = api
    op = schema[path][method]
    headers = {"authorization": f"Bearer {TOKEN}"} if path.startswith("/admin") else None

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def run(case):
        want_ok = mode == GenerationMode.POSITIVE and (path == "/v1/recommend" or (path == "/v1/feedback" and _served_feedback(side, case)))
        response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance, ignored_auth])
        CASES["n"] += 1
        CASES["by_status"][response.status_code] = CASES["by_status"].get(response.status_code, 0) + 1
        assert response.status_code < 500
        if response.status_code >= 400:
            assert response.json()["message"], "an error without a message naming the field"
        if want_ok:
            assert response.status_code in (200, 202), response.text

    run()


# ---------------------------------------------------------------------- fusion formula

SCHEMA = Schema(dataset="t", tasks=(TaskSpec("click"), TaskSpec("like"), TaskSpec("dislike", negative=True)), user_fields=(), item_fields=())
probs = hnp.arrays(np.float32, st.tuples(st.integers(1, 30), st.just(3)), elements=st.floats(0, 1, width=32))
alphas = st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3)
mags = st.lists(st.floats(0.01, 5.0), min_size=3, max_size=3)


@given(probs, alphas, mags)
@settings(max_examples=200, deadline=None)
def test_fusion_is_the_log_of_the_product_and_finite(heads, alpha, mag):
    beta = np.array([mag[0], mag[1], -mag[2]], np.float32)
    alpha = np.array(alpha, np.float32)
    got = fused_log_score(heads, alpha, beta)
    assert got.shape == (len(heads),) and np.isfinite(got).all()
    with np.errstate(divide="ignore"):
        direct = np.prod(np.maximum(heads.astype(np.float64) + alpha, 1e-12) ** beta.astype(np.float64), axis=1)
    np.testing.assert_allclose(got, np.log(direct), rtol=1e-3, atol=1e-3)


@given(probs, alphas, mags, st.floats(0.0, 0.5), st.integers(0, 2))
@settings(max_examples=200, deadline=None)
def test_fusion_rises_with_positive_heads_and_falls_with_negative_ones(heads, alpha, mag, bump, task):
    beta = np.array([mag[0], mag[1], -mag[2]], np.float32)
    alpha = np.array(alpha, np.float32)
    up = heads.copy()
    up[:, task] = np.minimum(up[:, task] + bump, 1.0)
    before, after = fused_log_score(heads, alpha, beta), fused_log_score(up, alpha, beta)
    if SCHEMA.tasks[task].negative:
        assert (after <= before + 1e-5).all()
    else:
        assert (after >= before - 1e-5).all()


@given(st.dictionaries(st.sampled_from(["click", "like", "dislike", "nope"]),
                       st.dictionaries(st.sampled_from(["alpha", "beta", "gamma"]), st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3))),
                       max_size=4))
@settings(max_examples=300, deadline=None)
def test_check_params_accepts_exactly_the_in_bounds_patches(patch):
    bounds = FusionBounds()
    errors = check_params(SCHEMA, bounds, patch)
    ok = True
    for task, w in patch.items():
        if task == "nope":
            ok = False
            continue
        neg = task == "dislike"
        for k, v in w.items():
            if k not in ("alpha", "beta") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                ok = False
            elif k == "alpha":
                ok &= bounds.alpha_min <= v <= bounds.alpha_max
            else:
                lo, hi = bounds.beta_range(neg)
                ok &= lo <= v <= hi
    assert (errors == []) == ok


# ---------------------------------------------------------------------- recall merge

NAMES = list(SOURCE_BITS)


@st.composite
def recall_parts(draw):
    parts = []
    for name in draw(st.lists(st.sampled_from(NAMES), min_size=0, max_size=5, unique=True)):
        items = draw(st.lists(st.integers(0, 60), max_size=40, unique=True))
        scores = draw(st.lists(st.floats(-10, 10, width=32), min_size=len(items), max_size=len(items)))
        parts.append((Candidates.from_source(np.array(items, np.int64), np.array(scores, np.float32), name), draw(st.integers(0, 20))))
    return parts


@given(recall_parts(), st.lists(st.integers(0, 60), max_size=20), st.integers(1, 50), st.floats(0, 2), st.booleans())
@settings(max_examples=300, deadline=None)
def test_merge_dedups_blocks_fills_and_ors_sources(parts, blocked, total, multi_hit, calibrated):
    blocked = np.unique(np.array(blocked, np.int64))
    # learned mode: a model that knows the even parts (odd ones count only as extra paths)
    names = [f"p{k}" for k in range(len(parts))]
    known = names[::2]
    model = MergeModel(
        tuple(known), tuple(np.sort(np.random.default_rng(k).random(8))[::-1] for k in range(len(known))),
        np.random.default_rng(len(parts)).normal(size=3 * len(known) + 2).astype(np.float32),
    ) if calibrated else None
    out = merge_candidates(parts, blocked, total, multi_hit, model, names)
    live = [(c, q) for c, q in parts if q > 0 and len(c)]
    eligible = set()
    for c, _ in live:
        eligible |= set(c.item.tolist()) - set(blocked.tolist())
    got = out.item.tolist()
    assert len(got) == len(set(got)), "duplicates after the merge"
    assert not set(got) & set(blocked.tolist()), "a blocked item came through"
    assert set(got) <= eligible
    assert len(got) == min(total, len(eligible)), "short while candidates remained"
    for i, bits in zip(got, out.source.tolist()):
        want = 0
        for c, _ in live:
            want |= int(np.bitwise_or.reduce(c.source[c.item == i])) if (c.item == i).any() else 0
        assert bits == want
    assert (np.diff(out.score) <= 0).all(), "merged candidates not in priority order"
