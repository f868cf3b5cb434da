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
    """Pixie (Eksombatchai et al., WWW 2018), vectorised over walkers:
    - walkers per seed item q ∝ w_q · |E(q)| · (C − log|E(q)|), C the largest log-degree
      among the seeds and w_q the seed's recency weight (decay^s for the s-th most recent);
    - each hop: item → random user → random item, with restart at the walker's own seed;
    - multi-hit boosting V[p] = (Σ_q √V_q[p])², favouring items reached from several seeds;
    - early stop once `stop_items` items have `stop_visits` visits (0: walk every hop)."""

    name = "graph"

    def __init__(self, ui_indptr, ui_indices, iu_indptr, iu_indices, walkers=400, steps=4, restart=0.3, seeds=20, k=200,
                 decay=0.9, stop_items=0, stop_visits=4):
        self.ui_indptr, self.ui_indices = ui_indptr, ui_indices
        self.iu_indptr, self.iu_indices = iu_indptr, iu_indices
        self.walkers, self.steps, self.restart, self.n_seeds, self.k = walkers, steps, restart, seeds, k
        self.decay, self.stop_items, self.stop_visits = decay, stop_items, stop_visits

    def walker_counts(self, seeds: np.ndarray) -> np.ndarray:
        deg = (self.iu_indptr[seeds + 1] - self.iu_indptr[seeds]).astype(np.float64)
        logd = np.log(np.maximum(deg, 1.0))
        c = logd.max() + 1.0  # +1 keeps the largest-degree seed from getting zero walkers
        w = self.decay ** np.arange(len(seeds)) * deg * (c - logd)
        if w.sum() <= 0:
            return np.zeros(len(seeds), np.int64)
        return np.where(deg > 0, np.maximum(np.round(self.walkers * w / w.sum()), 1), 0).astype(np.int64)

    def __call__(self, ctx: RequestContext) -> Candidates:
        seeds = ctx.history[: self.n_seeds]
        if len(seeds) == 0:
            return Candidates.empty()
        rng = ctx.rng
        share = self.walker_counts(seeds)
        if share.sum() == 0:
            return Candidates.empty()
        slot = np.repeat(np.arange(len(seeds)), share)  # which seed each walker belongs to
        origin = seeds[slot]
        pos = origin.copy()
        n_items = len(self.iu_indptr) - 1
        keys = []
        # The early-stop test (a sort of every visit so far, when enabled) runs only once enough
        # visits exist to pass it, and not after the last hop.
        need = self.stop_items * self.stop_visits
        visits = 0
        for hop in range(self.steps):  # loop over hops, vectorised over walkers
            users, ok_u = _step(self.iu_indptr, self.iu_indices, pos, rng)
            items, ok_i = _step(self.ui_indptr, self.ui_indices, users, rng)
            alive = ok_u & ok_i
            keys.append(slot[alive] * n_items + items[alive])
            visits += len(keys[-1])
            back = (rng.random(len(pos)) < self.restart) | ~alive
            pos = np.where(back, origin, items)
            if self.stop_items and len(keys) > 1 and visits >= need and hop < self.steps - 1:
                _, c = np.unique(np.concatenate(keys) % n_items, return_counts=True)
                if np.count_nonzero(c >= self.stop_visits) >= self.stop_items:
                    break
        if not keys:
            return Candidates.empty()
        per_seed, counts = np.unique(np.concatenate(keys), return_counts=True)
        items = per_seed % n_items
        uniq, inv = np.unique(items, return_inverse=True)
        boosted = np.bincount(inv, weights=np.sqrt(counts), minlength=len(uniq)) ** 2
        return Candidates.from_source(uniq, boosted.astype(np.float32), self.name).top(self.k)


def build_follow(follow_indptr: np.ndarray, follow_authors: np.ndarray, item_author: np.ndarray, item_created: np.ndarray, n_authors: int, per_author: int = 50) -> dict[str, np.ndarray]:
    """user → followed authors (CSR) and author → newest `per_author` items (CSR, newest first)."""
    order = np.lexsort((-item_created, item_author))
    a_sorted = item_author[order]
    counts = np.bincount(a_sorted, minlength=n_authors)
    start = np.concatenate([[0], np.cumsum(counts)])
    rank = np.arange(len(order)) - start[a_sorted]
    keep = rank < per_author
    kept_counts = np.bincount(a_sorted[keep], minlength=n_authors)
    return {
        "user_indptr": follow_indptr.astype(np.int64),
        "user_authors": follow_authors.astype(np.int64),
        "author_indptr": np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int64),
        "author_items": order[keep].astype(np.int64),
    }


class FollowRecall:
    """Fresh items of the authors a user follows, newest first."""

    name = "follow"

    def __init__(self, user_indptr, user_authors, author_indptr, author_items, item_created, k=100, per_author=10):
        self.user_indptr, self.user_authors = user_indptr, user_authors
        self.author_indptr, self.author_items = author_indptr, author_items
        self.item_created, self.k, self.per_author = item_created, k, per_author
        self.newest = float(item_created.max()) if len(item_created) else 0.0

    def __call__(self, ctx: RequestContext) -> Candidates:
        if not ctx.known or ctx.user_idx + 1 >= len(self.user_indptr):
            return Candidates.empty()
        authors = self.user_authors[self.user_indptr[ctx.user_idx] : self.user_indptr[ctx.user_idx + 1]]
        if len(authors) == 0:
            return Candidates.empty()
        # the newest `per_author` items of each followed author (rows are newest first)
        starts = self.author_indptr[authors]
        lens = np.minimum(self.author_indptr[authors + 1] - starts, self.per_author)
        owner = np.repeat(np.arange(len(authors)), lens)
        offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        items = self.author_items[starts[owner] + offs]
        # score: age in days relative to the newest item (float32-safe, newest highest)
        age = (self.item_created[items] - self.newest) / 86400.0
        return Candidates.from_source(items, age.astype(np.float32), self.name).top(self.k)
