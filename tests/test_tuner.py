"""The tuner's algorithms and guardrails on synthetic objectives (fast, no bundle), the
store-backed tuner (prior initialisation, one close per round with several closers, both
stores), and a server restart in the middle of a round (both stores)."""
import math
import threading
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.schema import FieldSpec, Schema, TaskSpec
from core.store import BucketStats, DocWrite
from fusion.buckets import CONTROL, MAIN, experiment_buckets
from fusion.formula import FusionBounds, default_params
from fusion.tuner import FusionTuner, TunerConfig, cem_update, centred_ranks, close_round, es_gradient, init_state, open_round
from tests.test_store_support import backend, make_store, redis_prefix, settings_for, store  # noqa: F401 (fixtures)

SCHEMA = Schema("t", (TaskSpec("click"), TaskSpec("like"), TaskSpec("share"), TaskSpec("dislike", negative=True)),
                (FieldSpec("a", 3),), (FieldSpec("c", 3),))
BOUNDS = FusionBounds()
PRIOR = default_params(SCHEMA)  # click 1, like .5, share .5, dislike -.5


def _stats(state, f, n=1000, noise=0.0, rng=None, skip=()):
    """Bucket stats whose mean reward is f(θ of the bucket) (+ gaussian noise)."""
    rnd = state["round"]
    out = {}
    for b in experiment_buckets(rnd["population"]):
        if b in skip:
            continue
        m = f(np.array(rnd["buckets"][b])) + (noise * rng.standard_normal() if noise else 0.0)
        out[b] = BucketStats(n, m * n, (m * m + 1.0) * n)
    return out


def _run(cfg, f, rounds, noise=0.0, seed=0, prior=PRIOR):
    state = open_round(cfg, init_state(cfg, SCHEMA, BOUNDS, prior, 0.0), BOUNDS, 1, 0.0, "salt")
    rng = np.random.default_rng(seed)
    records = []
    for k in range(rounds):
        rec, state = close_round(cfg, state, _stats(state, f, noise=noise, rng=rng), BOUNDS, float(k + 1), "impressions", "me", "salt")
        records.append(rec)
    return state, records


TARGET = np.log(np.array([2.0, 0.2, 0.1, 1.5]))  # optimum in log|β|: click 2, like .2, share .1, dislike -1.5


def quad(theta):
    return 1.0 - 0.05 * float(((theta - TARGET) ** 2).sum())


def test_centred_ranks():
    np.testing.assert_allclose(centred_ranks(np.array([3.0, 1.0, 2.0])), [0.5, -0.5, 0.0])
    np.testing.assert_allclose(centred_ranks(np.array([1.0, 1.0, 2.0, 0.0])), [0.0, 0.0, 0.5, -0.5])
    assert centred_ranks(np.array([5.0])).tolist() == [0.0]


def test_cem_update_formula():
    mu, sigma = np.zeros(2), np.ones(2)
    thetas = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 0.0], [-1.0, 5.0]])
    fit = np.array([0.5, 0.9, 0.1, 0.8])
    m, s, elite = cem_update(mu, sigma, thetas, fit, elite_frac=0.5, smoothing=0.5, extra_noise=0.1)
    assert sorted(elite.tolist()) == [1, 3]
    e = thetas[[1, 3]]
    np.testing.assert_allclose(m, 0.5 * mu + 0.5 * e.mean(0))
    np.testing.assert_allclose(s, np.sqrt(0.5 * 1.0 + 0.5 * e.var(0) + 0.1))


def test_es_gradient_points_uphill_and_ignores_untuned():
    rng = np.random.default_rng(0)
    w = np.array([1.0, -2.0, 0.5, 0.0])
    sigma = np.array([0.3, 0.3, 0.3, 0.0])
    eps = rng.standard_normal((200, 4))
    f = lambda th: th @ w  # noqa: E731
    g = es_gradient(eps, np.array([f(sigma * e) for e in eps]), np.array([f(-sigma * e) for e in eps]), sigma)
    assert g[3] == 0.0
    assert g[:3] @ w[:3] / (np.linalg.norm(g[:3]) * np.linalg.norm(w[:3])) > 0.9


@pytest.mark.parametrize("algo", ["cem", "es"])
def test_converges_on_a_noisy_objective(algo):
    cfg = TunerConfig(enabled=True, algo=algo, population=8, sigma_init=0.5, max_move=0.5)
    start = float(((np.log(np.abs([1.0, 0.5, 0.5, 0.5])) - TARGET) ** 2).sum())
    state, recs = _run(cfg, quad, 40, noise=0.01, seed=1)
    end = float(((np.array(state["mean"]) - TARGET) ** 2).sum())
    assert end < 0.1 * start, (start, end)
    assert all(r["update"] == algo for r in recs)
    # β keeps its sign: the negative task stays negative in every bucket of every round
    assert all(r["buckets"][b]["beta"]["dislike"] < 0 and r["buckets"][b]["beta"]["click"] > 0 for r in recs for b in r["buckets"])


def test_bounds_hold_when_the_optimum_is_outside():
    far = np.log(np.array([50.0, 0.001, 0.5, 0.5]))
    cfg = TunerConfig(enabled=True, algo="cem", population=6, max_move=1.0, sigma_min=0.3)
    state, recs = _run(cfg, lambda th: -float(((th - far) ** 2).sum()), 30)
    lo, hi = BOUNDS.log_beta_range()
    # pressed against the box: within the σ floor of it (elites are clipped samples, so their
    # mean sits a fraction of σ inside the bound)
    assert hi - cfg.sigma_min < state["mean"][0] <= hi and lo <= state["mean"][1] < lo + cfg.sigma_min
    for r in recs:
        for b in r["buckets"].values():
            assert all(BOUNDS.beta_min - 1e-9 <= abs(v) <= BOUNDS.beta_max + 1e-9 for v in b["beta"].values())


def test_move_is_capped_and_sigma_stays_in_its_band():
    cfg = TunerConfig(enabled=True, algo="es", population=6, step_size=10.0, max_move=0.2)
    state, recs = _run(cfg, quad, 5)
    for r in recs:
        before = np.log(np.abs(list(r["mean_before"].values())))
        after = np.log(np.abs(list(r["mean_after"].values())))
        assert np.all(np.abs(after - before) <= 0.2 + 1e-9)
    assert any(r["move_capped"] for r in recs)
    cfg = TunerConfig(enabled=True, algo="cem", population=6, sigma_min=0.2, sigma_init=0.5, sigma_max=0.6, extra_noise=0.0, smoothing=1.0)
    state, _ = _run(cfg, quad, 15)
    assert min(state["sigma"]) >= 0.2 - 1e-12  # elites collapse; the floor holds
    cfg = TunerConfig(enabled=True, algo="cem", population=6, sigma_max=0.6, extra_noise=1.0)
    state, _ = _run(cfg, quad, 3)
    assert max(state["sigma"]) <= 0.6 + 1e-12  # extra noise pushes up; the ceiling holds


def test_prior_initialisation_and_untuned_tasks():
    cfg = TunerConfig(enabled=True, tasks=["click", "dislike"], sigma_init=0.4)
    prior = {"click": (0.02, 2.0), "like": (0.01, 0.7), "share": (0.3, 9.0), "dislike": (0.01, -0.25)}
    st = init_state(cfg, SCHEMA, BOUNDS, prior, 0.0)
    np.testing.assert_allclose(st["mean"], np.log([2.0, 0.7, 5.0, 0.25]))  # share clipped to beta_max
    assert st["alpha"] == [0.02, 0.01, 0.3, 0.01] and st["signs"] == [1.0, 1.0, 1.0, -1.0]
    assert st["sigma"] == [0.4, 0.0, 0.0, 0.4]
    state, _ = _run(cfg, quad, 5, prior=prior)
    assert state["mean"][1:3] == pytest.approx(np.log([0.7, 5.0]).tolist())
    assert state["mean"][0] != pytest.approx(math.log(2.0))


def _round_with(state, explore_mean, control_mean, n=1000, sd=1.0):
    st = {b: BucketStats(n, explore_mean * n, (explore_mean**2 + sd**2) * n) for b in experiment_buckets(state["round"]["population"])}
    st[CONTROL] = BucketStats(n, control_mean * n, (control_mean**2 + sd**2) * n)
    return st


def test_rollback_to_the_last_good_mean():
    cfg = TunerConfig(enabled=True, algo="cem", population=4, rollback_margin=0.1, rollback_z=2.0, baseline_rounds=3, baseline_min_rounds=2,
                      min_impressions=100, rollback_confirm_rounds=2)
    state = open_round(cfg, init_state(cfg, SCHEMA, BOUNDS, PRIOR, 0.0), BOUNDS, 1, 0.0, "s")
    means = []
    for k, ctrl in enumerate([1.0, 1.02, 0.98]):  # three good rounds
        means.append(list(state["mean"]))
        rec, state = close_round(cfg, state, _round_with(state, 1.0, ctrl), BOUNDS, k + 1.0, "impressions", "me", "s")
        assert not rec["rollback"]
    assert len(state["baseline"]) == 3
    good = list(state["last_good_mean"])
    assert good == means[-1]  # the mean served in the last accepted round
    # a small dip inside the margin is no regression
    rec, state = close_round(cfg, state, _round_with(state, 1.0, 0.95), BOUNDS, 4.0, "impressions", "me", "s")
    assert not rec["rollback"] and rec["regressed_rounds"] == 0
    # a big but noisy dip (se ≈ 0.3) is not significant
    rec, state = close_round(cfg, state, _round_with(state, 1.0, 0.7, n=100, sd=3.0), BOUNDS, 5.0, "impressions", "me", "s")
    assert not rec["rollback"] and rec["regressed_rounds"] == 0
    good = list(state["last_good_mean"])
    baseline = list(state["baseline"])
    # one significant regression: held (μ and σ unchanged, the baseline not fed), not rolled back yet
    mu, sigma = list(state["mean"]), list(state["sigma"])
    rec, state = close_round(cfg, state, _round_with(state, 1.0, 0.6), BOUNDS, 6.0, "impressions", "me", "s")
    assert not rec["rollback"] and rec["update"] == "hold" and rec["regressed_rounds"] == 1
    assert state["mean"] == mu and state["sigma"] == sigma and state["baseline"] == baseline
    # a good round in between clears the streak
    rec, state = close_round(cfg, state, _round_with(state, 1.0, 0.97), BOUNDS, 7.0, "impressions", "me", "s")
    assert rec["update"] == "cem" and rec["regressed_rounds"] == 0
    good = list(state["last_good_mean"])
    # two regressed rounds in a row: back to the last good mean, σ re-initialised, baseline restarts
    rec, state = close_round(cfg, state, _round_with(state, 1.0, 0.6), BOUNDS, 8.0, "impressions", "me", "s")
    assert rec["update"] == "hold"
    rec, state = close_round(cfg, state, _round_with(state, 1.0, 0.55), BOUNDS, 9.0, "impressions", "me", "s")
    assert rec["rollback"] and rec["update"] == "rollback" and rec["regressed_rounds"] == 2
    assert state["mean"] == pytest.approx(good)
    assert state["sigma"] == [cfg.sigma_init] * 4 and state["baseline"] == [] and state["regressed_rounds"] == 0
    assert rec["baseline"]["mean"] == pytest.approx(np.mean([0.7, 0.95, 0.97][-3:]))
    # no rollback check until the new baseline has baseline_min_rounds rounds
    rec, state = close_round(cfg, state, _round_with(state, 1.0, 0.3), BOUNDS, 10.0, "impressions", "me", "s")
    assert not rec["rollback"] and len(state["baseline"]) == 1


def test_rollback_on_the_first_regressed_round_when_configured():
    cfg = TunerConfig(enabled=True, algo="es", population=4, rollback_z=2.0, baseline_min_rounds=2, min_impressions=100, rollback_confirm_rounds=1)
    state = open_round(cfg, init_state(cfg, SCHEMA, BOUNDS, PRIOR, 0.0), BOUNDS, 1, 0.0, "s")
    for k, ctrl in enumerate([1.0, 1.0, 1.0]):
        rec, state = close_round(cfg, state, _round_with(state, 1.0, ctrl), BOUNDS, k + 1.0, "impressions", "me", "s")
    good = list(state["last_good_mean"])
    rec, state = close_round(cfg, state, _round_with(state, 1.0, 0.5), BOUNDS, 4.0, "impressions", "me", "s")
    assert rec["rollback"] and state["mean"] == pytest.approx(good)


def test_confirmation_cuts_false_rollbacks_under_heavy_tailed_noise():
    """A flat objective (nothing regresses) measured through heavy-tailed round-to-round noise,
    as tune-sim's rounds are (a round swings by several of its standard errors now and then).
    Requiring two regressed rounds in a row cuts the false rollbacks several-fold (measured
    over these seeds: 31 with one round, 5 with two, in 1000 rounds)."""

    def false_rollbacks(confirm):
        total = 0
        for seed in range(5):
            cfg = TunerConfig(enabled=True, algo="cem", population=4, min_impressions=100, rollback_confirm_rounds=confirm)
            state = open_round(cfg, init_state(cfg, SCHEMA, BOUNDS, PRIOR, 0.0), BOUNDS, 1, 0.0, "s")
            rng = np.random.default_rng(seed)
            for k in range(200):
                ctrl = 0.45 + 0.035 * rng.standard_t(3)  # per-impression SE: 0.033
                rec, state = close_round(cfg, state, _round_with(state, 0.45, ctrl, n=2000, sd=1.47), BOUNDS, k + 1.0, "impressions", "me", "s")
                total += rec["rollback"]
        return total

    one, two = false_rollbacks(1), false_rollbacks(2)
    assert one >= 10, "the noise must trip the single-round check, or this test shows nothing"
    assert two * 4 <= one, (one, two)


def test_daily_sigma_reinit_and_timeout_close():
    cfg = TunerConfig(enabled=True, algo="cem", population=4, sigma_init=0.5, sigma_min=0.05, extra_noise=0.0, smoothing=1.0, sigma_reinit_seconds=86400.0)
    state = open_round(cfg, init_state(cfg, SCHEMA, BOUNDS, PRIOR, 0.0), BOUNDS, 1, 0.0, "s")
    rec, state = close_round(cfg, state, _stats(state, quad), BOUNDS, 3600.0, "impressions", "me", "s")
    assert not rec["sigma_reinit"] and max(state["sigma"]) < 0.5
    rec, state = close_round(cfg, state, _stats(state, quad), BOUNDS, 86400.0 + 1, "impressions", "me", "s")
    assert rec["sigma_reinit"] and state["sigma"] == [0.5] * 4 and state["sigma_reset_at"] == 86401.0
    # a timeout with one usable exploration bucket: CEM cannot rank, the mean stays
    before = list(state["mean"])
    stats = _stats(state, quad, skip=("x1", "x2", "x3"))
    rec, state = close_round(cfg, state, stats, BOUNDS, 90000.0, "timeout", "me", "s")
    assert rec["update"] == "skipped" and state["mean"] == before and rec["reason"] == "timeout"
    assert not rec["buckets"]["x1"]["usable"] and rec["buckets"]["x0"]["usable"]
    assert state["round"]["id"] == 4  # the next round is open anyway


# ----------------------------------------------------------------------------- the store-backed tuner


def _tuner(store, **cfg):
    return FusionTuner(store, "home", SCHEMA, BOUNDS, PRIOR, TunerConfig(**cfg))


def test_store_backed_prior_and_ready(store):
    store.commit([DocWrite("fusion:home", {"params": {"click": [0.05, 3.0]}})])
    t = _tuner(store, enabled=True, population=2, min_impressions=10)
    doc = t.load()
    st = doc.value["state"]
    assert st["round"]["id"] == 1 and st["mean"][0] == pytest.approx(math.log(3.0)) and st["alpha"][0] == 0.05
    assert t.maybe_close() is None  # nothing measured yet
    from core.store import Tally, FeedbackEvent

    for b in experiment_buckets(2):
        store.add_feedback(f"r-{b}", "u", [FeedbackEvent(f"i{k}", "click", None, 0.0) for k in range(10)], Tally("home", 1, b, (1.0,) * 10))
    entry = t.maybe_close()
    assert entry["round"] == 1 and entry["kind"] == "round"
    assert t.load().value["state"]["round"]["id"] == 2
    assert t.maybe_close() is None


def test_many_closers_close_a_round_once(backend, tmp_path):
    """Eight workers (own store connections) find the round ready at once: one record."""
    from core.store import FeedbackEvent, Tally

    prefix = f"funnel-test:{uuid.uuid4().hex}:"
    stores = [make_store(backend, tmp_path, prefix) for _ in range(8)]
    try:
        tuners = [_tuner(s, enabled=True, population=2, min_impressions=5) for s in stores]
        tuners[0].load()
        for b in experiment_buckets(2):
            stores[0].add_feedback(f"r-{b}", "u", [FeedbackEvent(f"i{k}", "impression", None, 0.0) for k in range(5)], Tally("home", 1, b, (0.0,) * 5))
        results = []
        barrier = threading.Barrier(len(tuners))

        def go(t):
            barrier.wait()
            results.append(t.maybe_close())

        threads = [threading.Thread(target=go, args=(t,)) for t in tuners]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        closed = [r for r in results if r is not None]
        assert len(closed) == 1 and closed[0]["round"] == 1
        assert [e["round"] for e in stores[3].history("home", kind="round")] == [1]
        assert tuners[5].load().value["state"]["round"]["id"] == 2
    finally:
        if backend == "redis":
            stores[0].flush_prefix()
        for s in stores:
            s.close()


# ----------------------------------------------------------------------------- restart mid-round


def test_restart_mid_round_keeps_feedback_and_resumes(ml_bundle, backend, tmp_path, redis_prefix):
    from app.main import create_app

    settings = settings_for(backend, tmp_path, redis_prefix, bundle=ml_bundle, admin_token="t", tuner_poll_seconds=0)
    auth = {"authorization": "Bearer t"}
    acked, served = 0, []
    with TestClient(create_app(settings, background_load=False)) as c:
        r = c.put("/admin/tuner", json={"enabled": True, "traffic_share": 1.0, "population": 2, "min_impressions": 1000}, headers=auth)
        assert r.status_code == 200
        users = [str(u) for u in c.app.state.funnel.pipeline.bundle.user_ids[:30]]
        for u in users:
            rec = c.post("/v1/recommend", json={"user_id": u, "count": 6}).json()
            served.append((u, rec))
            ev = [{"item_id": i["item_id"], "type": "impression"} for i in rec["items"][:3]] + [{"item_id": rec["items"][0]["item_id"], "type": "click"}]
            r = c.post("/v1/feedback", json={"request_id": rec["request_id"], "user_id": u, "events": ev})
            acked += r.json()["accepted"]
        before = c.get("/admin/tuner", headers=auth).json()
        count_before = c.app.state.funnel.store.feedback_count()
    assert before["state"]["round"] == 1 and acked == count_before == 30 * 4
    n_before = {b: v["n"] for b, v in before["buckets"].items()}
    assert sum(n_before.values()) == 30 * 3
    # a new server on the same store: same round, every acknowledged event and its reward kept
    with TestClient(create_app(settings, background_load=False)) as c:
        after = c.get("/admin/tuner", headers=auth).json()
        assert after["state"]["round"] == 1 and after["state"]["round_started_at"] == before["state"]["round_started_at"]
        assert {b: v["n"] for b, v in after["buckets"].items()} == n_before
        assert {b: v["sum"] for b, v in after["buckets"].items()} == pytest.approx({b: v["sum"] for b, v in before["buckets"].items()})
        assert c.app.state.funnel.store.feedback_count() == count_before
        # feedback for requests served before the restart still joins their round and bucket
        for u, rec in served:
            ev = [{"item_id": i["item_id"], "type": "like"} for i in rec["items"][:1]] + [{"item_id": rec["items"][0]["item_id"], "type": "click"}]
            r = c.post("/v1/feedback", json={"request_id": rec["request_id"], "user_id": u, "events": ev})
            assert r.json() == {"accepted": 1, "duplicates": 1}
        live = c.get("/admin/tuner", headers=auth).json()
        assert {b: v["n"] for b, v in live["buckets"].items()} == n_before  # same impressions, more reward
        assert sum(v["sum"] for v in live["buckets"].values()) == pytest.approx(30 * (1.0 + 2.0))
        # the round closes with everything it got on both sides of the restart
        c.put("/admin/tuner", json={"min_impressions": 1}, headers=auth)
        entry = c.app.state.funnel.fusion.maybe_close()
        assert entry["round"] == 1
        assert sum(entry["buckets"][b]["n"] for b in experiment_buckets(2) + [MAIN]) == 30 * 3
        assert sum(entry["buckets"][b]["sum"] for b in experiment_buckets(2) + [MAIN]) == pytest.approx(90.0)
