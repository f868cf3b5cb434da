"""Beam-search reranker and its list reward: the reward by hand, hard constraints (and their
relaxation, reported in the trace), greedy = beam width 1, full lists without duplicates,
beam never worse than greedy, the stage's contract and the pipeline wiring."""
import numpy as np
import pytest

from core.candidates import Candidates
from core.context import RequestContext
from core.schema import FieldSpec, Schema, TaskSpec
from rerank.beam import BeamReranker, BeamSearch, Constraints, RerankConfig, beam_search, value_to_go, violations
from rerank.reward import RewardParams, continue_prob, item_values, list_reward


def test_reward_by_hand_on_five_items():
    # pool of 7; the list is the first five, items 5 and 6 stay for the next page
    v = np.array([1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2])
    p = np.array([0.9, 0.8, 0.9, 0.5, 1.0, 0.6, 0.7])
    author = np.array([0, 0, 1, 0, 2, 3, 4])
    category = np.array([0, 0, 0, 1, 0, 1, 2])
    params = RewardParams(author_window=2, author_penalty=0.5, category_window=3, category_free=1,
                          category_penalty=0.2, next_items=2, next_weight=1.0)
    out = list_reward(np.array([0, 1, 2, 3, 4]), v, p, author, category, params)
    # reach: 1, .9, .9·.8 = .72, .72·.9 = .648, .648·.5 = .324; after the list .324·1.0
    np.testing.assert_allclose(out["reach"][0], [1, 0.9, 0.72, 0.648, 0.324, 0.324])
    value = 1 * 1.0 + 0.9 * 0.8 + 0.72 * 0.6 + 0.648 * 0.5 + 0.324 * 0.4  # 2.6056
    # same author in the previous 2 slots: slot 1 (item 0), slot 3 (item 1)     → 0.5 each
    # same category in the previous 3 slots beyond 1 free: slot 2 (2 before), slot 4 (2) → 0.2 each
    penalty = 0.9 * 0.8 * 0.5 + 0.72 * 0.6 * 0.2 + 0.648 * 0.5 * 0.5 + 0.324 * 0.4 * 0.2  # 0.63432
    p_bar = p.mean()  # 5.4 / 7
    nxt = 0.324 * (0.3 + p_bar * 0.2)  # best two unused: items 5, 6
    assert out["value"][0] == pytest.approx(value) and value == pytest.approx(2.6056)
    assert out["penalty"][0] == pytest.approx(penalty) and penalty == pytest.approx(0.63432)
    assert out["next"][0] == pytest.approx(nxt)
    assert out["reward"][0] == pytest.approx(value - penalty + nxt)
    assert out["reward"][0] == pytest.approx(2.118469, abs=1e-6)
    # unknown codes (< 0) never match: no author/category penalty at all
    none = list_reward(np.arange(5), v, p, -np.ones(7, np.int64), -np.ones(7, np.int64), params)
    assert none["penalty"][0] == 0.0


def test_values_and_continue_proxy():
    fused = np.log(np.array([0.2, 0.1, 0.05]))
    np.testing.assert_allclose(item_values(fused), [1.0, 0.5, 0.25])
    ml = Schema("ml", (TaskSpec("click"), TaskSpec("like", given="click"), TaskSpec("dislike", negative=True, given="click")), (), ())
    heads = np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    p, src = continue_prob(heads, ml, base=0.9)
    assert src == "proxy"
    np.testing.assert_allclose(p, [0.9 * (1 - 0.5 * 0.2), 0.9])  # marginal dislike = click · dislike|click
    syn = Schema("s", (TaskSpec("click"), TaskSpec("continue")), (), ())
    p, src = continue_prob(np.array([[0.1, 0.8]]), syn)
    assert src == "head" and p.tolist() == [0.8]


def _instance(rng, M=40, n_auth=8, n_cat=3):
    f = np.sort(rng.normal(0, 1, M))[::-1]  # the pool comes in descending fused order
    return item_values(f), rng.uniform(0.6, 0.97, M), rng.integers(0, n_auth, M), rng.integers(0, n_cat, M)


def _reference_greedy(v, p, author, category, T, params, c):
    """Slot by slot, over every candidate in Python, with the partial reward from list_reward."""
    H = value_to_go(v, p, T, params)
    partial = RewardParams(params.author_window, params.author_penalty, params.category_window,
                           params.category_free, params.category_penalty, next_items=0)
    out: list[int] = []
    for t in range(T):
        best = None
        for level in (0, 1, 2, 3):  # relaxation ladder: all, no cap, no gap, none
            for i in range(len(v)):
                if i in out:
                    continue
                flag = violations(np.array(out + [i]), author, category, c)
                f = set(flag[-1]["constraints"]) if flag and flag[-1]["slot"] == t else set()
                ok = {0: not f, 1: f <= {"max_per_category"}, 2: f <= {"min_author_gap"}, 3: True}[level]
                if not ok:
                    continue
                r = list_reward(np.array(out + [i]), v, p, author, category, partial)
                key = r["reward"][0] + r["reach"][0, -1] * H[t]
                if best is None or key > best[0] + 1e-12:
                    best = (key, i)
            if best is not None:
                break
        out.append(best[1])
    return np.array(out)


def test_greedy_equals_beam_width_one():
    rng = np.random.default_rng(1)
    params = RewardParams(author_window=3, author_penalty=0.4, category_window=4, category_free=1, category_penalty=0.15, next_items=3)
    for k in range(12):
        c = Constraints(min_author_gap=2 + k % 2, max_per_category=2 if k % 3 else 0, category_window=4)
        v, p, a, cat = _instance(rng, M=18, n_auth=4, n_cat=2)
        got = beam_search(v, p, a, cat, 10, 1, params, c, compare_sort=False).order
        np.testing.assert_array_equal(got, _reference_greedy(v, p, a, cat, 10, params, c))


def test_skipping_the_feasibility_checks_changes_no_list(monkeypatch):
    """Where the pool bounds what the hard constraints can block (BeamSearch._blocked_at_most),
    the per-slot checks are skipped; forcing them back on gives the same lists and rewards."""
    rng = np.random.default_rng(7)
    params = RewardParams(author_window=3, author_penalty=0.3, category_window=4, category_penalty=0.1)
    cases = []
    for k in range(30):
        c = Constraints(min_author_gap=2 + k % 3, max_per_category=(0, 2, 3)[k % 3], category_window=4)
        v, p, a, cat = _instance(rng, M=int(rng.choice([12, 40, 90])), n_auth=int(rng.choice([3, 10, 60])), n_cat=int(rng.choice([2, 8])))
        a[rng.random(len(a)) < 0.1] = -1  # unknown authors never block
        bs = BeamSearch(params, c, beam=int(rng.choice([1, 4, 8])))
        cases.append((bs, (v, p, a, cat, int(rng.choice([5, 10, 20])))))
    fast = [bs.search(*x) for bs, x in cases]
    skipped = sum(len(x[0]) - (x[4] - 1) - bs._blocked_at_most(x[2], x[3]) >= bs.beam for bs, x in cases)
    assert 0 < skipped < len(cases)  # both paths occur
    monkeypatch.setattr(BeamSearch, "_blocked_at_most", lambda self, a, c: 10**9)  # never safe: always check
    for (bs, x), r in zip(cases, fast):
        checked = bs.search(*x)
        np.testing.assert_array_equal(checked.order, r.order)
        np.testing.assert_array_equal(checked.finals, r.finals)
        assert checked.reward == r.reward and checked.relaxed == r.relaxed


def test_compiled_slot_loop_returns_the_numpy_loops_lists():
    """BeamSearch's default kernel (numba, rerank/beam_kernel.py) against the numpy loop it
    replaced, on pools with unknown codes, missing fields, tight hard constraints (so rows run
    out and relax), beams wider than the pool and width 1: the same list, final rows and
    relaxations, and the reward up to rounding (its sums run in another order)."""
    rng = np.random.default_rng(11)
    n_relaxed = 0
    for k in range(400):
        M, T = int(rng.integers(1, 120)), int(rng.integers(1, 25))
        v, p, a, cat = _instance(rng, M=M, n_auth=int(rng.integers(1, 30)), n_cat=int(rng.integers(1, 10)))
        a[rng.random(M) < 0.1] = -1
        a = None if k % 7 == 0 else a
        cat = None if k % 11 == 0 else cat
        params = RewardParams(int(rng.integers(0, 6)), float(rng.choice([0.0, 0.05, 0.3])), int(rng.integers(0, 6)),
                              int(rng.integers(0, 3)), float(rng.choice([0.0, 0.03, 0.2])), next_items=int(rng.integers(0, 6)))
        c = Constraints(int(rng.integers(0, 5)), int(rng.integers(0, 3)), int(rng.integers(1, 6)))
        B = int(rng.choice([1, 2, 8, 16]))
        ref = BeamSearch(params, c, B, kernel="numpy").search(v, p, a, cat, T)
        got = BeamSearch(params, c, B).search(v, p, a, cat, T)
        np.testing.assert_array_equal(got.order, ref.order)
        assert got.relaxed == ref.relaxed and got.picked == ref.picked
        assert got.reward == pytest.approx(ref.reward, rel=1e-12, abs=1e-15)
        # the final rows are the same set (the numpy loop's selection leaves them unordered)
        assert sorted(map(tuple, got.finals)) == sorted(map(tuple, ref.finals))
        n_relaxed += bool(ref.relaxed)
    assert n_relaxed > 10


def test_compiled_rewards_match_list_reward():
    from rerank.beam_kernel import list_rewards

    rng = np.random.default_rng(12)
    for k in range(100):
        M, T = int(rng.integers(2, 80)), int(rng.integers(1, 20))
        T = min(T, M)
        v, p, a, cat = _instance(rng, M=M, n_auth=int(rng.integers(1, 10)), n_cat=int(rng.integers(1, 5)))
        a[rng.random(M) < 0.2] = -1
        params = RewardParams(int(rng.integers(0, 6)), 0.2, int(rng.integers(0, 6)), int(rng.integers(0, 3)), 0.1,
                              next_items=int(rng.integers(0, 6)), next_weight=float(rng.choice([0.0, 1.0, 2.5])))
        lists = np.stack([rng.permutation(M)[:T] for _ in range(5)])
        ref = list_reward(lists, v, p, a, cat if k % 2 else None, params)["reward"]
        got = list_rewards(lists, v, p, a, cat if k % 2 else np.zeros(0, np.int64), True, bool(k % 2), params.author_window,
                           params.author_penalty, params.category_window, params.category_penalty, float(params.category_free),
                           params.next_items, params.next_weight, float(p.mean()))
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


def test_constraints_hold_or_are_reported_as_relaxed():
    rng = np.random.default_rng(2)
    params = RewardParams()
    n_relaxed = 0
    for k in range(60):
        c = Constraints(min_author_gap=3, max_per_category=2, category_window=5)
        v, p, a, cat = _instance(rng, M=30 + k % 3 * 20, n_auth=2 + k % 5, n_cat=1 + k % 3)
        for B in (1, 4, 8):
            res = beam_search(v, p, a, cat, 20, B, params, c)
            broken = {x["slot"]: set(x["constraints"]) for x in violations(res.order, a, cat, c)}
            relaxed = {x["slot"]: set(x["constraints"]) for x in res.relaxed}
            assert set(broken) <= set(relaxed), (broken, relaxed)
            for s, names in broken.items():
                assert names <= relaxed[s]
            assert len(res.order) == 20 and len(np.unique(res.order)) == 20
            n_relaxed += bool(relaxed)
    assert n_relaxed > 0  # the tight instances did force relaxations


def test_single_author_pool_relaxes_and_still_fills_the_list():
    v = np.linspace(1, 0.5, 12)
    p = np.full(12, 0.9)
    res = beam_search(v, p, np.zeros(12, np.int64), None, 6, 4, RewardParams(), Constraints(min_author_gap=2))
    assert len(res.order) == 6 and len(set(res.order.tolist())) == 6
    assert [x["slot"] for x in res.relaxed] == [1, 2, 3, 4, 5]
    assert all(x["constraints"] == ["min_author_gap"] for x in res.relaxed)


def test_beam_is_never_worse_than_greedy_and_often_better():
    rng = np.random.default_rng(3)
    params = RewardParams()
    c = Constraints(min_author_gap=2, max_per_category=3, category_window=5)
    better = 0
    for _ in range(150):
        v, p, a, cat = _instance(rng, M=60, n_auth=10, n_cat=3)
        g = beam_search(v, p, a, cat, 20, 1, params, c, compare_sort=False)
        for B in (4, 8):
            b = beam_search(v, p, a, cat, 20, B, params, c, compare_sort=False)
            # row 0 of the beam is the greedy path, and the best final row is returned
            np.testing.assert_array_equal(b.finals[0], g.order)
            assert b.reward >= g.reward - 1e-12
            better += b.reward > g.reward + 1e-9
        # the reported reward is the list's exact reward
        assert b.reward == pytest.approx(list_reward(b.order, v, p, a, cat, params)["reward"][0])
    assert better > 30


def test_sort_list_is_kept_when_it_scores_better():
    # no penalties, no constraints, no lookahead, equal continue: the fused order is optimal
    v = np.array([1.0, 0.9, 0.8, 0.7, 0.6])
    p = np.full(5, 0.8)
    res = beam_search(v, p, None, None, 3, 4, RewardParams(next_items=0), Constraints(), lookahead=False)
    assert res.order.tolist() == [0, 1, 2] and res.reward == pytest.approx(res.reward_sort)


def test_short_pool_returns_every_candidate():
    v, p = np.array([1.0, 0.5, 0.2]), np.array([0.9, 0.9, 0.9])
    res = beam_search(v, p, np.array([0, 0, 0]), np.array([0, 0, 0]), 20, 8, RewardParams(), Constraints(2, 1, 5))
    assert sorted(res.order.tolist()) == [0, 1, 2]


def _schema(with_continue=True):
    tasks = (TaskSpec("click"), TaskSpec("dislike", negative=True)) + ((TaskSpec("continue"),) if with_continue else ())
    return Schema("t", tasks, (), (FieldSpec("category", 4), FieldSpec("author", 6)), author_field="author", category_field="category")


def _ctx(count):
    z = np.zeros(0, np.int64)
    return RequestContext("r", "u", 0, z, z, np.zeros(0), z, z, count=count)


def test_stage_contract_and_trace():
    rng = np.random.default_rng(4)
    n_items = 500
    item_fields = np.stack([rng.integers(0, 4, n_items), rng.integers(0, 6, n_items)], axis=1)  # 0 = unknown
    for with_continue in (True, False):
        schema = _schema(with_continue)
        stage = BeamReranker.from_bundle(schema, item_fields, RerankConfig(beam=8, top_m=60, constraints=Constraints(2, 3, 5)))
        n = 150
        heads = rng.uniform(0.01, 0.99, (n, len(schema.tasks))).astype(np.float32)
        items = rng.choice(n_items, n, replace=False).astype(np.int64)
        cands = Candidates(items, np.ones(n, np.uint32), rng.normal(0, 1, n).astype(np.float32), heads)
        ctx = _ctx(20)
        out = stage(ctx, cands)
        assert len(out) == 20 and len(np.unique(out.item)) == 20
        by_item = {int(i): k for k, i in enumerate(cands.item)}
        rows = np.array([by_item[int(i)] for i in out.item])
        np.testing.assert_array_equal(out.score, cands.score[rows])  # score stays the fused score
        np.testing.assert_array_equal(out.heads, cands.heads[rows])
        assert set(rows) <= set(np.argsort(-cands.score)[:60])  # from the top-M pool
        tr = ctx.trace_extra["rerank"]
        assert tr["mode"] == "beam" and tr["slots"] == 20 and tr["pool"] == 60
        assert tr["continue"] == ("head" if with_continue else "proxy")
        # constraints on the served list hold unless the trace says they were relaxed
        a, c = item_fields[out.item, 1] - 1, item_fields[out.item, 0] - 1
        broken = violations(np.arange(20), a, c, Constraints(2, 3, 5))
        assert {x["slot"] for x in broken} <= {x["slot"] for x in tr["relaxed"]}
    # fewer candidates than asked for: all of them; no heads: the fused order
    few = cands.take(np.arange(7))
    assert len(stage(_ctx(20), few)) == 7
    nohead = Candidates(cands.item, cands.source, cands.score)
    np.testing.assert_array_equal(stage(_ctx(5), nohead).item, cands.top(5).item)


def test_forced_relaxation_is_in_the_trace():
    schema = _schema()
    item_fields = np.stack([np.ones(50, np.int64), np.ones(50, np.int64)], axis=1)  # one author, one category
    stage = BeamReranker.from_bundle(schema, item_fields, RerankConfig(beam=4, constraints=Constraints(2, 2, 5)))
    heads = np.full((50, 3), 0.5, np.float32)
    cands = Candidates(np.arange(50, dtype=np.int64), np.ones(50, np.uint32), np.linspace(1, 0, 50).astype(np.float32), heads)
    ctx = _ctx(10)
    out = stage(ctx, cands)
    assert len(out) == 10 and len(np.unique(out.item)) == 10
    relaxed = ctx.trace_extra["rerank"]["relaxed"]
    assert [x["slot"] for x in relaxed] == list(range(1, 10))
    assert relaxed[0]["constraints"] == ["min_author_gap"]  # slot 1: the gap only (a cap of 2 allows it)
    assert relaxed[-1]["constraints"] == ["max_per_category", "min_author_gap"]


def test_settings_select_the_reranker(loaded_bundle):
    from core.settings import Settings
    from rerank.beam import make_reranker
    from rerank.sort import FusedSortReranker

    b = loaded_bundle
    assert isinstance(make_reranker(b.schema, b.item_fields, Settings(rerank_mode="sort")), FusedSortReranker)
    g = make_reranker(b.schema, b.item_fields, Settings(rerank_mode="greedy"))
    assert g.mode == "greedy" and g.config.beam == 1
    bm = make_reranker(b.schema, b.item_fields, Settings(rerank_beam_width=4))
    assert bm.mode == "beam" and bm.config.beam == 4
    assert bm.item_author is None and bm.item_category is not None  # ml-100k: genres, no authors
    with pytest.raises(ValueError):
        make_reranker(b.schema, b.item_fields, Settings(), mode="random")


def test_pipeline_serves_a_reranked_full_list(pipeline):
    b = pipeline.bundle
    assert pipeline.stages[-1].name == "rerank"
    ctx = pipeline.context(request_id="t", user_id=str(b.user_ids[3]), count=20, scene="home", exclude_item_ids=[], events=[], seed=0)
    out, _ = pipeline.run(ctx)
    assert len(out) == 20 and len(np.unique(out.item)) == 20
    tr = ctx.trace_extra["rerank"]
    assert tr["continue"] == "proxy" and tr["slots"] == 20  # ml-100k has no continue head
    assert tr["reward"] >= tr["reward_sort"] - 1e-9 or tr["picked"] == "sort"


def test_top_k_finds_the_k_largest_entries():
    """The beam's selection (rerank.beam.top_k): the same values as a full sort, with -inf
    entries, ties, fewer rows than k, and rows whose maxima all sit in one row."""
    from rerank.beam import top_k

    rng = np.random.default_rng(3)
    for trial in range(300):
        rows, m = int(rng.integers(1, 10)), int(rng.integers(2, 40))
        flat = np.round(rng.normal(size=rows * m), 1)  # rounding makes ties
        flat[rng.random(rows * m) < rng.choice([0.0, 0.3, 0.95])] = -np.inf
        if trial % 5 == 0:
            flat[:m] += 10.0  # every large entry in row 0
        k = int(rng.integers(1, min(rows * m, 12)))
        got = top_k(flat.copy(), rows, k)
        assert len(got) == k and len(np.unique(got)) == k
        np.testing.assert_array_equal(np.sort(flat[got]), np.sort(flat)[-k:])
