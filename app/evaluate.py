"""`funnel eval`: offline metrics of a bundle on the held-out split of its own dataset.

- Per recall path (popular is the baseline), for the merged recall and for the full
  pipeline: recall@K and NDCG@K of each user's held-out positives, given only the user's
  training history.
- Each path's unique share: of the merged candidates a path contributed, the share no
  other path found.
- Ranker agreement: the share of the ranker's exhaustive top-20 by its click head over the
  whole catalog (unseen items) that the merged recall contains.
- Funnel consistency@20: the share of that top-20 the served funnel (recall → prerank A →
  prerank B) hands the ranker, and the ranker rows it scored as a share of the catalog.
  The ranker's top-20 is taken in the order the ranker stage serves, its heads through the
  request's fusion formula (`kept`); `kept_click_head` orders by the click head alone. Both
  also after recall and after stage A, to show where the funnel loses.
- Ranker and pre-ranker (stage B): AUC and log-loss per task on held-out rows, scored
  through the exported ONNX models, and the pre-ranker's AUC gap to the ranker.
"""
from __future__ import annotations

import numpy as np

from app.build import cap_rows, head_metrics, history_ids, load_dataset, ranker_rows
from app.pipeline import Pipeline
from core.bundle import Bundle
from core.candidates import SOURCE_BITS, Candidates
from core.offline_metrics import recall_ndcg_at_k
from core.settings import Settings
from rank.features import ItemTable, ranker_inputs, request_inputs

KS = (20, 50, 200, 1000)


def _eval_settings(base: Settings, depth: int) -> tuple[Settings, Settings]:
    """(per-path settings that let every path return `depth` candidates,
    merge settings: the serving quotas scaled so the merged recall holds `depth`)."""
    paths = base.model_copy(update={
        "ann_k": depth, "quota_itemcf": depth // 2, "quota_graph": depth // 2, "quota_popular": depth,
        "quota_fresh": depth, "quota_follow": depth // 2, "graph_walkers": max(base.graph_walkers, 2 * depth),
    })
    q = base.quotas()
    scale = depth / max(base.recall_total, 1)
    merged = base.model_copy(update={
        **{f"quota_{k}": max(1, int(round(v * scale))) for k, v in q.items()},
        "recall_total": depth, "ann_k": max(base.ann_k, int(round(q["ann"] * scale))),
        "graph_walkers": max(base.graph_walkers, int(base.graph_walkers * scale)),
    })
    return paths, merged


def _accumulate(acc: dict, name: str, ranked: np.ndarray, relevant: np.ndarray, ks) -> None:
    row = acc.setdefault(name, {k: [0.0, 0.0] for k in ks} | {"users": 0})
    for k in ks:
        r, n = recall_ndcg_at_k(ranked, relevant, k)
        row[k][0] += r
        row[k][1] += n
    row["users"] += 1


def _finish(acc: dict, ks) -> dict:
    out = {}
    for name, row in acc.items():
        u = max(row["users"], 1)
        cut = [k for k in ks if k in row]
        out[name] = {**{f"recall@{k}": round(row[k][0] / u, 4) for k in cut}, **{f"ndcg@{k}": round(row[k][1] / u, 4) for k in cut}, "users": row["users"]}
    return out


def _exhaustive_topk(bundle: Bundle, table: ItemTable, ctx, k: int, fusion, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The ranker's top-k over every unseen item in the catalog: (by the request's fusion of
    its heads, the order the ranker stage serves; by its first head, click)."""
    cand = np.setdiff1d(np.arange(bundle.n_items), ctx.blocked(), assume_unique=True)
    probs = np.empty((len(cand), len(bundle.schema.tasks)), np.float32)
    broadcast = bool(bundle.manifest["models"]["ranker"].get("user_broadcast", False))
    for s in range(0, len(cand), chunk):
        c = cand[s : s + chunk]
        # the user side once, as serving feeds it (the exported attention's per-user blocks
        # would otherwise be built for every row)
        feeds = request_inputs(table, ctx, bundle.schema.history_len, c, 1 if broadcast else len(c))
        probs[s : s + len(c)] = bundle.ranker.run(["probs"], feeds)[0]
    kk = min(k, len(cand) - 1)
    return tuple(cand[np.argpartition(-scores, kk)[:k]] for scores in (fusion.score(ctx, probs), probs[:, 0]))


def evaluate(
    bundle_path, k: int = 20, max_users: int = 2000, seed: int = 0, settings: Settings | None = None,
    agreement_users: int = 200, agreement_max_items: int = 200_000,
) -> dict:
    settings = settings or Settings()
    bundle = Bundle.load(bundle_path, threads=settings.compute_threads)
    ds = load_dataset(bundle.manifest["source"])
    if ds.n_items != bundle.n_items or ds.n_users != bundle.n_users:
        raise ValueError("the dataset rebuilt from the manifest does not match the bundle's catalog")
    ks = tuple(sorted({k, *KS}))
    depth = max(ks)
    path_settings, merge_settings = _eval_settings(settings, depth)
    serving = Pipeline(bundle, settings)
    paths = Pipeline(bundle, path_settings)
    merging = Pipeline(bundle, merge_settings)
    table = serving.stage("rank").table

    test_pos = ds.test & ds.positive
    users = np.unique(ds.ev_user[test_pos])
    rng = np.random.default_rng(seed)
    if len(users) > max_users:
        users = np.sort(rng.choice(users, max_users, replace=False))
    agree_users = set(rng.choice(users, min(agreement_users, len(users)), replace=False).tolist()) if bundle.n_items <= agreement_max_items else set()
    tu, ti = ds.ev_user[test_pos], ds.ev_item[test_pos]
    order = np.argsort(tu, kind="stable")
    tu, ti = tu[order], ti[order]
    names = [s.name for s in paths.stage("recall").sources]
    acc: dict = {}
    unique = {n: [0, 0] for n in names}  # [only this path, contributed by this path]
    merged_sizes, agreement = [], []
    for u in users:
        relevant = np.unique(ti[np.searchsorted(tu, u) : np.searchsorted(tu, u, side="right")])
        ctx = paths.context(request_id=f"eval-{u}", user_id=str(bundle.user_ids[u]), count=k, scene="eval", exclude_item_ids=[], events=[], seed=int(u))
        paths.stage("user_tower")(ctx, Candidates.empty())
        blocked = ctx.blocked()
        for src in paths.stage("recall").sources:
            c = src(ctx)
            c = c.take(np.flatnonzero(~np.isin(c.item, blocked))).top(depth)
            _accumulate(acc, src.name, c.item, relevant, ks)
        merged = merging.stage("recall")(ctx, Candidates.empty())  # merge priority order
        _accumulate(acc, "merged", merged.item, relevant, ks)
        merged_sizes.append(len(merged))
        for n in names:
            bit = SOURCE_BITS[n]
            has = (merged.source & bit) != 0
            unique[n][0] += int(np.count_nonzero(merged.source[has] == bit))
            unique[n][1] += int(np.count_nonzero(has))
        if u in agree_users:
            top, top_click = _exhaustive_topk(bundle, table, ctx, 20, serving.stage("fusion"))
            serving_merged = serving.stage("recall")(ctx, Candidates.empty())
            # the funnel as served up to the ranker: recall → prerank A → prerank B (if any)
            after_a = serving.stage("prerank_a")(ctx, serving_merged)
            kept = serving.stage("prerank_b")(ctx, after_a) if bundle.prerank is not None else after_a
            agreement.append({
                "merged": np.isin(top_click, merged.item).mean(), "ranked": len(kept), "after_a_rows": len(after_a),
                **{f"{name}{cut}": np.isin(t, c.item).mean() for name, t in (("fused", top), ("click", top_click))
                   for cut, c in (("_after_recall", serving_merged), ("_after_a", after_a), ("", kept))},
            })
        ctx.user_emb = None
        ctx.trace_extra = {}
        out, _ = serving.run(ctx)  # ctx.count == k
        _accumulate(acc, "pipeline", out.item, relevant, (k,))
    report = _finish(acc, ks)
    pipeline = {f"recall@{k}": report["pipeline"][f"recall@{k}"], f"ndcg@{k}": report["pipeline"][f"ndcg@{k}"], "users": report["pipeline"]["users"]}

    # Ranker on held-out rows (the same rows and negatives as the build), through ONNX
    pop = np.expm1(bundle.item_pop.astype(np.float64))
    neg_p = (pop + 1.0) ** 0.75
    neg_p /= neg_p.sum()
    b = bundle.manifest.get("build", {})
    ev_rows = cap_rows(np.flatnonzero(ds.test), b.get("max_eval_rows", 500_000), np.random.default_rng(b.get("seed", 0) + 1))
    te_u, te_i, te_h, te_y = ranker_rows(ds, ev_rows, history_ids(ds, ev_rows), np.random.default_rng(b.get("seed", 0) + 1), b.get("n_neg", 2), neg_p)

    def heldout(session) -> dict:
        probs = []
        for s in range(0, len(te_u), 1024):  # a user per row: the attention's blocks are per row
            sl = slice(s, s + 1024)
            probs.append(session.run(["probs"], ranker_inputs(table, te_u[sl], ds.user_fields[te_u[sl]], te_h[sl], te_i[sl]))[0])
        return head_metrics(ds.schema, te_y, np.concatenate(probs))

    ranker = heldout(bundle.ranker)
    prerank = heldout(bundle.prerank) if bundle.prerank is not None else None
    share = lambda key: round(float(np.mean([a[key] for a in agreement])), 4) if agreement else None  # noqa: E731
    return {
        "bundle": bundle.version,
        "dataset": ds.schema.dataset,
        "k": k,
        "users": int(len(users)),
        "recall": {n: report[n] for n in names},
        "popular_baseline": report["popular"],
        "merged_recall": report["merged"],
        "pipeline": pipeline,
        "unique_share": {n: round(v[0] / v[1], 4) if v[1] else 0.0 for n, v in unique.items()},
        "merged_size": float(np.mean(merged_sizes)) if merged_sizes else 0.0,
        "ranker_agreement@20": {
            "users": len(agreement),
            f"merged_{depth}": share("merged"),
            f"serving_{settings.recall_total}": share("click_after_recall"),
        },
        # share of the ranker's exhaustive top-20 the funnel hands the ranker, and the ranker
        # rows it scores as a share of the catalog (exhaustive ranking = 1)
        "funnel_consistency@20": {
            "users": len(agreement),
            "kept": share("fused"),
            "kept_after_recall": share("fused_after_recall"),
            "kept_after_a": share("fused_after_a"),
            "kept_click_head": share("click"),
            "kept_click_head_after_recall": share("click_after_recall"),
            "kept_click_head_after_a": share("click_after_a"),
            "ranked_per_request": round(share("ranked"), 1) if agreement else None,
            "rank_compute_share": round(share("ranked") / bundle.n_items, 5) if agreement else None,
            "prerank_b_rows_share": round(share("after_a_rows") / bundle.n_items, 5) if agreement and bundle.prerank is not None else None,
        },
        "ranker_auc": {t: v["auc"] for t, v in ranker.items()},
        "ranker": ranker,
        "prerank_auc": {t: v["auc"] for t, v in prerank.items()} if prerank else None,
        "prerank_gap_to_ranker": {t: round(ranker[t]["auc"] - prerank[t]["auc"], 4) for t in ranker} if prerank else None,
        "prerank": prerank,
        "settings": {"per_path_depth": depth, "merge_quotas": merge_settings.quotas(), "serving_quotas": settings.quotas(), "recall_total": settings.recall_total},
    }
