"""Recall paths at their contracts: Swing by hand, the ANN index-recall check, the
streaming frequency estimate, Pixie's walker allocation and boosting, the follow path."""
import itertools

import numpy as np
import pytest

from core.candidates import SOURCE_BITS
from core.context import RequestContext
from retrieval.ann import AnnRecall, build_index, index_recall
from retrieval.graph import FollowRecall, GraphRecall, build_follow, build_graph
from retrieval.itemcf import build_swing, sample_users_per_item


def _ctx(history=(), user_idx=0, emb=None, seed=0):
    h = np.asarray(history, np.int64)
    return RequestContext(
        request_id="r", user_id="u", user_idx=user_idx, user_fields=np.zeros(1, np.int64), history=h,
        history_ts=np.zeros(len(h)), seen=np.zeros(0, np.int64), exclude=np.zeros(0, np.int64),
        user_emb=emb, rng=np.random.default_rng(seed),
    )


def _table_dense(t, n):
    m = np.zeros((n, n))
    for i in range(n):
        a, b = t["indptr"][i], t["indptr"][i + 1]
        m[i, t["indices"][a:b]] = t["data"][a:b]
    return m


def test_swing_by_hand_on_a_tiny_graph():
    # users 0 and 1 share items {0, 1, 2}; user 2 shares {0, 1} with both
    user = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])
    item = np.array([0, 1, 2, 0, 1, 2, 0, 1, 3])
    t = build_swing(user, item, 4, 4, topk=4, alpha1=1.0, alpha2=1.0, beta=1.0)
    w = lambda n: 1.0 / (1.0 + n)  # (α1 + |I_u|)^-β
    # pair (0,1): |∩| = 3 → contributes w3·w3/(1+3) to every item pair inside {0,1,2}
    # pairs (0,2), (1,2): |∩| = 2 → w3·w2/(1+2) to the pair (0,1)
    s01 = w(3) * w(3) / 4 + 2 * w(3) * w(2) / 3
    s02 = w(3) * w(3) / 4
    m = _table_dense(t, 4)
    assert m[0, 1] == pytest.approx(s01, rel=1e-5) and m[1, 0] == pytest.approx(s01, rel=1e-5)
    assert m[0, 2] == pytest.approx(s02, rel=1e-5) and m[2, 1] == pytest.approx(s02, rel=1e-5)
    assert m[3].sum() == 0 and np.all(np.diag(m) == 0)  # a lone user makes no pair; no self-similarity


def test_swing_blocked_build_equals_brute_force():
    rng = np.random.default_rng(0)
    U, I = 50, 25
    user, item = rng.integers(0, U, 500), rng.integers(0, I, 500)
    t = build_swing(user, item, U, I, topk=I, user_block=7, pair_chunk=40)
    sets = {u: set(item[user == u].tolist()) for u in range(U)}
    w = {u: (15 + len(sets[u])) ** -0.3 for u in range(U)}
    brute = np.zeros((I, I))
    for u, v in itertools.combinations(range(U), 2):
        inter = sets[u] & sets[v]
        if len(inter) >= 2:
            for i, j in itertools.permutations(inter, 2):
                brute[i, j] += w[u] * w[v] / len(inter)
    np.testing.assert_allclose(_table_dense(t, I), brute, rtol=1e-5, atol=1e-7)


def test_users_sampled_per_item_are_capped():
    user = np.arange(100)
    item = np.zeros(100, np.int64)
    u, i = sample_users_per_item(np.concatenate([user, [5]]), np.concatenate([item, [1]]), cap=10)
    assert (i == 0).sum() == 10 and (i == 1).sum() == 1


def test_index_recall_check_reaches_target():
    rng = np.random.default_rng(0)
    # clustered vectors (random ones make every ANN index look bad)
    centres = rng.normal(size=(50, 16))
    x = centres[rng.integers(0, 50, 6000)] + 0.3 * rng.normal(size=(6000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[rng.choice(6000, 100, replace=False)]
    index, params = build_index(x, q, k=100, exact_below=1000)
    assert params["type"] == "hnsw32" and params["efSearch"] >= 100
    assert params["recall_at_k"] >= 0.95
    import faiss

    exact = faiss.IndexFlatIP(16)
    exact.add(x)
    assert index_recall(index, exact, q, 100) == pytest.approx(params["recall_at_k"], abs=1e-9)
    # serving never asks for more neighbours than the search explores
    index.hnsw.efSearch = 16
    AnnRecall(index, 300)
    assert index.hnsw.efSearch >= 300
    small, p = build_index(x[:500], q, k=50)
    assert p["type"] == "flat_ip"


def test_ann_recall_contract():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    index, _ = build_index(x, k=50)
    c = AnnRecall(index, 50)(_ctx(emb=x[3]))
    assert len(c) == 50 and c.item[0] == 3 and np.all(np.diff(c.score) <= 0)
    assert np.all(c.source == SOURCE_BITS["ann"])
    assert len(AnnRecall(index, 50)(_ctx(emb=None))) == 0


def test_streaming_frequency_tracks_true_frequency():
    torch = pytest.importorskip("torch")  # noqa: F841  (module imports torch)
    from retrieval.twotower_train import streaming_frequency

    rng = np.random.default_rng(0)
    p = rng.zipf(1.5, 200).astype(float)
    p /= p.sum()
    items = rng.choice(200, 100_000, p=p)
    est = streaming_frequency(items, np.arange(len(items)), 200, alpha=0.02)
    top = np.argsort(-p)[:10]
    np.testing.assert_allclose(est[top], p[top], rtol=0.35)
    assert np.corrcoef(np.log(est[top]), np.log(p[top]))[0, 1] > 0.9


def _line_graph():
    # users 0..3, items 0..5: user u clicked items u, u+1 (a chain) and item 5 is isolated
    user = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    item = np.array([0, 1, 1, 2, 2, 3, 3, 4])
    return build_graph(user, item, 4, 6)


def test_pixie_walkers_per_seed_follow_degree():
    g = _line_graph()
    walk = GraphRecall(g["ui_indptr"], g["ui_indices"], g["iu_indptr"], g["iu_indices"], walkers=100, decay=1.0)
    counts = walk.walker_counts(np.array([0, 1, 5]))  # degrees 1, 2, 0
    assert counts[2] == 0 and counts[1] > counts[0] > 0


def test_pixie_walks_stay_on_the_graph_and_boost_multi_hits():
    g = _line_graph()
    walk = GraphRecall(g["ui_indptr"], g["ui_indices"], g["iu_indptr"], g["iu_indices"], walkers=200, steps=3, restart=0.3, k=10, stop_items=0)
    c = walk(_ctx(history=[0, 4]))
    assert set(c.item.tolist()) <= {0, 1, 2, 3, 4}  # never item 5 (no edges), never outside the catalog
    assert len(np.unique(c.item)) == len(c)
    # item 2 is reached from both ends of the chain; boosted above its single-seed count
    assert 2 in c.item
    assert len(walk(_ctx(history=[5]))) == 0
    assert len(walk(_ctx(history=[]))) == 0


def test_pixie_early_stop_ends_the_walk_once_enough_items_are_visited_often():
    g = _line_graph()
    walk = lambda steps, stop_items, stop_visits: GraphRecall(  # noqa: E731
        g["ui_indptr"], g["ui_indices"], g["iu_indptr"], g["iu_indices"], walkers=200, steps=steps, restart=0.3, k=10,
        stop_items=stop_items, stop_visits=stop_visits)(_ctx(history=[0, 4], seed=3))
    full = walk(30, 0, 0)
    # 3 items with 5 visits each: reached after the second hop (≈ 400 visits over 5 items), so
    # the walk is the 2-hop walk (same random draws), far fewer visits than 30 hops
    stopped = walk(30, 3, 5)
    two = walk(2, 0, 0)
    assert np.array_equal(stopped.item, two.item) and np.allclose(stopped.score, two.score)
    assert stopped.score.sum() < full.score.sum() / 5
    # a bar no walk can reach (more visits than 30 hops make) never stops it
    never = walk(30, 6, 10_000)
    assert np.array_equal(never.item, full.item) and np.allclose(never.score, full.score)


def test_follow_path_returns_newest_items_of_followed_authors():
    item_author = np.array([0, 0, 0, 1, 1, 2])
    created = np.array([1.0, 3.0, 2.0, 5.0, 4.0, 9.0]) * 86400
    f = build_follow(np.array([0, 2, 2]), np.array([0, 1]), item_author, created, 3, per_author=2)
    rec = FollowRecall(f["user_indptr"], f["user_authors"], f["author_indptr"], f["author_items"], created, k=10, per_author=2)
    c = rec(_ctx(user_idx=0))
    assert c.item.tolist() == [3, 4, 1, 2]  # newest first; author 0's oldest item (0) beyond per_author
    assert 5 not in c.item  # author 2 not followed
    assert len(rec(_ctx(user_idx=1))) == 0 and len(rec(_ctx(user_idx=-1))) == 0


def test_ivf_index_reaches_target_recall():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 16))
    x = centres[rng.integers(0, 40, 8000)] + 0.3 * rng.normal(size=(8000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[rng.choice(8000, 100, replace=False)]
    index, params = build_index(x, q, k=100, exact_below=1000, ivf_from=5000)
    assert params["type"] == "ivf_fp16" and index.nprobe == params["nprobe"]
    assert params["recall_at_k"] >= 0.95


def test_two_tower_with_content_exports_one_history_table(tmp_path):
    """Content vectors enter the item input; the exported user tower folds them into one
    history table and gives the same query vectors as torch."""
    import onnx

    from core.bundle import onnx_session
    from rank.features import user_tower_inputs
    from retrieval.twotower_train import export_user_tower, train_two_tower, user_embeddings

    rng = np.random.default_rng(0)
    n_users, n_items, L = 40, 60, 5
    dense = rng.normal(size=(n_items, 4)).astype(np.float32)
    rows = 400
    users = rng.integers(0, n_users, rows)
    tt = train_two_tower(
        n_users=n_users, n_items=n_items, user_vocabs=[3], item_vocabs=[4], item_fields=rng.integers(0, 4, (n_items, 1)),
        row_user=users, row_user_fields=rng.integers(0, 3, (rows, 1)), row_hist=rng.integers(0, n_items + 1, (rows, L)),
        row_item=rng.integers(0, n_items, rows), item_dense=dense, dim=8, epochs=1, batch_size=64,
    )
    assert tt.user_tower.hist_input.content is not None
    path = tmp_path / "user_tower.onnx"
    export_user_tower(tt.user_tower, 1, L, path)
    inits = {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}
    assert (n_items + 1, 8) in inits.values() and not any(d == (n_items + 1, 4) for d in inits.values())  # one folded table
    uidx, uf, hist = np.arange(6), rng.integers(0, 3, (6, 1)), rng.integers(0, n_items + 1, (6, L))
    hist[0] = 0  # empty history
    (onnx_out,) = onnx_session(path).run(["user_emb"], user_tower_inputs(uidx, uf, hist))
    assert np.allclose(onnx_out, user_embeddings(tt.user_tower, uidx, uf, hist), atol=1e-5)


def test_recall_distillation_moves_the_towers_toward_the_teachers_order():
    """distill_two_tower: after fine-tuning on the teacher's scores of sampled pools, the
    two-tower ranks the teacher's top items of *other* users' pools higher than before (the
    teacher here is a function of the user's profile field and the item's content, which the
    towers can express; the held-out users were never trained on)."""
    from app.build import pool_agreement
    from retrieval.twotower_train import distill_two_tower, train_two_tower

    rng = np.random.default_rng(1)
    n_users, n_items, L, P = 300, 400, 5, 120
    dense = rng.normal(size=(n_items, 6)).astype(np.float32)
    ufield = rng.integers(0, 4, (n_users, 1))
    taste = rng.normal(size=(4, 6)).astype(np.float32)
    rows = 3000
    ru = rng.integers(0, n_users, rows)
    tt = train_two_tower(  # trained on random clicks: it knows nothing of the teacher's order
        n_users=n_users, n_items=n_items, user_vocabs=[4], item_vocabs=[3], item_fields=rng.integers(0, 3, (n_items, 1)),
        row_user=ru, row_user_fields=ufield[ru], row_hist=rng.integers(0, n_items + 1, (rows, L)),
        row_item=rng.integers(0, n_items, rows), item_dense=dense, dim=8, epochs=1, batch_size=256,
    )
    users = np.arange(n_users)
    hist = rng.integers(0, n_items + 1, (n_users, L))
    pools = np.stack([rng.choice(n_items, P, replace=False) for _ in users])
    teacher = np.einsum("uc,upc->up", taste[ufield[:, 0]], dense[pools]).astype(np.float32)
    fit, held = users[:250], users[250:]

    class DS:  # the two fields pool_agreement reads
        user_fields = ufield

    before = pool_agreement(tt, DS, held, hist[held], pools[held], teacher[held], k=10, top=30)
    out = distill_two_tower(tt, user_idx=fit, user_fields=ufield[fit], hist=hist[fit], pools=pools[fit], teacher=teacher[fit],
                            epochs=8, batch_users=16, lr=3e-3)
    after = pool_agreement(out, DS, held, hist[held], pools[held], teacher[held], k=10, top=30)
    assert out.item_emb.shape == (n_items, 8)
    assert np.allclose(np.linalg.norm(out.item_emb, axis=1), 1.0, atol=1e-4)
    assert after > before + 0.2, (before, after)
