"""Merge calibration: validation split, rate curves, the calibrated merge, and the curves a
real build stores in its manifest."""
import json

import numpy as np

from core.candidates import SOURCE_BITS, Candidates
from retrieval.calibrate import curve_rates, rate_curve, validation_split
from retrieval.merge import merge_candidates


def test_validation_split_holds_out_each_users_last_training_events(ml_bundle):
    from app.build import load_dataset

    ds = load_dataset(json.loads((ml_bundle / "manifest.json").read_text())["source"])
    val = validation_split(ds, frac=0.25)
    assert len(val.ev_user) == int((~ds.test).sum())  # the real test split is gone
    # every held-out event is later than every kept event of the same user
    for u in np.unique(val.ev_user)[:50]:
        rows = val.ev_user == u
        ts, held = val.ev_ts[rows], val.test[rows]
        if held.any() and (~held).any():
            assert ts[~held].max() <= ts[held].min()
    assert 0.15 < val.test.mean() < 0.3


def test_rate_curve_is_non_increasing_and_matches_dense_counts():
    rng = np.random.default_rng(0)
    depth, users = 200, 500
    true = 0.2 / (1 + np.arange(depth)) ** 0.7
    hits = rng.binomial(users, true)
    c = rate_curve(hits, users, depth)
    rate = np.asarray(c["rate"])
    assert np.all(np.diff(rate) <= 1e-12)
    assert c["edges"][0] == 0 and c["edges"][-1] == depth
    r = curve_rates(c, depth + 50)
    assert len(r) == depth + 50 and np.isclose(r[-1], rate[-1])
    # early ranks are estimated well (many hits there)
    assert abs(r[0] - true[0]) < 0.05 and abs(r[:8].mean() - true[:8].mean()) < 0.03


def test_calibrated_merge_gives_slots_to_the_path_whose_ranks_are_worth_more():
    strong = Candidates.from_source(np.arange(0, 100), np.linspace(1, 0, 100), "ann")
    weak = Candidates.from_source(np.arange(100, 200), np.linspace(1, 0, 100), "graph")
    parts = [(strong, 50), (weak, 50)]
    blocked = np.zeros(0, np.int64)
    # uncalibrated: equal quotas interleave the two paths
    plain = merge_candidates(parts, blocked, total=20, multi_hit=0.0)
    assert np.count_nonzero(plain.item < 100) == 10
    # calibrated: ann's 15th candidate still beats graph's 1st
    rates = [0.3 / (1 + np.arange(100)) ** 0.3, np.full(100, 0.05)]
    cal = merge_candidates(parts, blocked, total=20, multi_hit=0.0, rates=rates)
    assert np.count_nonzero(cal.item < 100) > 15
    assert np.all(np.diff(cal.score) <= 0)


def test_calibrated_merge_keeps_quota_backfill_and_multi_hit_rules():
    a = Candidates.from_source(np.arange(0, 10), np.linspace(1, 0, 10), "ann")
    g = Candidates.from_source(np.array([5, 20, 21, 22]), np.array([4.0, 3.0, 2.0, 1.0]), "graph")
    rates = [np.full(10, 0.1), np.full(4, 0.08)]
    blocked = np.array([0, 1])
    out = merge_candidates([(a, 3), (g, 2)], blocked, total=5, multi_hit=0.0, rates=rates)
    # in-quota items first (ann 2,3,4; graph 5,20); blocked ones never
    assert sorted(out.item.tolist()) == [2, 3, 4, 5, 20]
    assert out.source[out.item == 5][0] == SOURCE_BITS["ann"] | SOURCE_BITS["graph"]
    full = merge_candidates([(a, 3), (g, 2)], blocked, total=50, multi_hit=0.0, rates=rates)
    assert sorted(full.item.tolist()) == [2, 3, 4, 5, 6, 7, 8, 9, 20, 21, 22]
    # with a multi-path bonus the item both paths found comes first
    bonus = merge_candidates([(a, 3), (g, 2)], blocked, total=5, multi_hit=1.0, rates=rates)
    assert bonus.item[0] == 5
    # a part without a curve ranks below the calibrated ones but still fills the list
    nocurve = merge_candidates([(a, 3), (g, 2)], blocked, total=5, multi_hit=0.0, rates=[rates[0], None])
    assert nocurve.item[:3].tolist() == [2, 3, 4] and sorted(nocurve.item.tolist()) == [2, 3, 4, 5, 20]


def test_build_stores_a_calibration_the_serving_merge_uses(loaded_bundle, pipeline):
    cal = loaded_bundle.manifest.get("merge_calibration")
    assert cal is not None and cal["users"] > 0
    names = {s.name for s in pipeline.stages[1].sources}
    assert set(cal["paths"]) == names
    for c in cal["paths"].values():
        assert np.all(np.diff(c["rate"]) <= 1e-12)
    assert pipeline.stages[1].rates is not None
    assert cal["multi_hit"] in (0.0, 0.25, 0.5, 1.0)
