"""Merge calibration: how likely each recall path's r-th candidate is to be an item the user
goes on to interact with, measured on a validation slice of the training data.

Why: the merge must decide, for every slot of the merged list, which path's next candidate
deserves it. Ranks are not comparable across paths (ann's 50th candidate can be worth more
than graph's 5th), so a rank/quota rule lets a weak path crowd out a strong one at small K.
With each path's hit rate per rank, and a logistic regression that adds up the evidence of
every path that found a candidate, the merge orders all candidates by their chance of being
a hit, and the top K of the merged list takes what the data supports from every path.

How (no test data involved): the training split is split again per user in time, the last
`frac` of each user's training events held out (`validation_split`); a bundle is built on
the rest; each path returns its ranked list for the validation users (already-seen items
removed, as served); hits are counted per rank bin (log-spaced) and turned into a rate per
user per rank slot, smoothed towards a small prior and forced non-increasing in rank
(isotonic regression), since a path's later candidates are never better on average. The
merge model (retrieval/merge.py `MergeModel`) is then fitted on the same validation users'
merged candidates: hit or not, from each path's (found, logit rate at its rank, log rank)
and the number of paths that found it.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.optimize import isotonic_regression

from sim.dataset import Dataset, temporal_split

# Rank bin edges: exact for the first ranks, then log-spaced (a bin holds ranks [e_i, e_i+1)).
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


def merge_model(calibration: dict, depth: int):
    """The serving `MergeModel` of a manifest's `merge_calibration` (rates expanded to `depth`)."""
    from retrieval.merge import MergeModel

    paths = tuple(dict.fromkeys(f.split(".")[0] for f in calibration["features"] if "." in f))
    weights = np.asarray(calibration["weights"], np.float32) if calibration.get("weights") else None
    return MergeModel(paths, tuple(curve_rates(calibration["paths"][p], depth) for p in paths), weights)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-6) -> np.ndarray:
    """Weights of a logistic regression (mean log-loss + l2·|w|², L-BFGS). Hits are rare
    (~1% of candidates), so the penalty stays tiny next to the loss."""
    from scipy.optimize import minimize
    from scipy.special import expit

    x = x.astype(np.float64)

    def loss(w):
        z = x @ w
        g = x.T @ (expit(z) - y) / len(y) + 2 * l2 * w
        return float((np.logaddexp(0.0, z) - y * z).mean() + l2 * w @ w), g

    return minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": 500}).x


def calibrate_merge(bundle_path, ds_val: Dataset, depth: int = 1000, max_users: int = 2000, seed: int = 0) -> dict:
    """Fit the learned merge on `ds_val`'s held-out split, for the bundle built on its
    training part: each path's rank → hit-rate curve, then the logistic regression over
    where the paths ranked each merged candidate (retrieval/merge.py `MergeModel`).

    The paths run as the merged recall configures them (the serving quotas scaled to
    `depth`, as `funnel eval` measures the merge), so the model sees the ranks it will see.
    Returns {"paths": {name: curve}, "features", "weights", "users", "depth", "validation"}."""
    from app.evaluate import _eval_settings
    from app.pipeline import Pipeline
    from core.bundle import Bundle
    from core.candidates import Candidates
    from core.settings import Settings
    from retrieval.merge import MergeModel, merge_candidates, union_of

    settings = Settings()
    bundle = Bundle.load(bundle_path, threads=settings.compute_threads)
    pipe = Pipeline(bundle, _eval_settings(settings, depth)[1])
    merge_stage = pipe.stages[1]
    val_pos = ds_val.test & ds_val.positive
    users = np.unique(ds_val.ev_user[val_pos])
    rng = np.random.default_rng(seed)
    if len(users) > max_users:
        users = np.sort(rng.choice(users, max_users, replace=False))
    vu, vi = ds_val.ev_user[val_pos], ds_val.ev_item[val_pos]
    order = np.argsort(vu, kind="stable")
    vu, vi = vu[order], vi[order]
    names = [s.name for s in merge_stage.sources]
    hits = {n: np.zeros(depth, np.int64) for n in names}
    lists = []  # per user: (relevant, unblocked parts in score order)
    for u in users:
        relevant = np.unique(vi[np.searchsorted(vu, u) : np.searchsorted(vu, u, side="right")])
        ctx = pipe.context(request_id=f"calib-{u}", user_id=str(bundle.user_ids[u]), count=20, scene="calibrate", exclude_item_ids=[], events=[], seed=int(u))
        pipe.stages[0](ctx, Candidates.empty())
        blocked = ctx.blocked()
        parts = []
        for src in merge_stage.sources:
            c = src(ctx)
            c = c.take(np.flatnonzero(~np.isin(c.item, blocked))).top(depth)
            hits[src.name][np.flatnonzero(np.isin(c.item, relevant))] += 1
            parts.append((c, merge_stage.quotas.get(src.name, 0)))
        lists.append((relevant, parts))
    curves = {n: rate_curve(h, len(users), depth) for n, h in hits.items()}
    model = MergeModel(tuple(names), tuple(curve_rates(curves[n], depth) for n in names))
    xs, ys = [], []
    for relevant, parts in lists:
        un = union_of(parts, np.zeros(0, np.int64))
        if un is not None:
            xs.append(model.features(len(un.item), un.inv, un.rank, un.part, names))
            ys.append(np.isin(un.item, relevant))
    model = MergeModel(model.paths, model.rates, fit_logistic(np.concatenate(xs), np.concatenate(ys).astype(np.float64)).astype(np.float32))
    # For the record: the merged lists' validation recall, learned vs rank/quota.
    got = {"learned": np.zeros(2), "rank": np.zeros(2)}
    for relevant, parts in lists:
        for mode, m in (("learned", model), ("rank", None)):
            items = merge_candidates(parts, np.zeros(0, np.int64), merge_stage.total, settings.merge_multi_hit, m, names).item
            got[mode] += [np.isin(relevant, items[:50]).mean(), np.isin(relevant, items[:200]).mean()]
    n = max(len(lists), 1)
    return {
        "paths": curves,
        **model.to_json(),
        "users": int(len(users)),
        "depth": depth,
        "validation": {mode: {"recall@50": round(v[0] / n, 4), "recall@200": round(v[1] / n, 4)} for mode, v in got.items()},
    }
