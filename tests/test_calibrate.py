"""Merge calibration: validation split, rate curves, the calibrated merge, and the curves a
real build stores in its manifest."""
import json

import numpy as np

from core.candidates import SOURCE_BITS, Candidates
from retrieval.calibrate import curve_rates, fit_logistic, rate_curve, validation_split
from retrieval.merge import MergeModel, merge_candidates, union_of


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


def _rate_model(paths, rates, n_paths_w=0.0):
    """A merge model that scores a single-path item by its path's rate (logit weight 1)."""
    w = np.zeros(3 * len(paths) + 2, np.float32)
    w[1 : 3 * len(paths) : 3] = 1.0
    w[-2] = n_paths_w
    return MergeModel(tuple(paths), tuple(np.asarray(r, np.float32) for r in rates), w)


def test_merge_features_by_hand():
    a = Candidates.from_source(np.array([7, 3, 9]), np.array([3.0, 2.0, 1.0]), "ann")
    g = Candidates.from_source(np.array([3, 4]), np.array([2.0, 1.0]), "graph")
    m = MergeModel(("ann", "graph"), (np.array([0.5, 0.2, 0.1], np.float32), np.array([0.25, 0.25], np.float32)))
    u = union_of([(a, 3), (g, 2)], np.zeros(0, np.int64))
    assert u.item.tolist() == [3, 4, 7, 9]
    x = m.features(len(u.item), u.inv, u.rank, u.part, ["ann", "graph"])
    lg = lambda p: np.log(p / (1 - p))  # noqa: E731
    # item 3: ann rank 1, graph rank 0; item 4: graph rank 1; 7: ann rank 0; 9: ann rank 2
    expect = np.array([
        [1, lg(0.2), np.log(2), 1, lg(0.25), 0, 2, 1],
        [0, 0, 0, 1, lg(0.25), np.log(2), 1, 1],
        [1, lg(0.5), 0, 0, 0, 0, 1, 1],
        [1, lg(0.1), np.log(3), 0, 0, 0, 1, 1],
    ], np.float32)
    assert np.allclose(x, expect, atol=1e-5)
    assert m.feature_names()[:3] == ["ann.found", "ann.logit_rate", "ann.log_rank"]
    # an unknown part counts only in the number of paths
    x2 = m.features(len(u.item), u.inv, u.rank, u.part, ["ann", "other"])
    assert np.allclose(x2[:, 3:6], 0) and x2[0, -2] == 2


def test_learned_merge_gives_slots_to_the_path_whose_ranks_are_worth_more():
    strong = Candidates.from_source(np.arange(0, 100), np.linspace(1, 0, 100), "ann")
    weak = Candidates.from_source(np.arange(100, 200), np.linspace(1, 0, 100), "graph")
    parts = [(strong, 50), (weak, 50)]
    blocked = np.zeros(0, np.int64)
    # rank mode: equal quotas interleave the two paths
    plain = merge_candidates(parts, blocked, total=20, multi_hit=0.0)
    assert np.count_nonzero(plain.item < 100) == 10
    # learned: ann's 15th candidate still beats graph's 1st
    model = _rate_model(("ann", "graph"), [0.3 / (1 + np.arange(100)) ** 0.3, np.full(100, 0.05)])
    cal = merge_candidates(parts, blocked, total=20, model=model, names=["ann", "graph"])
    assert np.count_nonzero(cal.item < 100) > 15
    assert np.all(np.diff(cal.score) <= 0)


def test_learned_merge_adds_up_evidence_and_keeps_quota_backfill_rules():
    a = Candidates.from_source(np.arange(0, 10), np.linspace(1, 0, 10), "ann")
    g = Candidates.from_source(np.array([5, 20, 21, 22]), np.array([4.0, 3.0, 2.0, 1.0]), "graph")
    model = _rate_model(("ann", "graph"), [np.full(10, 0.1), np.full(4, 0.08)], n_paths_w=3.0)
    blocked = np.array([0, 1])
    names = ["ann", "graph"]
    out = merge_candidates([(a, 3), (g, 2)], blocked, total=5, model=model, names=names)
    # in-quota items first (ann 2,3,4; graph 5,20); blocked ones never
    assert sorted(out.item.tolist()) == [2, 3, 4, 5, 20]
    assert out.source[out.item == 5][0] == SOURCE_BITS["ann"] | SOURCE_BITS["graph"]
    # with weight on the number of paths, the item both found comes first
    assert out.item[0] == 5
    full = merge_candidates([(a, 3), (g, 2)], blocked, total=50, model=model, names=names)
    assert sorted(full.item.tolist()) == [2, 3, 4, 5, 6, 7, 8, 9, 20, 21, 22]
    # an unfitted model (no weights) merges by rank/quota
    unfitted = MergeModel(model.paths, model.rates)
    assert np.array_equal(merge_candidates([(a, 3), (g, 2)], blocked, 5, 1.0, unfitted, names).item,
                          merge_candidates([(a, 3), (g, 2)], blocked, 5, 1.0).item)


def test_fit_logistic_recovers_weights():
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(size=(20000, 2)), np.ones(20000)]
    w = np.array([1.5, -0.7, -2.0])
    y = (rng.random(20000) < 1 / (1 + np.exp(-x @ w))).astype(float)
    assert np.allclose(fit_logistic(x, y), w, atol=0.15)


def test_build_stores_a_calibration_the_serving_merge_uses(loaded_bundle, pipeline):
    cal = loaded_bundle.manifest.get("merge_calibration")
    assert cal is not None and cal["users"] > 0
    names = {s.name for s in pipeline.stage("recall").sources}
    assert set(cal["paths"]) == names
    for c in cal["paths"].values():
        assert np.all(np.diff(c["rate"]) <= 1e-12)
    assert len(cal["weights"]) == len(cal["features"]) == 3 * len(names) + 2
    model = pipeline.stage("recall").model
    assert model is not None and set(model.paths) == names
    assert set(cal["validation"]) == {"learned", "rank"}


def test_merge_logits_equal_features_times_weights():
    """Serving's `MergeModel.logits` (no feature matrix) agrees with the fitted form
    features @ weights, with ranks past the tabulated curve and a part the model does not know."""
    rng = np.random.default_rng(3)
    paths = ("ann", "itemcf", "graph")
    rates = tuple(np.sort(rng.uniform(0.001, 0.3, size))[::-1].astype(np.float32) for size in (40, 25, 60))
    m = MergeModel(paths, rates, rng.normal(size=3 * len(paths) + 2).astype(np.float32))
    names = ["graph", "other", "ann", "itemcf"]
    parts = [(Candidates.from_source(rng.choice(500, n, replace=False), np.sort(rng.random(n))[::-1], "ann"), 30)
             for n in (80, 20, 50, 10)]
    blocked = np.sort(rng.choice(500, 40, replace=False))
    u = union_of(parts, blocked)
    want = m.features(len(u.item), u.inv, u.rank, u.part, names) @ m.weights
    got = m.logits(len(u.item), u.inv, u.rank, u.part, names)
    assert u.rank.max() >= 60  # some ranks lie past every curve
    assert np.allclose(got, want, atol=1e-4)


def test_union_matches_a_row_by_row_reference():
    """union_of (compiled row pass) against the definition, row by row in Python: each part in
    its own stable score order, blocked items dropped before ranks are counted, duplicates
    merged with their source bits OR-ed."""
    rng = np.random.default_rng(5)
    names = ["ann", "itemcf", "graph", "popular", "fresh"]
    for _ in range(200):
        parts = []
        for k in range(int(rng.integers(1, 5))):
            n = int(rng.integers(0, 40))
            score = rng.random(n).astype(np.float32)
            if rng.random() < 0.5:
                score = np.sort(score)[::-1].copy()
            parts.append((Candidates.from_source(rng.integers(0, 60, n), score, names[k]), int(rng.integers(1, 20))))
        blocked = np.unique(rng.integers(0, 60, int(rng.integers(0, 20))))
        rows, bits = [], {}
        for p, (c, quota) in enumerate(parts):
            r = 0
            for i in sorted(range(len(c)), key=lambda i: -c.score[i]):  # stable
                item = int(c.item[i])
                if item in set(blocked.tolist()):
                    continue
                rows.append((item, r, p, quota))
                bits[item] = bits.get(item, 0) | int(c.source[i])
                r += 1
        u = union_of(parts, blocked)
        if not rows:
            assert u is None
            continue
        assert u.item.tolist() == sorted(bits) and u.source.tolist() == [bits[i] for i in sorted(bits)]
        assert [(int(u.item[u.inv[j]]), int(u.rank[j]), int(u.part[j]), int(u.quota[j])) for j in range(len(rows))] == rows
