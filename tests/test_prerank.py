"""Pre-rank stage B (prerank/): the cascade's cut contract, its bundle artefact and manifest
check, ONNX export parity and distillation from a teacher."""
import json
import shutil

import numpy as np
import pytest

from core.bundle import MANIFEST, Bundle, BundleError
from core.candidates import Candidates
from fusion.formula import fused_log_score, params_vectors
from rank.features import ItemTable, pad_history, ranker_inputs


def _ctx(pipeline, user=None, count=10):
    b = pipeline.bundle
    uid = user or str(b.user_ids[np.flatnonzero(np.diff(b.hist_indptr) > 0)[0]])
    ctx = pipeline.context(request_id="t", user_id=uid, count=count, scene="home", exclude_item_ids=[], events=[], seed=0)
    pipeline.stage("user_tower")(ctx, Candidates.empty())
    return ctx


def test_bundle_carries_stage_b_with_its_signature_and_metrics(loaded_bundle):
    b = loaded_bundle
    assert b.prerank is not None and "prerank.onnx" in b.manifest["files"]
    sig = b.manifest["models"]["prerank"]
    assert sig["outputs"]["probs"][1] == len(b.schema.tasks)
    assert set(b.manifest["metrics"]["prerank_heldout"]) == set(b.schema.task_names)


def test_stage_b_cuts_to_its_keep_by_the_fused_student_score(pipeline):
    ctx = _ctx(pipeline)
    a = pipeline.stage("prerank_a")(ctx, pipeline.stage("recall")(ctx, Candidates.empty()))
    stage_b = pipeline.stage("prerank_b")
    assert len(a) > stage_b.keep, "the test world must give stage B something to cut"
    out = stage_b(ctx, a)
    assert len(out) == stage_b.keep
    assert set(out.item.tolist()) <= set(a.item.tolist()) and len(np.unique(out.item)) == len(out)
    assert np.all(np.diff(out.score) <= 0), "stage B hands the ranker its candidates best first"
    # the score is the fusion formula over the student's heads, and nothing scored higher was cut
    b = pipeline.bundle
    feeds = ranker_inputs(stage_b.table, np.array([ctx.user_idx]), ctx.user_fields.reshape(1, -1),
                          pad_history(ctx.history, b.schema.history_len).reshape(1, -1), a.item)
    probs = b.prerank.run(["probs"], feeds)[0]
    alpha, beta = params_vectors(b.schema.task_names, ctx.fusion or pipeline.fusion_params)
    full = fused_log_score(probs, alpha, beta)
    pos = {int(item): k for k, item in enumerate(a.item)}
    np.testing.assert_allclose(out.score, full[[pos[int(i)] for i in out.item]], rtol=1e-5, atol=1e-6)
    assert out.score.min() >= np.sort(full)[-stage_b.keep] - 1e-6
    # fewer candidates than the cut: passed through untouched, in stage A's order
    few = a.top(stage_b.keep - 1)
    same = stage_b(ctx, few)
    np.testing.assert_array_equal(same.item, few.item)


def test_served_ranker_scores_at_most_stage_b_keep(pipeline):
    ctx = pipeline.context(request_id="t2", user_id=str(pipeline.bundle.user_ids[1]), count=10, scene="home",
                           exclude_item_ids=[], events=[], seed=0, debug=True)
    _, trace = pipeline.run(ctx)
    by = {t.name: t for t in trace}
    assert [t.name for t in trace].index("prerank_b") == [t.name for t in trace].index("prerank_a") + 1
    assert by["rank"].n_in == by["prerank_b"].n_out <= pipeline.settings.prerank_b_keep


def test_prerank_manifest_mismatch_with_onnx_inputs_is_refused(ml_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(ml_bundle, dst)
    m = json.loads((dst / MANIFEST).read_text())
    m["models"]["prerank"]["inputs"]["item_fields"] = [None, 99]
    (dst / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="prerank"):
        Bundle.load(dst)


def _world(n_users=50, n_items=80, n_user_fields=2, n_item_fields=2, L=6, seed=0):
    rng = np.random.default_rng(seed)
    table = ItemTable(rng.integers(0, 5, (n_items, n_item_fields)), rng.random(n_items).astype(np.float32), 0)
    user_fields = rng.integers(0, 4, (n_users, n_user_fields))
    hist = rng.integers(0, n_items + 1, (n_users, L))  # model ids, 0 = pad
    return rng, table, user_fields, hist


@pytest.mark.parametrize("kind", ["prerank", "ranker", "ranker-mean", "ranker-cgc", "ranker-content"])
def test_onnx_export_matches_torch_with_the_user_side_fed_once(kind, tmp_path):
    import onnxruntime as ort
    import torch

    from prerank.train import PrerankNet, export_prerank
    from rank.train import INPUT_NAMES, MultiTaskRanker, export_ranker

    rng, table, user_fields, hist = _world()
    torch.manual_seed(0)
    args = (50, 80, [4, 4], [5, 5], 3)
    # the ranker: MMoE with DIN attention over history keys that carry the items' field codes,
    # the mean-pooled ablation, CGC (task-owned experts, masked gates), and item content vectors
    # (folded into the id table at export)
    content = rng.normal(size=(80, 3)).astype(np.float32) if kind == "ranker-content" else None
    model = PrerankNet(*args) if kind == "prerank" else MultiTaskRanker(
        *args, table.item_fields, attention=kind != "ranker-mean", task_experts=int(kind == "ranker-cgc"), item_dense=content)
    with torch.no_grad():  # non-trivial weights everywhere, not only the initialisation
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if kind != "prerank":  # the ranker's per-head calibration travels in the export
            model.calib_scale.copy_(0.5 + torch.rand_like(model.calib_scale))
            model.calib_shift.copy_(torch.randn_like(model.calib_shift))
    model.eval()
    path = tmp_path / f"{kind}.onnx"
    (export_prerank if kind == "prerank" else export_ranker)(model, 2, 2, 6, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    items = rng.integers(0, 80, 37)
    u = 7
    once = ranker_inputs(table, np.array([u]), user_fields[[u]], hist[[u]], items)  # serving: batch-1 user side
    per_row = ranker_inputs(table, np.full(37, u), user_fields[np.full(37, u)], hist[np.full(37, u)], items)
    got = sess.run(["probs"], once)[0]
    with torch.no_grad():
        want = model(*(torch.from_numpy(np.ascontiguousarray(per_row[k])) for k in INPUT_NAMES)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the history axis is dynamic: a history fed only as long as the user's (serving, trim)
    # scores as the padded one does
    full = dict(once, hist=np.array([[5, 9, 2, 0, 0, 0]]))
    short = dict(once, hist=np.array([[5, 9, 2]]))
    np.testing.assert_allclose(sess.run(["probs"], short)[0], sess.run(["probs"], full)[0], atol=1e-5)


def test_distillation_learns_the_teacher_where_there_are_no_labels():
    """Rows without any hard label (what recall returns): the soft targets alone must teach
    the student the teacher's order (rank correlation 0.81 here; an untrained one is ~0)."""
    import torch

    from prerank.train import train_prerank
    from rank.train import MultiTaskRanker, predict

    rng, table, user_fields, hist = _world(n_users=200, n_items=300, seed=1)
    torch.manual_seed(1)
    teacher = MultiTaskRanker(200, 300, [4, 4], [5, 5], 2)
    with torch.no_grad():
        teacher.user_emb.weight.mul_(20)
        teacher.item_emb.weight.mul_(20)
    teacher.eval()

    def rows(n, seed):
        r = np.random.default_rng(seed)
        u, i = r.integers(0, 200, n), r.integers(0, 300, n)
        return ranker_inputs(table, u, user_fields[u], hist[u], i)

    train, test = rows(40_000, 2), rows(5_000, 3)
    soft = predict(teacher, train)
    kw = dict(n_users=200, n_items=300, user_vocabs=[4, 4], item_vocabs=[5, 5], epochs=3, seed=0)
    no_labels = np.full((len(soft), 2), np.nan, np.float32)
    student = train_prerank(train, no_labels, soft, **kw).model
    t = predict(teacher, test)[:, 0]
    s = predict(student, test)[:, 0]
    corr = np.corrcoef(np.argsort(np.argsort(t)), np.argsort(np.argsort(s)))[0, 1]
    assert corr > 0.6, f"student's rank correlation with the teacher {corr:.3f}"


def test_features_offline_equal_online(ml_folder, pipeline):
    """The rows the ranker and stage B were trained on and the feeds serving builds agree, for
    a user at the end of their training history: the same history ids (bundle history vs the
    training log), profile fields, item fields and dense match features."""
    from app.build import _table, last_train_history
    from retrieval.popular import build_popular
    from sim.ml100k import load_ml100k

    ds = load_ml100k(ml_folder)
    b = pipeline.bundle
    train_pos = ~ds.test & ds.positive
    pop = build_popular(ds.ev_item[train_pos], ds.ev_ts[train_pos], ds.n_items)
    offline_table = _table(ds, np.log1p(pop).astype(np.float32))
    users = np.unique(ds.ev_user[train_pos])[:25]
    items = np.random.default_rng(0).integers(0, ds.n_items, 40)
    hist = last_train_history(ds, train_pos, users)
    for k, u in enumerate(users):
        ctx = pipeline.context(request_id="p", user_id=str(b.user_ids[u]), count=10, scene="home", exclude_item_ids=[], events=[], seed=0)
        online = ranker_inputs(pipeline.stage("rank").table, np.array([ctx.user_idx]), ctx.user_fields.reshape(1, -1),
                               pad_history(ctx.history, b.schema.history_len).reshape(1, -1), items)
        offline = ranker_inputs(offline_table, np.full(len(items), u), ds.user_fields[np.full(len(items), u)],
                                np.repeat(hist[[k]], len(items), axis=0), items)
        for name in ("user_idx", "user_fields", "hist"):
            np.testing.assert_array_equal(online[name][0], offline[name][0], err_msg=name)
        for name in ("item_idx", "item_fields"):
            np.testing.assert_array_equal(online[name], offline[name], err_msg=name)
        np.testing.assert_allclose(online["dense"], offline["dense"], rtol=1e-6, err_msg="dense")


def test_follow_flags_match_the_graph_row_by_row_and_per_user():
    """`author_followed`: the batched path (a user per row: training) and the one-user path
    (serving) both equal a direct lookup; unknown users and authorless items are 0."""
    from rank.features import FollowGraph

    rng = np.random.default_rng(0)
    indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 5, 100))])
    authors = rng.integers(0, 30, indptr[-1])
    item_author = rng.integers(-1, 35, 200)  # -1: no author; 30-34: authors nobody follows
    g = FollowGraph(indptr, authors, item_author)

    def direct(u, i):
        return float(0 <= u < 100 and item_author[i] >= 0 and item_author[i] in set(authors[indptr[u]:indptr[u + 1]].tolist()))

    users, items = rng.integers(-1, 103, 5000), rng.integers(0, 200, 5000)
    want = np.array([direct(u, i) for u, i in zip(users, items)], np.float32)
    np.testing.assert_array_equal(g.flags(users, items), want)
    assert 100 < want.sum() < 4900
    for u in range(-1, 103):
        np.testing.assert_array_equal(g.flags(np.array([u]), items[:60]), [direct(u, i) for i in items[:60]])


@pytest.mark.parametrize("with_categories,with_follows", [(True, True), (True, False), (False, True), (False, False)])
def test_serving_feed_equals_the_per_row_feed_exactly(with_categories, with_follows):
    """The one-user feed (serving: a compiled pass over the items) holds the same fields and
    dense features, bit for bit, as the per-row numpy assembly training uses; users with no
    history, with authors they follow and with none, items without an author."""
    from rank.features import FollowGraph, user_side, feed_for

    rng = np.random.default_rng(3)
    n_items, n_users = 300, 40
    fields = np.stack([rng.integers(0, 12, n_items), rng.integers(0, 25, n_items)], axis=1).astype(np.int64)  # category, author + 1
    pop = rng.normal(size=n_items).astype(np.float32)
    follows = None
    if with_follows:
        indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 6, n_users))])
        follows = FollowGraph(indptr, rng.integers(0, 24, indptr[-1]), fields[:, 1] - 1)
    table = ItemTable(fields, pop, 0 if with_categories else None, follows)
    items = rng.integers(0, n_items, 150)
    for u in range(n_users):
        h = rng.integers(0, n_items, rng.integers(0, 9))
        hist = pad_history(h, 8)
        once = feed_for(table, user_side(table, np.array([u]), np.zeros((1, 3), np.int64), hist[None, :]), items)
        per_row = feed_for(table, user_side(table, np.full(len(items), u), np.zeros((len(items), 3), np.int64), np.tile(hist, (len(items), 1))), items)
        for k in ("item_idx", "item_fields", "dense"):
            assert once[k].dtype == per_row[k].dtype, k
            np.testing.assert_array_equal(once[k], per_row[k], err_msg=k)
        if with_categories and len(h):
            assert once["dense"][:, 2].any()
    side = user_side(table, np.array([0]), np.zeros((1, 3), np.int64), pad_history(np.array([1, 2]), 8)[None, :])
    for bad in (n_items, -1):
        with pytest.raises(IndexError):
            feed_for(table, side, np.array([3, bad]))
