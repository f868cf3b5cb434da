"""Item-CF recall: a precomputed top-K neighbour table, summed over the user's recent items.

Similarity: cosine with inverse user frequency,
w_ij = Σ_{u ∈ N(i)∩N(j)} 1/log(1+|N(u)|) / √(|N(i)||N(j)|)   (ALGORITHM-NOTES, "Item-CF").
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from core.candidates import Candidates
from core.context import RequestContext
from retrieval.sparse_util import gather_rows, topk_per_row


def build_itemcf(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int, topk: int = 100, block: int = 4096) -> dict[str, np.ndarray]:
    """Top-K neighbour table (CSR: indptr, indices, data) from positive (user, item) pairs."""
    x = sp.csr_matrix((np.ones(len(user), np.float32), (user, item)), shape=(n_users, n_items))
    x.data[:] = 1.0  # duplicates collapse to 1
    x.sum_duplicates()
    x.data[:] = 1.0
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
