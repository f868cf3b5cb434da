"""`funnel build`: train everything the server needs and export one bundle directory.

Training side only (imports torch); the server loads just the exported artefacts.
Everything is fitted on the training split; the held-out split is for `funnel eval`.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.bundle import write_manifest
from core.offline_metrics import auc, calibration_error, logloss
from core.schema import Schema
from rank.features import ItemTable, model_history, ranker_inputs
from retrieval.ann import build_index
from retrieval.graph import build_follow, build_graph
from retrieval.itemcf import build_itemcf, build_swing
from retrieval.popular import build_popular
from sim.dataset import Dataset, recent_history

console = Console(stderr=True)


# Ranker loss weight per task (others 1). Click weighs 3: it is the order the funnel ranks by
# and the only label on catalog negatives; at weight 1 the six other tasks pulled the shared
# embeddings and a click-only model beat the multi-task one on click (100k world, held-out
# click AUC 0.7421 vs 0.7527; weight 3: 0.7520, and long view 0.6267 -> 0.6308).
RANK_TASK_WEIGHTS: dict[str, float] = {"click": 3.0}


def load_dataset(source: dict) -> Dataset:
    """Rebuild the dataset a bundle was trained on (deterministic), from manifest['source']."""
    if source["dataset"] == "ml-100k":
        from sim.ml100k import fetch_ml100k, load_ml100k

        folder = Path(source["path"])
        if not folder.exists():
            folder = fetch_ml100k(folder.parent)
        return load_ml100k(folder, source.get("test_frac", 0.2))
    if source["dataset"] == "synthetic":
        from sim.synthetic import WorldConfig, SyntheticWorld

        return SyntheticWorld(WorldConfig(**source["world"])).generate_log()
    raise ValueError(f"unknown dataset {source['dataset']!r}")


def _table(ds: Dataset, item_pop: np.ndarray) -> ItemTable:
    return ItemTable.for_schema(ds.item_fields, item_pop, ds.schema, ds.follow_indptr, ds.follow_authors)


def history_ids(ds: Dataset, rows: np.ndarray) -> np.ndarray:
    """Model-id history (0-padded) before each of `rows`: the user's positives strictly before it."""
    return model_history(recent_history(ds.ev_user, ds.ev_item, ds.positive, ds.n_users, ds.schema.history_len, rows))


def epoch_budget(epochs: int, rows: int, max_samples: int) -> int:
    """Epochs to train, at most `epochs` and within `max_samples` rows seen (at least one)."""
    return max(1, min(epochs, max_samples // max(rows, 1)))


def cap_rows(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most `cap` of `rows`, sampled uniformly, kept in order."""
    return rows if len(rows) <= cap else np.sort(rng.choice(rows, cap, replace=False))


def last_train_history(ds: Dataset, train_pos: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Each user's model-id history after all of their training positives [len(users), L]."""
    L = ds.schema.history_len
    rows = np.flatnonzero(train_pos)
    last = np.full(ds.n_users, -1, np.int64)
    last[ds.ev_user[rows]] = rows  # rows sorted by (user, ts): the last assignment wins
    h = np.zeros((len(users), L), np.int64)
    has = last[users] >= 0
    if has.any():
        # history strictly before the last positive, then the last positive itself in front
        prev = history_ids(ds, last[users][has])
        h[has] = np.concatenate([ds.ev_item[last[users][has]][:, None] + 1, prev[:, :-1]], axis=1)
    return h


def ranker_rows(
    ds: Dataset, rows: np.ndarray, hist: np.ndarray, rng: np.random.Generator, n_neg: int, neg_p: np.ndarray,
    hard_pool: np.ndarray | None = None, n_hard: int = 0,
):
    """(user, item, hist, labels) rows for the ranker. With implicit negatives (ratings only),
    every positive row brings `n_neg` unrated items (sampled ∝ popularity^0.75) as click = 0
    with the other tasks undefined, plus `n_hard` drawn from the user's `hard_pool` row (the
    two-tower's top items for that user: the kind of candidate the ranker sees when serving)."""
    user, item, h, lab = ds.ev_user[rows], ds.ev_item[rows], hist, ds.labels[rows]  # hist: one row per `rows`
    if not ds.implicit_negatives or n_neg + n_hard == 0:
        return user, item, h, lab
    n_hard = n_hard if hard_pool is not None else 0
    nu = np.repeat(user, n_neg)
    ni = rng.choice(ds.n_items, size=len(nu), p=neg_p)
    if n_hard:
        hu = np.repeat(user, n_hard)
        hi = hard_pool[hu, rng.integers(0, hard_pool.shape[1], len(hu))]
        # interleave per positive row so np.repeat(h, n_neg + n_hard) lines up
        nu = np.concatenate([nu.reshape(-1, n_neg), hu.reshape(-1, n_hard)], 1).ravel()
        ni = np.concatenate([ni.reshape(-1, n_neg), hi.reshape(-1, n_hard)], 1).ravel()
    n_neg = n_neg + n_hard
    rated = np.unique(ds.ev_user * ds.n_items + ds.ev_item)
    ok = ~np.isin(nu * ds.n_items + ni, rated)
    nl = np.full((len(nu), lab.shape[1]), np.nan, np.float32)
    nl[:, 0] = 0.0  # click = 0; like/dislike undefined
    return (
        np.concatenate([user, nu[ok]]),
        np.concatenate([item, ni[ok]]),
        np.concatenate([h, np.repeat(h, n_neg, axis=0)[ok]]),
        np.concatenate([lab, nl[ok]]),
    )


def catalog_negatives(table: ItemTable, user_fields: np.ndarray, user: np.ndarray, hist: np.ndarray, n_items: int, n_neg: int, n_tasks: int, rng: np.random.Generator):
    """For logged-impression datasets: `extra_rows` for `train_ranker` giving each training row
    `n_neg` items drawn uniformly from the catalog, for the same user and history, as click = 0
    with the other tasks undefined. Logged impressions alone never show the ranker most of
    the catalog, yet it scores whatever recall brings. (Not filtered against the log: a
    uniform draw hits one of the user's impressions with probability ~impressions / n_items.)"""

    def extra(idx: np.ndarray):
        src = np.repeat(idx, n_neg)
        u = user[src]
        feeds = ranker_inputs(table, u, user_fields[u], hist[src], rng.integers(0, n_items, len(src)))
        lab = np.full((len(src), n_tasks), np.nan, np.float32)
        lab[:, 0] = 0.0
        return feeds, lab

    return extra


def head_metrics(schema: Schema, labels: np.ndarray, probs: np.ndarray) -> dict:
    out = {}
    for k, t in enumerate(schema.tasks):
        m = ~np.isnan(labels[:, k])
        out[t.name] = {
            "auc": round(auc(labels[m, k], probs[m, k]), 4),
            "logloss": round(logloss(labels[m, k], probs[m, k]), 4),
            "ece": round(calibration_error(labels[m, k], probs[m, k]), 4),
            "mean_prob": round(float(probs[m, k].mean()), 4) if m.any() else None,
            "n": int(m.sum()),
            "positive_rate": round(float(np.nanmean(labels[m, k])), 4) if m.any() else None,
        }
    return out


def train_prerank_rows(teacher, ds: Dataset, table: ItemTable, train_pos: np.ndarray, feeds: dict, labels: np.ndarray,
                       users: np.ndarray, queries: np.ndarray, item_emb: np.ndarray, soft: bool, seed: int, max_rows: int,
                       pool: int, epochs: int, progress=None):
    """Stage B's training rows and training: up to `max_rows` of the ranker's own training rows
    (hard labels) plus, for `users`, the two-tower's top `pool` items after their training
    history (no labels: stage B scores recall's survivors, which impressions rarely cover).
    With `soft`, every row also carries the ranker's probabilities as soft targets."""
    from prerank.train import train_prerank
    from rank.train import INPUT_NAMES, predict

    rng = np.random.default_rng(seed + 3)
    keep = cap_rows(np.arange(len(labels)), max_rows, rng)
    all_feeds = {k: feeds[k][keep] for k in INPUT_NAMES}
    y = labels[keep]
    n_recall = 0
    if soft:  # hard labels only: the recall rows would carry nothing, so they are not drawn
        top = hard_negative_pool(queries, item_emb, pool)  # [U, pool]
        hist = last_train_history(ds, train_pos, users)
        rec = pool_inputs(table, ds, users, hist, top)
        all_feeds = {k: np.concatenate([all_feeds[k], rec[k]]) for k in INPUT_NAMES}
        n_recall = top.size
        y = np.concatenate([y, np.full((n_recall, labels.shape[1]), np.nan, np.float32)])
    teacher_p = predict(teacher, all_feeds) if soft else None
    s = ds.schema
    res = train_prerank(
        all_feeds, y, teacher_p, n_users=ds.n_users, n_items=ds.n_items, user_vocabs=[f.vocab for f in s.user_fields],
        item_vocabs=[f.vocab for f in s.item_fields], teacher=teacher, epochs=epochs, seed=seed, progress=progress,
    )
    return res, {"logged": int(len(keep)), "recall_sampled": int(n_recall)}


def pool_inputs(table: ItemTable, ds: Dataset, users: np.ndarray, hist: np.ndarray, pools: np.ndarray) -> dict[str, np.ndarray]:
    """The ranker's feed for every (user, item) of per-user pools [U, P], user-major: row u·P + j
    is users[u] with pools[u, j], given the user's history hist[u]."""
    ru = np.repeat(users, pools.shape[1])
    return ranker_inputs(table, ru, ds.user_fields[ru], np.repeat(hist, pools.shape[1], axis=0), pools.ravel())


def recall_teacher(teacher, table: ItemTable, ds: Dataset, users: np.ndarray, hist: np.ndarray, tt, pool: int,
                   rng: np.random.Generator, chunk_rows: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """(pools [U, pool], teacher click logits [U, pool]) for recall distillation: each user's
    pool is the two-tower's top half (where recall looks) and a uniform half of the catalog
    (where it does not), scored by the ranker given the user's training history."""
    from rank.train import predict
    from retrieval.twotower_train import user_embeddings

    q = user_embeddings(tt.user_tower, users, ds.user_fields[users], hist)
    half = min(pool // 2, ds.n_items)
    pools = np.concatenate([hard_negative_pool(q, tt.item_emb, half), rng.integers(0, ds.n_items, (len(users), pool - half))], axis=1)
    logits = np.empty(pools.shape, np.float32)
    step = max(1, chunk_rows // pools.shape[1])
    for s in range(0, len(users), step):  # the repeated histories of all users at once would not fit
        feeds = pool_inputs(table, ds, users[s : s + step], hist[s : s + step], pools[s : s + step])
        p = np.clip(predict(teacher, feeds)[:, 0].astype(np.float64), 1e-6, 1 - 1e-6)
        logits[s : s + step] = np.log(p / (1 - p)).reshape(-1, pools.shape[1])
    return pools, logits


def pool_agreement(tt, ds: Dataset, users: np.ndarray, hist: np.ndarray, pools: np.ndarray, teacher: np.ndarray, k: int = 20, top: int = 100) -> float:
    """Share of the teacher's top-k of each user's pool that the two-tower ranks in its top `top` of the pool."""
    from retrieval.twotower_train import user_embeddings

    q = user_embeddings(tt.user_tower, users, ds.user_fields[users], hist)
    student = np.einsum("ud,upd->up", q, tt.item_emb[pools])
    t_top = np.argsort(-teacher, axis=1)[:, :k]
    s_top = np.argsort(-student, axis=1)[:, :top]
    return round(float(np.mean([np.isin(pools[i, t_top[i]], pools[i, s_top[i]]).mean() for i in range(len(users))])), 4)


def user_queries(tower, ds: Dataset, train_pos: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Query vectors of `users` after their training history (what serving would compute)."""
    from retrieval.twotower_train import user_embeddings

    return user_embeddings(tower, users, ds.user_fields[users], last_train_history(ds, train_pos, users))


def hard_negative_pool(queries: np.ndarray, item_emb: np.ndarray, size: int = 200) -> np.ndarray:
    """Per user, the two-tower's top `size` items given the training history [U, size]."""
    import faiss

    index = faiss.IndexFlatIP(item_emb.shape[1])
    index.add(np.ascontiguousarray(item_emb))
    _, ids = index.search(np.ascontiguousarray(queries), min(size, len(item_emb)))
    return np.where(ids >= 0, ids, 0).astype(np.int64)


def build_bundle(
    ds: Dataset, source: dict, out: Path, *, epochs_tt: int = 8, epochs_rank: int = 6, n_neg: int = 2, n_hard: int = 4,
    seed: int = 0, version: str | None = None, ann_k: int = 400, itemcf: str = "swing",
    max_rank_rows: int = 3_000_000, max_eval_rows: int = 500_000, max_tt_rows: int = 5_000_000,
    max_tt_samples: int = 20_000_000, max_rank_samples: int = 9_000_000, n_catalog_neg: int = 2,
    hist_grad: bool | None = None, calibrate: bool | None = None, prerank: bool = True, prerank_hard_baseline: bool = False,
    prerank_distill: bool = True, rank_ablation: tuple[str, ...] = (), rank: bool = True,
    task_weights: dict[str, float] | None = None, task_experts: int = 0, ablation_seeds: int = 1,
    max_prerank_rows: int = 1_500_000, prerank_users: int = 1000, prerank_pool: int = 500, epochs_prerank: int = 2,
    recall_distill: bool = True, distill_users: int = 4000, distill_pool: int = 2000, epochs_distill: int = 5,
) -> dict:
    import torch

    from rank.train import export_ranker, predict, train_ranker
    from retrieval.twotower_train import export_user_tower, train_two_tower

    torch.set_num_threads(2)
    t_start = time.time()
    out = Path(out)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    s = ds.schema
    L = s.history_len
    train = ~ds.test
    train_pos = train & ds.positive
    metrics: dict = {}
    merge_calibration = None
    if calibrate is None:
        # A second build on the training split minus a validation slice: affordable up to
        # ~200k items (doubles the build time); larger catalogs merge by rank/quota.
        calibrate = ds.n_items <= 200_000
    if calibrate:
        from retrieval.calibrate import calibrate_merge, validation_split

        ds_val = validation_split(ds)
        calib_dir = out.with_name(out.name + ".calib")
        console.print("merge calibration: building on the training split minus a validation slice")
        build_bundle(
            ds_val, source, calib_dir, epochs_tt=epochs_tt, epochs_rank=epochs_rank, n_neg=n_neg, n_hard=n_hard, seed=seed,
            ann_k=ann_k, itemcf=itemcf, max_rank_rows=max_rank_rows, max_eval_rows=max_eval_rows, max_tt_rows=max_tt_rows,
            max_tt_samples=max_tt_samples, max_rank_samples=max_rank_samples, n_catalog_neg=n_catalog_neg, hist_grad=hist_grad,
            calibrate=False, prerank=False, rank=False,  # calibration reads recall only: no ranker training
        )
        merge_calibration = calibrate_merge(calib_dir, ds_val, seed=seed)
        shutil.rmtree(calib_dir, ignore_errors=True)
    if hist_grad is None:
        # History gradients help (ml-100k: pipeline recall@20 0.157 vs 0.141, click AUC 0.803 vs
        # 0.786) but touch batch × history rows of the item table per step; above 200k items
        # that dominates training time, so the history pooling is stop-gradient there.
        hist_grad = ds.n_items <= 200_000

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)
    with progress:
        # 1. rows each model trains on, and their histories (the user's positives before each row)
        step = progress.add_task("histories", total=1, note="")
        tt_rows = cap_rows(np.flatnonzero(train_pos), max_tt_rows, rng)
        rk_rows = cap_rows(np.flatnonzero(train), max_rank_rows, rng)
        ev_rows = cap_rows(np.flatnonzero(ds.test), max_eval_rows, np.random.default_rng(seed + 1))
        tt_hist = history_ids(ds, tt_rows)
        progress.update(step, advance=1, note=f"{len(tt_rows)} / {len(rk_rows)} / {len(ev_rows)} rows")
        # A sample budget per model bounds build time on large catalogs (a 1M-item world has
        # 5M two-tower rows: 8 epochs took 20 of a 46-minute build); small data keeps its epochs.
        epochs_tt = epoch_budget(epochs_tt, len(tt_rows), max_tt_samples)

        # 2. popularity / fresh (train split only)
        step = progress.add_task("popular + fresh", total=1, note="")
        pop = build_popular(ds.ev_item[train_pos], ds.ev_ts[train_pos], ds.n_items)
        item_pop = np.log1p(pop).astype(np.float32)
        popular = np.argsort(-pop, kind="stable")[: min(ds.n_items, 5000)].astype(np.int64)
        fresh = np.argsort(-ds.item_created, kind="stable")[: min(ds.n_items, 5000)].astype(np.int64)
        np.save(tmp / "popular.npy", popular)
        np.save(tmp / "fresh.npy", fresh)
        progress.update(step, advance=1)

        # 3. two-tower
        rows = tt_rows
        step = progress.add_task("two-tower", total=epochs_tt, note="")
        tt = train_two_tower(
            n_users=ds.n_users, n_items=ds.n_items,
            user_vocabs=[f.vocab for f in s.user_fields], item_vocabs=[f.vocab for f in s.item_fields],
            item_fields=ds.item_fields, row_user=ds.ev_user[rows], row_user_fields=ds.user_fields[ds.ev_user[rows]],
            row_hist=tt_hist, row_item=ds.ev_item[rows], row_ts=ds.ev_ts[rows], item_dense=ds.item_dense, dim=s.emb_dim, epochs=epochs_tt, seed=seed, hist_grad=hist_grad,
            progress=lambda e, n, loss: progress.update(step, completed=e, note=f"loss {loss:.3f}"),
        )
        metrics["two_tower"] = {"train_loss": round(tt.train_loss, 4), "epochs": epochs_tt, "rows": int(len(tt_rows))}
        # Query vectors of real users tune the index (efSearch) and give hard negatives.
        q_users = np.unique(ds.ev_user[train_pos])
        pool_users = q_users if (ds.implicit_negatives and n_hard) else rng.choice(q_users, min(len(q_users), 1000), replace=False)
        queries = user_queries(tt.user_tower, ds, train_pos, pool_users)

        # 4. item-CF (both similarities; `itemcf` picks the one served) and graph
        step = progress.add_task("item-cf", total=2, note="cosine")
        cos = build_itemcf(ds.ev_user[train_pos], ds.ev_item[train_pos], ds.n_users, ds.n_items)
        progress.update(step, advance=1, note="swing")
        sw = build_swing(ds.ev_user[train_pos], ds.ev_item[train_pos], ds.n_users, ds.n_items, seed=seed)
        served = {"swing": sw, "cosine": cos}[itemcf]
        np.savez(tmp / "itemcf.npz", **served, **{f"cosine_{k}": v for k, v in cos.items()}, **{f"swing_{k}": v for k, v in sw.items()})
        progress.update(step, advance=1, note=f"{itemcf} served; {len(sw['indices'])} swing / {len(cos['indices'])} cosine pairs")
        if ds.follow_indptr is not None and s.author_field:
            authors = s.item_authors(ds.item_fields)
            np.savez(tmp / "follow.npz", **build_follow(ds.follow_indptr, ds.follow_authors, np.maximum(authors, 0), ds.item_created, int(authors.max()) + 1))
        step = progress.add_task("graph", total=1, note="")
        g = build_graph(ds.ev_user[train_pos], ds.ev_item[train_pos], ds.n_users, ds.n_items)
        np.savez(tmp / "graph.npz", **g)
        progress.update(step, advance=1, note=f"{len(g['ui_indices'])} edges")

        # 5. ranker
        table = _table(ds, item_pop)
        neg_p = (pop + 1.0) ** 0.75
        neg_p /= neg_p.sum()
        pool = None
        if ds.implicit_negatives and n_hard:
            pool = np.zeros((ds.n_users, min(200, ds.n_items)), np.int64)
            pool[pool_users] = hard_negative_pool(queries, tt.item_emb)
        tr_u, tr_i, tr_h, tr_y = ranker_rows(ds, rk_rows, history_ids(ds, rk_rows), rng, n_neg, neg_p, pool, n_hard)
        te_u, te_i, te_h, te_y = ranker_rows(ds, ev_rows, history_ids(ds, ev_rows), np.random.default_rng(seed + 1), n_neg, neg_p)
        feeds = ranker_inputs(table, tr_u, ds.user_fields[tr_u], tr_h, tr_i)
        # Logged impressions only (synthetic world): add catalog-sampled negatives. Without them
        # the ranker never sees most of the catalog and its scores over unshown items are noise.
        # 100k world, 60 held-out users, ranker trained alone (experiment not kept): 1 epoch
        # (the ranker overfits after it; train_ranker stops early) without negatives held the
        # exhaustive top-20 at 0.70 / 0.72 in merged recall (800 / 1000), with 2 uniform
        # negatives per row 0.76 / 0.77 (5 epochs, no negatives: 0.26 / 0.28); `funnel eval`
        # on the built bundle, 200 users: 0.81 / 0.83.
        n_extra = n_catalog_neg if not ds.implicit_negatives else 0
        extra = catalog_negatives(table, ds.user_fields, tr_u, tr_h, ds.n_items, n_extra, len(s.tasks), np.random.default_rng(seed + 2)) if n_extra else None
        # rank=False (the merge-calibration build: recall only) exports the ranker untrained
        epochs_rank = epoch_budget(epochs_rank, len(tr_u) * (1 + n_extra), max_rank_samples) if rank else 0
        step = progress.add_task("ranker", total=epochs_rank, note=f"{len(tr_u)} rows")
        fit_ranker = lambda tag, seed=seed, **kw: train_ranker(  # noqa: E731
            feeds, tr_y, n_users=ds.n_users, n_items=ds.n_items,
            user_vocabs=[f.vocab for f in s.user_fields], item_vocabs=[f.vocab for f in s.item_fields],
            item_fields=ds.item_fields, item_dense=ds.item_dense, epochs=epochs_rank, seed=seed, hist_grad=hist_grad, extra_rows=extra,
            extra_per_row=n_extra, task_experts=task_experts,
            progress=lambda e, n, loss: progress.update(step, completed=e, note=f"{tag} loss {loss:.3f}"), **kw,
        )
        weights = {**RANK_TASK_WEIGHTS, **(task_weights or {})}
        w = np.array([float(weights.get(t, 1.0)) for t in s.task_names], np.float32)
        rk = fit_ranker("ranker", task_weights=w)
        rk_sig = export_ranker(rk.model, len(s.user_fields), len(s.item_fields), L, tmp / "ranker.onnx")
        te_feeds = ranker_inputs(table, te_u, ds.user_fields[te_u], te_h, te_i)
        probs = predict(rk.model, te_feeds)
        metrics["ranker_heldout"] = head_metrics(s, te_y, probs)
        metrics["ranker_train_loss"] = round(rk.train_loss, 4)
        metrics["ranker_training"] = {"task_weights": dict(zip(s.task_names, w.tolist())), "max_epochs": epochs_rank, "best_epoch": rk.best_epoch, "val_click_auc": rk.val_auc,
                                      "rows": int(len(tr_u)), "catalog_negatives_per_row": n_extra,
                                      "calibration": {s.task_names[k]: v for k, v in (rk.calibration or {}).items()}}
        models = {"ranker": rk_sig}
        if rank_ablation:
            # Same rows, epochs and seed: the network without target attention (mean-pooled
            # history), and per named task the same network trained on that task alone (one-hot
            # loss weight, epoch picked by that task's validation AUC). Metrics only, not served.
            # With ablation_seeds > 1 the three are trained again on the same rows under more
            # seeds (the ranker too, the served one being the first seed) and the report adds
            # per-seed AUCs and their mean: on the 100k world two runs whose validation click AUC
            # agreed to 1e-4 differed by 0.005 in held-out click AUC, more than the gaps compared.
            def ablation(seed_k: int, ranker_probs: np.ndarray) -> dict:
                no_att = fit_ranker("no attention", attention=False, task_weights=w, seed=seed_k)
                out = {"ranker": head_metrics(s, te_y, ranker_probs), "no_attention": head_metrics(s, te_y, predict(no_att.model, te_feeds)),
                       "single_task": {}}
                for name in rank_ablation:
                    k = s.task_names.index(name)
                    one = fit_ranker(f"only {name}", task_weights=np.eye(len(s.tasks), dtype=np.float32)[k], select_task=k, seed=seed_k)
                    out["single_task"][name] = head_metrics(s, te_y, predict(one.model, te_feeds))[name]
                return out

            runs = [ablation(seed, probs)]
            for r in range(1, max(1, ablation_seeds)):
                again = fit_ranker(f"ranker seed {seed + r}", task_weights=w, seed=seed + r)
                runs.append(ablation(seed + r, predict(again.model, te_feeds)))
            ab = {k: runs[0][k] for k in ("no_attention", "single_task")}
            if len(runs) > 1:
                auc_of = lambda run: {  # noqa: E731
                    "ranker": {t: run["ranker"][t]["auc"] for t in s.task_names},
                    "no_attention": {t: run["no_attention"][t]["auc"] for t in s.task_names},
                    "single_task": {t: m["auc"] for t, m in run["single_task"].items()},
                }
                per = [auc_of(r) for r in runs]
                ab["seeds"] = {"seeds": [seed + r for r in range(len(runs))], "auc": per, "mean_auc": {
                    v: {t: round(float(np.mean([p[v][t] for p in per])), 4) for t in per[0][v]} for v in per[0]}}
            metrics["ranker_ablation"] = ab

        # 5a. the two-tower distilled from the ranker (recall that finds what the ranker ranks on top)
        if recall_distill and rank:
            from retrieval.twotower_train import distill_two_tower

            step = progress.add_task("recall distill", total=epochs_distill, note="")
            d_users = rng.choice(q_users, min(len(q_users), distill_users), replace=False)
            d_hist = last_train_history(ds, train_pos, d_users)
            d_pools, d_teacher = recall_teacher(rk.model, table, ds, d_users, d_hist, tt, distill_pool, rng)
            n_fit = len(d_users) - min(len(d_users) // 10, 200)  # the last users are held out: the report's before / after
            before = pool_agreement(tt, ds, d_users[n_fit:], d_hist[n_fit:], d_pools[n_fit:], d_teacher[n_fit:])
            tt = distill_two_tower(
                tt, user_idx=d_users[:n_fit], user_fields=ds.user_fields[d_users[:n_fit]], hist=d_hist[:n_fit], pools=d_pools[:n_fit],
                teacher=d_teacher[:n_fit], epochs=epochs_distill, seed=seed,
                progress=lambda e, n, loss: progress.update(step, completed=e, note=f"loss {loss:.3f}"),
            )
            after = pool_agreement(tt, ds, d_users[n_fit:], d_hist[n_fit:], d_pools[n_fit:], d_teacher[n_fit:])
            metrics["recall_distill"] = {"users": int(n_fit), "heldout_users": int(len(d_users) - n_fit), "pool": int(d_pools.shape[1]),
                                         "epochs": epochs_distill, "train_loss": round(tt.train_loss, 4),
                                         "heldout_teacher_top20_in_student_top100": {"before": before, "after": after}}
            queries = user_queries(tt.user_tower, ds, train_pos, pool_users)

        # 5b. the two-tower's artefacts: user tower, item table, ANN index
        ut_sig = export_user_tower(tt.user_tower, len(s.user_fields), L, tmp / "user_tower.onnx")
        models["user_tower"] = ut_sig
        np.save(tmp / "item_emb.npy", tt.item_emb)
        step = progress.add_task("ann index", total=1, note="")
        import faiss

        index, ann_params = build_index(tt.item_emb, queries[:1000], k=ann_k)
        faiss.write_index(index, str(tmp / "ann.faiss"))
        progress.update(step, advance=1, note=f"{ann_params['type']} recall@{ann_params['k']} {ann_params['recall_at_k']}")
        metrics["ann_index"] = {k: v for k, v in ann_params.items() if k != "tried"}

        # 5c. pre-rank stage B, distilled from the ranker
        if prerank:
            from prerank.train import export_prerank

            step = progress.add_task("prerank B", total=epochs_prerank, note="")
            pick = np.sort(rng.choice(len(pool_users), min(len(pool_users), prerank_users), replace=False))
            pr_users, pr_q = pool_users[pick], queries[pick]
            pr_fit = lambda soft, tag: train_prerank_rows(  # noqa: E731
                rk.model, ds, table, train_pos, feeds, tr_y, pr_users, pr_q, tt.item_emb, soft, seed, max_prerank_rows,
                prerank_pool, epochs_prerank, lambda e, n, loss: progress.update(step, completed=e, note=f"{tag} loss {loss:.3f}"),
            )
            # prerank_distill=False ships the hard-label-only network instead (ablation bundles)
            pr, pr_rows = pr_fit(prerank_distill, "distilled" if prerank_distill else "hard-only")
            models["prerank"] = export_prerank(pr.model, len(s.user_fields), len(s.item_fields), L, tmp / "prerank.onnx")
            metrics["prerank_heldout"] = head_metrics(s, te_y, predict(pr.model, te_feeds))
            metrics["prerank_training"] = {"rows": pr_rows, "epochs": epochs_prerank, "train_loss": round(pr.train_loss, 4),
                                           "distilled": prerank_distill}
            if prerank_hard_baseline:  # the same network on hard labels only (ablation, not served)
                progress.update(step, completed=0)
                hb, _ = pr_fit(False, "hard-only")
                metrics["prerank_hard_only_heldout"] = head_metrics(s, te_y, predict(hb.model, te_feeds))

        # 6. catalog and users
        step = progress.add_task("items + users", total=1, note="")
        np.savez(
            tmp / "items.npz",
            item_ids=ds.item_ids.astype(str), item_fields=ds.item_fields.astype(np.int64),
            item_created=ds.item_created.astype(np.float64), item_pop=item_pop,
        )
        # Build-time history: the training split's positives per user, chronological (CSR).
        hu, hi, hts = ds.ev_user[train_pos], ds.ev_item[train_pos], ds.ev_ts[train_pos]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(hu, minlength=ds.n_users))]).astype(np.int64)
        np.savez(
            tmp / "users.npz",
            user_ids=ds.user_ids.astype(str), user_fields=ds.user_fields.astype(np.int64),
            hist_indptr=indptr, hist_items=hi.astype(np.int64), hist_ts=hts.astype(np.float64),
        )
        progress.update(step, advance=1)

    version = version or out.name
    metrics["build_seconds"] = round(time.time() - t_start, 1)
    manifest = write_manifest(
        tmp, version=version, schema=s, models=models, ann=ann_params,
        metrics=metrics, extra={"merge_calibration": merge_calibration, "source": source, "counts": {"users": ds.n_users, "items": ds.n_items, "events": int(len(ds.ev_user)), "train_events": int(train.sum()), "test_events": int(ds.test.sum())}},
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest
