"""Fusion formula (log space = product, negative tasks lower the score), the additive
baseline, bounds and their validation, traffic buckets, and the per-impression reward."""
import math
from collections import Counter

import numpy as np
import pytest

from core.candidates import Candidates
from core.context import RequestContext
from core.schema import FieldSpec, Schema, TaskSpec
from fusion.buckets import CONTROL, MAIN, assign_bucket, experiment_buckets, unit_hash
from fusion.formula import AdditiveFusion, FusionBounds, MultiplicativeFusion, check_params, default_params, fused_log_score
from fusion.reward import DEFAULT_WEIGHTS, event_reward, event_rewards
from core.store import FeedbackEvent

SCHEMA = Schema("t", (TaskSpec("click"), TaskSpec("like", given="click"), TaskSpec("dislike", negative=True)), (FieldSpec("a", 3),), (FieldSpec("c", 3),))


def _ctx(fusion=None):
    z = np.zeros(0, np.int64)
    return RequestContext("r", "u", 0, z, z, np.zeros(0), z, z, fusion=fusion or {})


def test_multiplicative_in_log_space_matches_the_product():
    rng = np.random.default_rng(0)
    heads = rng.random((50, 3)).astype(np.float32)
    params = {"click": (0.01, 1.3), "like": (0.1, 0.4), "dislike": (0.02, -0.7)}
    alpha = np.array([0.01, 0.1, 0.02], np.float32)
    beta = np.array([1.3, 0.4, -0.7], np.float32)
    prod = np.prod((heads + alpha) ** beta, axis=1)
    got = fused_log_score(heads, alpha, beta)
    np.testing.assert_allclose(np.exp(got), prod, rtol=1e-4)
    cands = Candidates(np.arange(50, dtype=np.int64), np.ones(50, np.uint32), np.zeros(50, np.float32), heads)
    out = MultiplicativeFusion(SCHEMA, default_params(SCHEMA))(_ctx(params), cands)  # ctx.fusion overrides
    np.testing.assert_allclose(out.score, got, rtol=1e-5)
    # a higher negative head lowers the score; a higher positive head raises it
    h = np.array([[0.2, 0.3, 0.1], [0.2, 0.3, 0.5], [0.4, 0.3, 0.1]], np.float32)
    s = fused_log_score(h, alpha, beta)
    assert s[1] < s[0] < s[2]


def test_additive_baseline_and_scale_sensitivity():
    heads = np.array([[0.10, 0.001, 0.0], [0.05, 0.010, 0.0]], np.float32)
    params = {"click": (0.01, 1.0), "like": (0.001, 1.0), "dislike": (0.01, -1.0)}
    add = AdditiveFusion(SCHEMA, params)(_ctx(), Candidates(np.arange(2, dtype=np.int64), np.ones(2, np.uint32), np.zeros(2, np.float32), heads))
    mul = MultiplicativeFusion(SCHEMA, params)(_ctx(), Candidates(np.arange(2, dtype=np.int64), np.ones(2, np.uint32), np.zeros(2, np.float32), heads))
    np.testing.assert_allclose(add.score, heads @ np.array([1.0, 1.0, -1.0]), rtol=1e-6)
    # the rare task's 10x lift is invisible to the sum but decides the product
    assert add.score[0] > add.score[1] and mul.score[1] > mul.score[0]


def test_default_prior_and_bounds():
    p = default_params(SCHEMA)
    assert p == {"click": (0.01, 1.0), "like": (0.01, 0.5), "dislike": (0.01, -0.5)}
    b = FusionBounds()
    assert b.beta_range(True) == (-5.0, -0.01) and b.beta_range(False) == (0.01, 5.0)
    assert b.to_dict(SCHEMA)["dislike"] == {"alpha": [0.0, 1.0], "beta": [-5.0, -0.01]}
    # clip: into the box, and the sign follows the task's polarity
    c = b.clip(SCHEMA, {"click": (3.0, 0.0), "like": (-1.0, 9.0), "dislike": (0.5, 0.3)})
    assert c == {"click": (1.0, 0.01), "like": (0.0, 5.0), "dislike": (0.5, -0.3)}
    with pytest.raises(ValueError):
        FusionBounds(beta_min=0.0)


@pytest.mark.parametrize(
    "patch,loc,word",
    [
        ({"click": {"beta": 6.0}}, ("click", "beta"), "outside"),
        ({"dislike": {"beta": 0.5}}, ("dislike", "beta"), "negative task"),
        ({"like": {"alpha": -0.1}}, ("like", "alpha"), "outside"),
        ({"nope": {"beta": 1.0}}, ("nope",), "unknown task"),
        ({"click": {"gamma": 1.0}}, ("click", "gamma"), "unknown parameter"),
        ({"click": {"beta": float("nan")}}, ("click", "beta"), "finite"),
    ],
)
def test_check_params_names_the_parameter(patch, loc, word):
    errors = check_params(SCHEMA, FusionBounds(), patch)
    assert len(errors) == 1 and errors[0][0] == loc and word in errors[0][1]


def test_check_params_accepts_in_bounds():
    assert check_params(SCHEMA, FusionBounds(), {"click": {"alpha": 0.0, "beta": 5.0}, "dislike": {"beta": -0.01}}) == []


def test_buckets_split_the_share_evenly_and_reshuffle_per_round():
    users = [f"user-{k}" for k in range(20000)]
    share, n = 0.4, 4
    counts = Counter(assign_bucket(u, 3, "salt", share, n) for u in users)
    assert set(counts) == set(experiment_buckets(n)) | {MAIN}
    assert counts[MAIN] / len(users) == pytest.approx(1 - share, abs=0.02)
    for b in experiment_buckets(n):  # each of the 5 experiment buckets gets share / 5
        assert counts[b] / len(users) == pytest.approx(share / (n + 1), abs=0.01)
    # stable inside a round, reshuffled across rounds and salts
    assert all(assign_bucket(u, 3, "salt", share, n) == assign_bucket(u, 3, "salt", share, n) for u in users[:100])
    same_next = np.mean([assign_bucket(u, 3, "salt", share, n) == assign_bucket(u, 4, "salt", share, n) for u in users[:2000]])
    same_salt = np.mean([unit_hash("salt", 3, u) == unit_hash("pepper", 3, u) for u in users[:2000]])
    assert same_next < 0.6 and same_salt == 0.0
    # everyone in the experiment at share 1
    assert all(assign_bucket(u, 1, "s", 1.0, n) != MAIN for u in users[:500])
    assert assign_bucket("x", 1, "s", 1.0, 0) == CONTROL


def test_reward_per_event():
    w = DEFAULT_WEIGHTS
    assert event_reward("click", None, w) == 1.0
    assert event_reward("impression", None, w) == 0.0
    assert event_reward("dwell", 90.0, w) == pytest.approx(1.5)  # minutes
    assert event_reward("dwell", 3600.0, w, dwell_cap_minutes=10) == pytest.approx(10.0)  # capped
    assert event_reward("dwell", None, w) == 0.0 and event_reward("dwell", -5.0, w) == 0.0
    assert event_reward("dislike", None, w) == -5.0
    ev = [FeedbackEvent("a", t, v, 0.0) for t, v in [("share", None), ("follow", None), ("like", None), ("poke", None)]]
    assert event_rewards(ev, w) == (3.0, 3.0, 2.0, 0.0)
    assert event_rewards(ev, {"share": 0.5}) == (0.5, 0.0, 0.0, 0.0)
    assert math.isfinite(sum(event_rewards(ev, w)))
