"""Item-CF recall: a precomputed top-K neighbour table, summed over the user's recent items.

Two similarity builders (ALGORITHM-NOTES):
- cosine with inverse user frequency, w_ij = Σ_{u ∈ N(i)∩N(j)} 1/log(1+|N(u)|) / √(|N(i)||N(j)|);
- Swing (Alibaba, arXiv 2010.05525), sim(i,j) = Σ_{u<v ∈ U_i∩U_j} w_u w_v / (α₂ + |I_u ∩ I_v|),
  w_u = (α₁ + |I_u|)^−β, with at most `max_users_per_item` sampled users per item.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from core.candidates import Candidates
from core.context import RequestContext
from retrieval.sparse_util import gather_rows, topk_per_row


def build_itemcf(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int, topk: int = 100, block: int = 4096) -> dict[str, np.ndarray]:
    """Top-K neighbour table (CSR: indptr, indices, data) from positive (user, item) pairs."""
    x = _binary_csr(user, item, n_users, n_items)
    n_u = np.asarray(x.sum(axis=1)).ravel()
    n_i = np.asarray(x.sum(axis=0)).ravel()
    w = sp.diags((1.0 / np.log1p(np.maximum(n_u, 1))).astype(np.float32))
    wx = (w @ x).tocsc()
    xt = x.T.tocsr()
    inv_sqrt = (1.0 / np.sqrt(np.maximum(n_i, 1))).astype(np.float32)
    parts = []
    # Row blocks of the item×item product bound the memory of the intermediate.
    for s in range(0, n_items, block):
        e = min(s + block, n_items)
        c = (xt[s:e] @ wx).tocsr().astype(np.float32)
        c = sp.diags(inv_sqrt[s:e]) @ c @ sp.diags(inv_sqrt)
        c = c.tocsr()
        c.setdiag(0.0)  # an item is not its own neighbour
        parts.append(topk_per_row(c, topk))
    m = sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, n_items))
    return {"indptr": m.indptr.astype(np.int64), "indices": m.indices.astype(np.int64), "data": m.data.astype(np.float32)}


def _binary_csr(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    x = sp.csr_matrix((np.ones(len(user), np.float32), (user, item)), shape=(n_users, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def sample_users_per_item(user: np.ndarray, item: np.ndarray, cap: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most `cap` random users per item (deduplicated pairs)."""
    pairs = np.unique(np.stack([item, user], 1), axis=0)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(pairs)), pairs[:, 0]))
    pairs = pairs[order]
    _, start, counts = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    rank = np.arange(len(pairs)) - np.repeat(start, counts)
    keep = pairs[rank < cap]
    return keep[:, 1], keep[:, 0]


def build_swing(
    user: np.ndarray, item: np.ndarray, n_users: int, n_items: int, topk: int = 100,
    alpha1: float = 15.0, alpha2: float = 0.0, beta: float = 0.3, max_users_per_item: int = 1000,
    user_block: int = 2048, pair_chunk: int = 2_000_000, seed: int = 0,
) -> dict[str, np.ndarray]:
    """Swing neighbour table (CSR). Every user pair (u, v) sharing ≥ 2 items adds
    w_u w_v / (α₂ + |I_u ∩ I_v|) to every item pair inside I_u ∩ I_v, i.e.
    S = Zᵀ diag(w) Z with Z the (user pair × item) intersection matrix; built in blocks of
    users and chunks of pairs so memory stays bounded."""
    user, item = sample_users_per_item(user, item, max_users_per_item, seed)
    x = _binary_csr(user, item, n_users, n_items)
    n_u = np.asarray(x.sum(axis=1)).ravel()
    w_u = (alpha1 + n_u) ** (-beta)
    xt = x.T.tocsr()
    keys = np.sort(x.nonzero()[0].astype(np.int64) * n_items + x.nonzero()[1])  # (user, item) membership
    s_total = sp.csr_matrix((n_items, n_items), dtype=np.float64)
    for s in range(0, n_users, user_block):
        e = min(s + user_block, n_users)
        c = (x[s:e] @ xt).tocoo()  # user-block × users: |I_u ∩ I_v|
        u = c.row.astype(np.int64) + s
        v = c.col.astype(np.int64)
        ok = (u < v) & (c.data >= 2)  # each unordered pair once; one shared item makes no item pair
        u, v, inter = u[ok], v[ok], c.data[ok]
        if len(u) == 0:
            continue
        wp = w_u[u] * w_u[v] / (alpha2 + inter)
        # expand each pair over u's items, keep those v also has: Z's nonzeros
        step = max(1, pair_chunk // max(int(n_u[u].mean()), 1))
        for a in range(0, len(u), step):
            b = min(a + step, len(u))
            pos, owner = gather_rows(x.indptr, x.indices, u[a:b])
            its = x.indices[pos].astype(np.int64)
            vv = v[a:b][owner]
            key = vv * n_items + its
            idx = np.searchsorted(keys, key)
            hit = (idx < len(keys)) & (keys[np.minimum(idx, len(keys) - 1)] == key)
            z = sp.csr_matrix((np.ones(int(hit.sum()), np.float32), (owner[hit], its[hit])), shape=(b - a, n_items))
            s_total = s_total + (z.T @ sp.diags(wp[a:b]) @ z).tocsr()
    s_total = s_total.tocsr()
    s_total.setdiag(0.0)
    m = topk_per_row(s_total.astype(np.float32), topk)
    return {"indptr": m.indptr.astype(np.int64), "indices": m.indices.astype(np.int64), "data": m.data.astype(np.float32)}


class ItemCFRecall:
    name = "itemcf"

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, seeds: int = 30, decay: float = 0.9, k: int = 300):
        self.indptr, self.indices, self.data = indptr, indices, data
        self.seeds, self.decay, self.k = seeds, decay, k

    def __call__(self, ctx: RequestContext) -> Candidates:
        seeds = ctx.history[: self.seeds]
        if len(seeds) == 0:
            return Candidates.empty()
        pos, owner = gather_rows(self.indptr, self.indices, seeds)
        if len(pos) == 0:
            return Candidates.empty()
        # Recency decay: the s-th most recent seed weighs decay**s.
        w = self.data[pos] * (self.decay ** owner.astype(np.float32))
        uniq, inv = np.unique(self.indices[pos], return_inverse=True)
        score = np.bincount(inv, weights=w, minlength=len(uniq)).astype(np.float32)
        return Candidates.from_source(uniq, score, self.name).top(self.k)
