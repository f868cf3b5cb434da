"""Offline metrics: AUC, log-loss, calibration error, recall@K, NDCG@K (numpy only)."""
from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the rank-sum formula with tie-averaged ranks; NaN if one class is absent."""
    y = np.asarray(labels) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    s = np.asarray(scores, np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over `bins` equal-mass bins of the predictions: the
    row-weighted mean of |mean predicted probability - observed positive rate| per bin.
    Equal-mass bins, because a head's predictions crowd near its base rate (fixed-width bins
    would leave most of them empty). NaN on no rows."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.float64)
    n = len(p)
    if n == 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    b = np.arange(n) * min(bins, n) // n  # bin of each row in sorted order
    rows = np.bincount(b)
    gap = np.abs(np.bincount(b, p[order]) - np.bincount(b, y[order])) / rows
    return float((gap * rows).sum() / n)


def recall_ndcg_at_k(recommended: np.ndarray, relevant: np.ndarray, k: int) -> tuple[float, float]:
    """For one user: recall@k = |top-k ∩ relevant| / |relevant|; NDCG@k with binary gains."""
    rel = np.asarray(relevant)
    if len(rel) == 0:
        return float("nan"), float("nan")
    top = np.asarray(recommended)[:k]
    hit = np.isin(top, rel)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((hit * discounts[: len(top)]).sum())
    idcg = float(discounts[: min(len(rel), k)].sum())
    return float(hit.sum() / len(rel)), dcg / idcg
