"""`funnel eval`: offline metrics of a bundle on the held-out split of its own dataset.

Per recall path (and popular as the baseline) and for the full pipeline: recall@K and
NDCG@K of each user's held-out positives, given only the user's training history.
Ranker: AUC and log-loss per task on held-out rows, scored through the exported ONNX model.
"""
from __future__ import annotations

import numpy as np

from app.build import head_metrics, load_dataset, ranker_rows
from app.pipeline import Pipeline
from core.bundle import Bundle
from core.candidates import Candidates
from core.offline_metrics import recall_ndcg_at_k
from core.settings import Settings
from rank.features import ItemTable, model_history, ranker_inputs
from sim.dataset import recent_history


def evaluate(bundle_path, k: int = 20, max_users: int = 2000, seed: int = 0, settings: Settings | None = None) -> dict:
    settings = settings or Settings()
    bundle = Bundle.load(bundle_path, threads=settings.compute_threads)
    ds = load_dataset(bundle.manifest["source"])
    if ds.n_items != bundle.n_items or ds.n_users != bundle.n_users:
        raise ValueError("the dataset rebuilt from the manifest does not match the bundle's catalog")
    pipe = Pipeline(bundle, settings)
    user_stage, recall = pipe.stages[0], pipe.stages[1]

    test_pos = ds.test & ds.positive
    users = np.unique(ds.ev_user[test_pos])
    rng = np.random.default_rng(seed)
    if len(users) > max_users:
        users = np.sort(rng.choice(users, max_users, replace=False))
    # relevant items per user (CSR over the sorted test positives)
    tu, ti = ds.ev_user[test_pos], ds.ev_item[test_pos]
    names = [s.name for s in recall.sources]
    sums = {n: [0.0, 0.0, 0] for n in names + ["pipeline"]}
    for u in users:
        relevant = np.unique(ti[tu == u])
        ctx = pipe.context(
            request_id=f"eval-{u}", user_id=str(bundle.user_ids[u]), count=k, scene="eval",
            exclude_item_ids=[], events=[], seed=int(u),
        )
        user_stage(ctx, Candidates.empty())
        blocked = ctx.blocked()
        for src in recall.sources:
            c = src(ctx)
            c = c.take(np.flatnonzero(~np.isin(c.item, blocked))).top(k)
            r, n = recall_ndcg_at_k(c.item, relevant, k)
            sums[src.name][0] += r
            sums[src.name][1] += n
            sums[src.name][2] += 1
        ctx.user_emb = None
        out, _ = pipe.run(ctx)
        r, n = recall_ndcg_at_k(out.item, relevant, k)
        sums["pipeline"][0] += r
        sums["pipeline"][1] += n
        sums["pipeline"][2] += 1
    report = {
        name: {f"recall@{k}": round(v[0] / max(v[2], 1), 4), f"ndcg@{k}": round(v[1] / max(v[2], 1), 4), "users": v[2]}
        for name, v in sums.items()
    }

    # Ranker on held-out rows, through the exported ONNX model
    hist = model_history(recent_history(ds.ev_user, ds.ev_item, ds.positive, ds.n_users, ds.schema.history_len))
    pop = np.expm1(bundle.item_pop.astype(np.float64))
    neg_p = (pop + 1.0) ** 0.75
    neg_p /= neg_p.sum()
    te_u, te_i, te_h, te_y = ranker_rows(ds, np.flatnonzero(ds.test), hist, np.random.default_rng(seed + 1), 4, neg_p)
    table = ItemTable(bundle.item_fields, bundle.item_pop, pipe.stages[3].table.category_col)
    probs = []
    for s in range(0, len(te_u), 8192):
        sl = slice(s, s + 8192)
        feeds = ranker_inputs(table, te_u[sl], ds.user_fields[te_u[sl]], te_h[sl], te_i[sl])
        probs.append(bundle.ranker.run(["probs"], feeds)[0])
    ranker = head_metrics(ds.schema, te_y, np.concatenate(probs))
    return {
        "bundle": bundle.version,
        "dataset": ds.schema.dataset,
        "k": k,
        "users": int(len(users)),
        "recall": {n: report[n] for n in names},
        "popular_baseline": report["popular"],
        "pipeline": report["pipeline"],
        "ranker_auc": {t: v["auc"] for t, v in ranker.items()},
        "ranker": ranker,
    }
