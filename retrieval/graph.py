"""Graph recall: Pixie-style random walks with restart over the user–item bipartite graph
(Eksombatchai et al., WWW 2018), vectorised over walkers. Visit counts are the scores."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from core.candidates import Candidates
from core.context import RequestContext


def build_graph(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int) -> dict[str, np.ndarray]:
    x = sp.csr_matrix((np.ones(len(user), np.float32), (user, item)), shape=(n_users, n_items))
    x.sum_duplicates()
    xt = x.T.tocsr()
    return {
        "ui_indptr": x.indptr.astype(np.int64),
        "ui_indices": x.indices.astype(np.int64),
        "iu_indptr": xt.indptr.astype(np.int64),
        "iu_indices": xt.indices.astype(np.int64),
    }


def _step(indptr: np.ndarray, indices: np.ndarray, nodes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One uniform random hop from each node; returns (next nodes, ok mask for nodes with edges)."""
    start = indptr[nodes]
    deg = indptr[nodes + 1] - start
    ok = deg > 0
    pick = start + (rng.random(len(nodes)) * np.maximum(deg, 1)).astype(np.int64)
    nxt = np.where(ok, indices[np.minimum(pick, len(indices) - 1)] if len(indices) else 0, nodes)
    return nxt, ok


class GraphRecall:
    name = "graph"

    def __init__(self, ui_indptr, ui_indices, iu_indptr, iu_indices, walkers=400, steps=4, restart=0.3, seeds=20, k=200):
        self.ui_indptr, self.ui_indices = ui_indptr, ui_indices
        self.iu_indptr, self.iu_indices = iu_indptr, iu_indices
        self.walkers, self.steps, self.restart, self.n_seeds, self.k = walkers, steps, restart, seeds, k

    def __call__(self, ctx: RequestContext) -> Candidates:
        seeds = ctx.history[: self.n_seeds]
        if len(seeds) == 0:
            return Candidates.empty()
        rng = ctx.rng
        # Walkers per seed ∝ its degree (popular seeds spread wider), at least one each.
        deg = (self.iu_indptr[seeds + 1] - self.iu_indptr[seeds]).astype(np.float64)
        if deg.sum() == 0:
            return Candidates.empty()
        share = np.maximum(np.round(self.walkers * deg / deg.sum()), (deg > 0)).astype(np.int64)
        origin = np.repeat(seeds, share)
        pos = origin.copy()
        visits = []
        for _ in range(self.steps):  # loop over hops, vectorised over walkers
            users, ok_u = _step(self.iu_indptr, self.iu_indices, pos, rng)
            items, ok_i = _step(self.ui_indptr, self.ui_indices, users, rng)
            alive = ok_u & ok_i
            visits.append(items[alive])
            # Restart at the walker's own seed with probability `restart`, or when stuck.
            back = (rng.random(len(pos)) < self.restart) | ~alive
            pos = np.where(back, origin, items)
        if not visits:
            return Candidates.empty()
        visited = np.concatenate(visits)
        uniq, counts = np.unique(visited, return_counts=True)
        return Candidates.from_source(uniq, counts.astype(np.float32), self.name).top(self.k)
