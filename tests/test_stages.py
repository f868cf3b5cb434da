"""Every stage's contract: order, length, dtype, no duplicates, exclusions honoured."""
import numpy as np
import pytest

from core.candidates import SOURCE_BITS, Candidates
from fusion.formula import MultiplicativeFusion, default_params, fused_log_score
from retrieval.itemcf import build_itemcf
from retrieval.merge import merge_candidates


def _ctx(pipeline, user="1", exclude=(), events=(), count=20):
    return pipeline.context(request_id="t", user_id=user, count=count, scene="home", exclude_item_ids=list(exclude), events=list(events), seed=0)


def _check(c: Candidates, n_items: int):
    assert c.item.dtype == np.int64 and c.source.dtype == np.uint32 and c.score.dtype == np.float32
    assert len(np.unique(c.item)) == len(c.item), "duplicates"
    assert len(c) == 0 or (c.item.min() >= 0 and c.item.max() < n_items)


def _prepared(pipeline, **kw):
    ctx = _ctx(pipeline, **kw)
    pipeline.stage("user_tower")(ctx, Candidates.empty())
    return ctx


def test_each_recall_path_contract(pipeline):
    ctx = _prepared(pipeline)
    assert ctx.user_emb is not None and ctx.user_emb.dtype == np.float32
    for src in pipeline.stage("recall").sources:
        c = src(ctx)
        _check(c, pipeline.bundle.n_items)
        assert len(c) > 0, src.name
        assert np.all(c.source == SOURCE_BITS[src.name])
        if src.name not in ("popular", "fresh"):
            assert np.all(np.diff(c.score) <= 0), f"{src.name} not in descending score order"


def test_personal_paths_skip_cold_users_without_history(pipeline):
    ctx = _prepared(pipeline, user="no-such-user")
    assert ctx.user_emb is None
    names = {s.name: len(s(ctx)) for s in pipeline.stage("recall").sources}
    assert names["ann"] == names["itemcf"] == names["graph"] == 0
    assert names["popular"] > 0 and names["fresh"] > 0


def test_graph_walks_stay_in_the_graph(pipeline):
    b = pipeline.bundle
    ctx = _prepared(pipeline)
    graph = next(s for s in pipeline.stage("recall").sources if s.name == "graph")
    c = graph(ctx)
    # Every visited item has at least one user edge (walks only reach items through users).
    deg = b.iu_indptr[c.item + 1] - b.iu_indptr[c.item]
    assert np.all(deg > 0)


def test_recall_merge_dedups_excludes_and_honours_quotas(pipeline):
    b = pipeline.bundle
    hist, _ = b.user_history(0)
    ex_ids = [str(b.item_ids[i]) for i in b.popular[:5]]
    ctx = _prepared(pipeline, user=str(b.user_ids[0]), exclude=ex_ids)
    recall = pipeline.stage("recall")
    out = recall(ctx, Candidates.empty())
    _check(out, b.n_items)
    assert len(out) <= recall.total
    assert not np.isin(out.item, ctx.exclude).any(), "excluded items returned"
    assert not np.isin(out.item, hist).any(), "already-seen items returned"
    counts = out.source_counts()
    assert sum(1 for v in counts.values() if v) >= 2


def test_merge_quota_and_backfill():
    a = Candidates.from_source(np.arange(0, 10), np.linspace(1, 0, 10), "ann")
    g = Candidates.from_source(np.array([5, 20, 21, 22]), np.array([4.0, 3.0, 2.0, 1.0]), "graph")
    blocked = np.array([0, 1])
    out = merge_candidates([(a, 3), (g, 2)], blocked, total=5)
    # quotas: ann 2,3,4 (after blocked 0,1 removed before counting); graph 5,20 → five items
    assert sorted(out.item.tolist()) == [2, 3, 4, 5, 20]
    # item 5 found by both paths has both bits (it is also ann's 4th, beyond quota)
    assert out.source[out.item == 5][0] == SOURCE_BITS["ann"] | SOURCE_BITS["graph"]
    # short: asking for more than the quotas hold backfills beyond-quota candidates
    out = merge_candidates([(a, 3), (g, 2)], blocked, total=50)
    assert sorted(out.item.tolist()) == [2, 3, 4, 5, 6, 7, 8, 9, 20, 21, 22]
    assert merge_candidates([], blocked, 10).item.size == 0


def test_prerank_keeps_best_dot_products(pipeline):
    ctx = _prepared(pipeline)
    cands = pipeline.stage("recall")(ctx, Candidates.empty())
    pre = pipeline.stage("prerank_a")
    out = pre(ctx, cands)
    _check(out, pipeline.bundle.n_items)
    assert len(out) == min(pre.keep, len(cands))
    full = pipeline.bundle.item_emb[cands.item] @ ctx.user_emb
    assert out.score.min() >= np.sort(full)[-len(out)] - 1e-6
    assert np.all(np.diff(out.score) <= 0)


def test_ranker_heads_fusion_and_rerank(pipeline):
    ctx = _prepared(pipeline, count=7)
    c = pipeline.stage("prerank_a")(ctx, pipeline.stage("recall")(ctx, Candidates.empty()))
    ranked = pipeline.stage("rank")(ctx, c)
    _check(ranked, pipeline.bundle.n_items)
    assert ranked.heads.shape == (len(c), len(pipeline.bundle.schema.tasks)) and ranked.heads.dtype == np.float32
    assert np.all((ranked.heads >= 0) & (ranked.heads <= 1))
    np.testing.assert_array_equal(np.sort(ranked.item), np.sort(c.item))
    fused = pipeline.stage("fusion")(ctx, ranked)
    alpha = np.array([ctx.fusion.get(t, pipeline.fusion_params[t])[0] for t in pipeline.bundle.schema.task_names])
    beta = np.array([ctx.fusion.get(t, pipeline.fusion_params[t])[1] for t in pipeline.bundle.schema.task_names])
    expected = np.prod((ranked.heads.astype(np.float64) + alpha) ** beta, axis=1)
    np.testing.assert_allclose(np.exp(fused.score), expected, rtol=1e-4)
    final = pipeline.stage("rerank")(ctx, fused)
    assert len(final) == 7 and len(np.unique(final.item)) == 7
    if pipeline.settings.rerank_mode == "sort":  # beam/greedy reorder; the score stays the fused score
        assert np.all(np.diff(final.score) <= 0)
    assert set(final.item) <= set(fused.item)


def test_fusion_formula_by_hand():
    from core.schema import Schema, TaskSpec

    schema = Schema("t", (TaskSpec("click"), TaskSpec("dislike", negative=True)), (), ())
    params = default_params(schema, {"click": (0.1, 2.0)})
    assert params == {"click": (0.1, 2.0), "dislike": (0.01, -0.5)}
    heads = np.array([[0.5, 0.1], [0.2, 0.0]], np.float32)
    c = Candidates(np.array([0, 1]), np.ones(2, np.uint32), np.zeros(2, np.float32), heads)
    out = MultiplicativeFusion(schema, params)(type("C", (), {"fusion": {}})(), c)
    hand = [(0.6**2) * (0.11**-0.5), (0.3**2) * (0.01**-0.5)]
    np.testing.assert_allclose(np.exp(out.score), hand, rtol=1e-5)
    assert fused_log_score(heads, np.zeros(2), np.zeros(2)).tolist() == [0.0, 0.0]


def test_itemcf_table_on_a_tiny_graph():
    # users: 0 -> {0,1}, 1 -> {0,1,2}, 2 -> {2}
    user = np.array([0, 0, 1, 1, 1, 2])
    item = np.array([0, 1, 0, 1, 2, 2])
    t = build_itemcf(user, item, 3, 3, topk=2)
    row0 = dict(zip(t["indices"][t["indptr"][0] : t["indptr"][1]].tolist(), t["data"][t["indptr"][0] : t["indptr"][1]].tolist()))
    w0, w1 = 1 / np.log(3), 1 / np.log(4)  # IUF of users with 2 and 3 items
    assert row0[1] == pytest.approx((w0 + w1) / np.sqrt(2 * 2), rel=1e-5)
    assert row0[2] == pytest.approx(w1 / np.sqrt(2 * 2), rel=1e-5)
    assert 0 not in row0  # no self-similarity


def test_full_pipeline_output(pipeline):
    b = pipeline.bundle
    hist, _ = b.user_history(3)
    ex = [str(x) for x in b.item_ids[:30]]
    ctx = _ctx(pipeline, user=str(b.user_ids[3]), exclude=ex, count=20)
    out, _ = pipeline.run(ctx)
    _check(out, b.n_items)
    assert len(out) == 20
    assert not np.isin(out.item, hist).any() and not np.isin(out.item, np.arange(30)).any()
    if pipeline.settings.rerank_mode == "sort":
        assert np.all(np.diff(out.score) <= 0)


def test_merge_puts_multi_path_items_first():
    a = Candidates.from_source(np.array([1, 2, 3, 4]), np.array([4.0, 3.0, 2.0, 1.0]), "ann")
    g = Candidates.from_source(np.array([9, 8, 4]), np.array([3.0, 2.0, 1.0]), "graph")
    out = merge_candidates([(a, 4), (g, 3)], np.zeros(0, np.int64), total=7)
    # 4 is last in both paths alone, but found by both: priority min(3/4, 2/3) / 2 = 1/3
    assert out.item.tolist()[:4] == [1, 9, 2, 4]
    plain = merge_candidates([(a, 4), (g, 3)], np.zeros(0, np.int64), total=7, multi_hit=0.0)
    assert plain.item.tolist().index(4) > plain.item.tolist().index(8)


def test_ranker_user_side_once_equals_per_row(pipeline):
    """The served ranker embeds the user and pools the history once (batch-1 user inputs,
    the history only as long as the user's); the per-row, padded feed of training and
    evaluation must give the same probabilities."""
    from rank.features import pad_history, ranker_inputs

    stage = next(s for s in pipeline.stages if s.name == "rank")
    assert stage.user_broadcast, "bundles built now export the broadcasting ranker"
    assert stage.history_trim, "and take the user's history unpadded"
    ctx = _prepared(pipeline)
    assert 0 < len(ctx.history) < stage.history_len  # so the served feed is the trimmed one
    cands = pipeline.stage("recall")(ctx, Candidates.empty()).top(60)
    served = stage(ctx, cands)
    n = len(cands)
    hist = pad_history(ctx.history, stage.history_len)
    feeds = ranker_inputs(stage.table, np.full(n, ctx.user_idx, np.int64), np.tile(ctx.user_fields, (n, 1)), np.tile(hist, (n, 1)), cands.item)
    (per_row,) = stage.session.run(["probs"], feeds)
    np.testing.assert_allclose(served.heads, per_row, rtol=1e-5, atol=1e-6)
    assert served.heads.shape == (n, stage.n_tasks)
