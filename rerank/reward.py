"""The list-wise reward the reranker maximises, and the per-item inputs it is built from.

For a list L of T items drawn from a pool of M candidates:

    R(L) = Σ_t reach(t) · (v(L_t) − pen(t))  +  reach(T+1) · V_next(L)

- v (value): the fused score made linear again. Fusion works in log space
  (f = Σ_k β_k log(p_k + α_k), fusion/formula.py); the reranker uses
  v = exp(f − max f over the pool), i.e. the multiplicative fused score Π (p_k + α_k)^β_k
  divided by the pool's best. Exponentiating is what makes reach · v meaningful: reach is
  a probability of viewing the slot, so v must be a value per view (a positive, additive
  quantity), not a log-score that can be negative. Dividing by the pool's maximum changes
  nothing about which list wins (R is linear in v when the penalties are proportional,
  see below) but keeps v in (0, 1] (no overflow, readable traces: the best candidate is
  worth 1).
- reach(1) = 1, reach(t+1) = reach(t) · p_continue(L_t) (Kuaishou on-device rerank,
  CIKM 2022: s_1 = 1, s_{i+1} = s_i · p_next(i)). p_continue comes from the ranker's
  `continue` head where the schema has one; otherwise it is a proxy from the negative
  heads, see `continue_prob`.
- pen(t) (monotony): v(L_t) · min(1, λ_a · n_a(t) + λ_c · max(0, n_c(t) − free_c)), with
  n_a(t) / n_c(t) the number of the previous W_a / W_c items sharing L_t's author /
  category. The penalty is proportional to the item's value — a repeat discounts what the
  item would have been worth, like fatigue discounts engagement — and never exceeds it.
  Author/category codes are ints per pool item, < 0 = unknown (never matches anything);
  the stage passes the bundle's item_fields codes minus one (0 = unknown there).
- V_next (the next page): w_next · Σ_{k<K} p̄^k · v_(k) over the K most valuable pool
  items not in L (v_(0) ≥ v_(1) ≥ ...), p̄ the mean p_continue over the pool. A user who
  scrolls past the last slot gets the next page; its value is what is left.

Everything here is vectorised over lists (`list_reward` takes [K, T]); the beam search
(rerank/beam.py) computes the same quantities incrementally and returns lists whose
reward is recomputed here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.schema import Schema


@dataclass(frozen=True)
class RewardParams:
    author_window: int = 5  # W_a: previous slots checked for the same author
    author_penalty: float = 0.05  # λ_a per same-author item in the window (share of the item's value)
    category_window: int = 5  # W_c: previous slots checked for the same category
    category_free: int = 1  # same-category items in the window that cost nothing
    category_penalty: float = 0.03  # λ_c per same-category item beyond `category_free`
    next_items: int = 5  # K: best unused items standing in for the next page (0: no V_next)
    next_weight: float = 1.0  # w_next


def item_values(fused: np.ndarray) -> np.ndarray:
    """v = exp(f − max f): log-space fused scores back to (0, 1] values, float64."""
    f = np.asarray(fused, np.float64)
    if f.size == 0:
        return f
    return np.exp(f - f.max())


def continue_prob(heads: np.ndarray, schema: Schema, continue_task: str = "continue", base: float = 0.9) -> tuple[np.ndarray, str]:
    """P(the user scrolls past this item | viewed it), float64 [n], and where it came from.

    'head': the ranker's `continue_task` head, clipped to [0, 1].
    'proxy' (schemas without such a head, e.g. ml-100k: click/like/dislike): a user who
    leaves negative feedback is taken to leave the feed, everyone else continues with the
    base rate: p = base · Π_neg (1 − P(neg)), where P(neg) is the marginal probability of
    the negative task — heads of tasks given another task (ml-100k's dislike is given
    click) are multiplied by that task's head. base 0.9 means ~10 items per session when
    nothing is disliked. Without negative heads the proxy is the constant `base`.
    """
    heads = np.asarray(heads, np.float64)
    names = schema.task_names
    if continue_task in names:
        return np.clip(heads[:, names.index(continue_task)], 0.0, 1.0), "head"
    p = np.full(len(heads), float(base))
    for k, t in enumerate(schema.tasks):
        if not t.negative:
            continue
        neg = heads[:, k]
        if t.given and t.given in names:
            neg = neg * heads[:, names.index(t.given)]
        p *= 1.0 - np.clip(neg, 0.0, 1.0)
    return np.clip(p, 0.0, 1.0), "proxy"


def window_counts(ids: np.ndarray, window: int) -> np.ndarray:
    """For lists of codes [K, T]: how many of the previous `window` slots share each slot's
    code (codes < 0 are unknown and never match)."""
    K, T = ids.shape
    if window <= 0 or T < 2:
        return np.zeros((K, T), np.int64)
    # unknown codes get codes of their own, so one [K, T, T] comparison inside the band
    # 1 <= t − s <= window counts the matches (one pass instead of one per lag)
    ids = np.where(ids >= 0, ids, -1 - np.arange(K * T).reshape(K, T))
    lag = np.subtract.outer(np.arange(T), np.arange(T))
    band = (lag >= 1) & (lag <= window)
    return np.count_nonzero((ids[:, :, None] == ids[:, None, :]) & band, axis=2).astype(np.int64)


def penalty_factor(n_a: np.ndarray | int, n_c: np.ndarray | int, params: RewardParams) -> np.ndarray:
    """min(1, λ_a · n_a + λ_c · max(0, n_c − free_c)): the share of an item's value lost."""
    f = params.author_penalty * np.asarray(n_a, np.float64) + params.category_penalty * np.maximum(
        np.asarray(n_c, np.float64) - params.category_free, 0.0
    )
    return np.minimum(f, 1.0)


def next_page_value(used: np.ndarray, v: np.ndarray, p_bar: float, params: RewardParams) -> np.ndarray:
    """V_next per list: used bool [K, M] → float64 [K]."""
    K = int(params.next_items)
    if K <= 0 or params.next_weight == 0.0:
        return np.zeros(len(used))
    # the K best unused items of a list are among its (items used + K) most valuable
    n = int(used.sum(axis=1).max()) + K if used.size else K
    order = np.argsort(-v, kind="stable")[:n]
    free = ~used[:, order]  # [K, n] in descending value order
    rank = np.cumsum(free, axis=1) - 1  # rank among the unused items
    take = free & (rank < K)
    disc = np.where(take, p_bar ** np.clip(rank, 0, None), 0.0)
    return params.next_weight * (disc * v[order][None, :]).sum(axis=1)


def list_reward(
    lists: np.ndarray,
    v: np.ndarray,
    p: np.ndarray,
    author: np.ndarray | None,
    category: np.ndarray | None,
    params: RewardParams,
) -> dict[str, np.ndarray]:
    """R(L) for K lists at once.

    lists: int [K, T] (or [T]) positions into the pool; v, p: float [M] values and continue
    probabilities of the pool; author / category: int codes [M] (< 0 unknown) or None (that
    penalty off). Returns float64 arrays: 'reward' [K] (= value − penalty +
    next), 'value', 'penalty', 'next' [K], 'reach' [K, T + 1].
    """
    lists = np.atleast_2d(np.asarray(lists, np.int64))
    v = np.asarray(v, np.float64)
    p = np.asarray(p, np.float64)
    K, T = lists.shape
    reach = np.ones((K, T + 1))
    if T:
        np.cumprod(p[lists], axis=1, out=reach[:, 1:])
    n_a = window_counts(author[lists], params.author_window) if author is not None else 0
    n_c = window_counts(category[lists], params.category_window) if category is not None else 0
    vl = v[lists]
    pen = vl * penalty_factor(n_a, n_c, params)
    value = (reach[:, :T] * vl).sum(axis=1)
    penalty = (reach[:, :T] * pen).sum(axis=1)
    used = np.zeros((K, len(v)), bool)
    used[np.arange(K)[:, None], lists] = True
    nxt = reach[:, T] * next_page_value(used, v, float(p.mean()) if len(p) else 0.0, params)
    return {"reward": value - penalty + nxt, "value": value, "penalty": penalty, "next": nxt, "reach": reach}
