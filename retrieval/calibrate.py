"""Merge calibration: how likely each recall path's r-th candidate is to be an item the user
goes on to interact with, measured on a validation slice of the training data.

Why: the merge must decide, for every slot of the merged list, which path's next candidate
deserves it. Ranks are not comparable across paths (ann's 50th candidate can be worth more
than graph's 5th), so a rank/quota rule lets a weak path crowd out a strong one at small K.
With each path's hit rate per rank, the merge orders all candidates by it, and the top K of
the merged list takes the best ranks of every path in the proportions the data supports.

How (no test data involved): the training split is split again per user in time, the last
`frac` of each user's training events held out (`validation_split`); a bundle is built on
the rest; each path returns its ranked list for the validation users (already-seen items
removed, as served); hits are counted per rank bin (log-spaced) and turned into a rate per
user per rank slot, smoothed towards a small prior and forced non-increasing in rank
(isotonic regression), since a path's later candidates are never better on average. The
multi-path bonus of the calibrated merge (retrieval/merge.py) is then chosen on the same
validation users: the one whose merged list holds the most validation items at K = 50 and 200.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.optimize import isotonic_regression

from sim.dataset import Dataset, temporal_split

# Rank bin edges: exact for the first ranks, then log-spaced (a bin holds ranks [e_i, e_i+1)).
MULTI_HIT_GRID = (0.0, 0.25, 0.5, 1.0)
BIN_EDGES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


def validation_split(ds: Dataset, frac: float = 0.125) -> Dataset:
    """The training events only, with each user's last `frac` of them (by time) marked as the
    held-out split. The real test split is dropped entirely."""
    keep = np.flatnonzero(~ds.test)
    u, ts = ds.ev_user[keep], ds.ev_ts[keep]
    return replace(
        ds,
        ev_user=u, ev_item=ds.ev_item[keep], ev_ts=ts, labels=ds.labels[keep], positive=ds.positive[keep],
        test=temporal_split(u, ts, frac),
    )


def rate_curve(hits: np.ndarray, users: int, depth: int, prior_hits: float = 0.5) -> dict:
    """hits[r]: hits at rank r (0-based) summed over `users` users. Returns the bin edges and a
    non-increasing rate per bin: (hits in bin + prior share) / (users × bin width)."""
    edges = np.array([e for e in BIN_EDGES if e < depth] + [depth], np.int64)
    width = np.diff(edges).astype(np.float64)
    binned = np.add.reduceat(hits[:depth].astype(np.float64), edges[:-1])
    overall = binned.sum() / max(users * depth, 1)  # the path's mean rate shrinks sparse bins towards it
    rate = (binned + prior_hits * overall * depth / len(width)) / (users * width + prior_hits * depth / len(width))
    rate = isotonic_regression(rate, weights=width * max(users, 1), increasing=False).x
    return {"edges": edges.tolist(), "rate": [float(x) for x in rate]}


def curve_rates(curve: dict, n: int) -> np.ndarray:
    """The calibrated rate of ranks 0..n-1 (ranks past the curve get its last rate)."""
    edges = np.asarray(curve["edges"], np.int64)
    rate = np.asarray(curve["rate"], np.float32)
    b = np.searchsorted(edges, np.arange(n), side="right") - 1
    return rate[np.minimum(b, len(rate) - 1)]


def calibrate_merge(bundle_path, ds_val: Dataset, depth: int = 1024, max_users: int = 2000, seed: int = 0) -> dict:
    """Per-path rank → hit-rate curves on `ds_val`'s held-out split, for the bundle built on
    its training part. Returns {"paths": {name: curve}, "users": n, "depth": depth}."""
    from app.evaluate import _eval_settings
    from app.pipeline import Pipeline
    from core.bundle import Bundle
    from core.candidates import Candidates
    from core.settings import Settings
    from retrieval.merge import merge_candidates

    settings = Settings()
    bundle = Bundle.load(bundle_path, threads=settings.compute_threads)
    path_settings, _ = _eval_settings(settings, depth)
    pipe = Pipeline(bundle, path_settings)
    val_pos = ds_val.test & ds_val.positive
    users = np.unique(ds_val.ev_user[val_pos])
    rng = np.random.default_rng(seed)
    if len(users) > max_users:
        users = np.sort(rng.choice(users, max_users, replace=False))
    vu, vi = ds_val.ev_user[val_pos], ds_val.ev_item[val_pos]
    order = np.argsort(vu, kind="stable")
    vu, vi = vu[order], vi[order]
    names = [s.name for s in pipe.stages[1].sources]
    hits = {n: np.zeros(depth, np.int64) for n in names}
    lists = []  # per user: (relevant, blocked, [(path candidates, quota)])
    merge_stage = Pipeline(bundle, _eval_settings(settings, depth)[1]).stages[1]
    for u in users:
        relevant = np.unique(vi[np.searchsorted(vu, u) : np.searchsorted(vu, u, side="right")])
        ctx = pipe.context(request_id=f"calib-{u}", user_id=str(bundle.user_ids[u]), count=20, scene="calibrate", exclude_item_ids=[], events=[], seed=int(u))
        pipe.stages[0](ctx, Candidates.empty())
        blocked = ctx.blocked()
        parts = []
        for src in pipe.stages[1].sources:
            c = src(ctx)
            c = c.take(np.flatnonzero(~np.isin(c.item, blocked))).top(depth)
            hits[src.name][np.flatnonzero(np.isin(c.item, relevant))] += 1
            parts.append((c, merge_stage.quotas.get(src.name, 0)))
        lists.append((relevant, parts))
    curves = {n: rate_curve(h, len(users), depth) for n, h in hits.items()}
    rates = [curve_rates(curves[n], depth) for n in names]
    scores = {}
    for gamma in MULTI_HIT_GRID:
        got = np.zeros(2)
        for relevant, parts in lists:
            m = merge_candidates(parts, np.zeros(0, np.int64), merge_stage.total, gamma, rates).item
            got += [np.isin(relevant, m[:50]).mean(), np.isin(relevant, m[:200]).mean()]
        scores[gamma] = float(got.mean() / max(len(lists), 1))
    best = max(scores, key=scores.get)
    return {
        "paths": curves,
        "multi_hit": best,
        "multi_hit_scores": {str(g): round(v, 4) for g, v in scores.items()},
        "users": int(len(users)),
        "depth": depth,
    }
