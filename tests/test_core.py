import dataclasses

import numpy as np
import pytest

from core.bundle import IdIndex
from core.candidates import SOURCE_BITS, Candidates, source_names
from core.offline_metrics import auc, calibration_error, recall_ndcg_at_k
from sim.dataset import recent_history, sort_events, temporal_split


def test_candidates_are_frozen_and_typed():
    c = Candidates.from_source(np.array([3, 1, 2]), np.array([0.1, 0.9, 0.5]), "ann")
    assert c.item.dtype == np.int64 and c.source.dtype == np.uint32 and c.score.dtype == np.float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.item = np.zeros(3, np.int64)
    with pytest.raises(TypeError):
        Candidates(np.zeros(2, np.int32), np.zeros(2, np.uint32), np.zeros(2, np.float32))
    with pytest.raises(ValueError):
        Candidates(np.zeros(2, np.int64), np.zeros(3, np.uint32), np.zeros(2, np.float32))


def test_candidates_take_and_top():
    heads = np.arange(8, dtype=np.float32).reshape(4, 2)
    c = Candidates(np.array([10, 11, 12, 13]), np.full(4, 1, np.uint32), np.array([0.2, 0.9, 0.9, 0.1], np.float32), heads)
    t = c.take(np.array([2, 0]))
    assert t.item.tolist() == [12, 10] and t.heads.tolist() == [[4, 5], [0, 1]]
    top = c.top(3)
    assert top.item.tolist() == [11, 12, 10]  # ties keep input order
    assert c.top(10).item.tolist() == [11, 12, 10, 13]
    assert source_names(SOURCE_BITS["ann"] | SOURCE_BITS["graph"]) == ["ann", "graph"]


def test_temporal_split_holds_out_each_users_latest():
    user = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    ts = np.arange(len(user), dtype=float)
    test = temporal_split(user, ts, 0.2)
    assert test.tolist() == [False] * 4 + [True] + [False] * 8 + [True, True] + [False]
    with pytest.raises(ValueError):
        temporal_split(user[::-1], ts, 0.2)


def test_recent_history_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    user = rng.integers(0, 5, 200)
    ts = rng.random(200)
    o = sort_events(user, ts)
    user, ts = user[o], ts[o]
    item = rng.integers(0, 50, 200)
    keep = rng.random(200) < 0.6
    got = recent_history(user, item, keep, 5, 4)
    for r in range(200):
        prev = [item[j] for j in range(r) if user[j] == user[r] and keep[j]][::-1][:4]
        assert got[r].tolist() == prev + [-1] * (4 - len(prev))


def test_auc_and_ranking_metrics():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    r, n = recall_ndcg_at_k(np.array([5, 1, 9]), np.array([1, 7]), 3)
    assert r == 0.5
    assert n == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))


def test_calibration_error_is_small_for_true_probabilities_and_sees_a_shift():
    rng = np.random.default_rng(0)
    p = rng.beta(1, 9, 200_000)  # a click-like head: most predictions near 0.1
    y = (rng.random(len(p)) < p).astype(np.float64)
    assert calibration_error(y, p) < 0.005
    assert calibration_error(y, np.clip(p + 0.05, 0, 1)) == pytest.approx(0.05, abs=0.005)
    assert calibration_error(y, p * 0.5) == pytest.approx(0.5 * p.mean(), abs=0.005)  # under-confident everywhere
    assert np.isnan(calibration_error(np.zeros(0), np.zeros(0)))


def test_top_keeps_an_ordered_set_as_a_prefix_and_sorts_any_other():
    def cands(score):
        return Candidates(np.arange(len(score), dtype=np.int64), np.ones(len(score), np.uint32), np.array(score, np.float32))

    ordered = cands([5, 4, 4, 1])
    assert ordered.top(10) is ordered  # nothing to sort or cut
    assert ordered.top(3).item.tolist() == [0, 1, 2] and ordered.top(0).item.tolist() == []
    assert cands([1, 5, 4, 4]).top(3).item.tolist() == [1, 2, 3]
    assert cands([4, np.nan, 5]).top(3).item.tolist()[0] == 2  # NaN breaks order: sorted, not kept


def test_in_sorted_matches_isin():
    from core.arrays import in_sorted

    rng = np.random.default_rng(0)
    for n_set in (1, 3, 50):
        s = np.unique(rng.integers(0, 100, n_set))
        v = rng.integers(-5, 110, 300)
        assert np.array_equal(in_sorted(v, s), np.isin(v, s))


def test_take_rows_matches_fancy_indexing():
    from core.arrays import take_rows

    rng = np.random.default_rng(1)
    for a in (rng.integers(0, 9, (50, 3)), rng.random((40, 5)).astype(np.float32), rng.integers(0, 9, (30, 4))[:, ::2], np.zeros((5, 0))):
        idx = rng.integers(0, len(a), 17)
        got = take_rows(a, idx)
        assert got.dtype == a.dtype and np.array_equal(got, a[idx])
    assert take_rows(np.arange(12).reshape(6, 2), np.zeros(0, np.int64)).shape == (0, 2)
    # unaligned, as an array mapped from inside an .npz can be
    raw = np.frombuffer(b"\0" + rng.integers(0, 9, (60, 3)).tobytes(), np.int64, offset=1).reshape(60, 3)
    assert not raw.flags.aligned
    idx = rng.integers(0, 60, 25)
    np.testing.assert_array_equal(take_rows(raw, idx), raw[idx])


def test_id_index_lookup_and_keys_longer_than_every_id():
    ix = IdIndex(np.array(["u10", "u2", "i7", "u1"]))  # unsorted: looked up through the order
    assert ix.lookup(["u1", "u2", "u10", "i7", "u3", ""]).tolist() == [3, 1, 0, 2, -1, -1]
    assert ix.get("u10") == 0 and "i7" in ix and ix.get("x") is None
    # Longer than the index's ids: no match, even where the key's first characters are an id
    # (cut to the index's width, "u101" would be "u10").
    assert ix.lookup(["u101", "cold-123456789", "u2"]).tolist() == [-1, -1, 1]
    assert ix.get("u101") is None and "u101" not in ix
    with pytest.raises(KeyError):
        ix["cold-123456789"]


def test_id_index_short_lookups_through_its_dict_match_the_search():
    rng = np.random.default_rng(3)
    ids = np.array([f"i{k}" for k in rng.permutation(5000)])
    ix = IdIndex(ids)
    ix.CACHE_KEYS = 300  # small, so the dict also starts over during the test
    truth = {s: k for k, s in enumerate(ids.tolist())}
    for _ in range(60):
        keys = [f"i{k}" for k in rng.integers(0, 5400, int(rng.integers(1, 200)))] + ["i12345678901"]
        want = [truth.get(k, -1) for k in keys]
        assert ix.lookup(keys).tolist() == want  # through the dict
        assert ix.lookup(np.array(keys)).tolist() == want  # arrays are always searched
        assert len(ix._cache) <= 300
    assert ix.lookup([]).tolist() == []
