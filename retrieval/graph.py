"""Graph recall: Pixie-style random walks with restart over the user–item bipartite graph
(Eksombatchai et al., WWW 2018), compiled with numba. Visit counts are the scores."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit

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


@njit(cache=True, nogil=True)
def _hop(indptr, indices, node, rng):
    """One uniform random hop from `node`: (next node, False when it has no edges)."""
    start = indptr[node]
    deg = indptr[node + 1] - start
    if deg <= 0:
        return node, False
    return indices[start + min(int(rng.random() * deg), deg - 1)], True


@njit(cache=True, nogil=True)
def pixie_walks(iu_indptr, iu_indices, ui_indptr, ui_indices, seeds, share, steps, restart, stop_items, stop_visits, rng):
    """Walks with restart: item → random user → random item,
    back to the walker's seed with probability `restart` (or when stuck). Returns the visited
    items (ascending) and their multi-hit boosted scores (Σ_seeds √visits)². The early stop
    (stop_items > 0) is checked after each hop but the last, once enough visits exist."""
    n_seeds = len(seeds)
    n_walkers = 0
    for s in range(len(share)):
        n_walkers += share[s]
    slot = np.empty(n_walkers, np.int64)
    w = 0
    for s in range(len(share)):
        for _ in range(share[s]):
            slot[w] = s
            w += 1
    pos = np.empty(n_walkers, np.int64)
    for w in range(n_walkers):
        pos[w] = seeds[slot[w]]
    keys = np.empty(n_walkers * steps, np.int64)
    n = 0
    need = stop_items * stop_visits
    user = np.empty(n_walkers, np.int64)
    ok = np.empty(n_walkers, np.bool_)
    for hop in range(steps):
        # Phase by phase over all walkers rather than walker by walker: the graph's arrays are
        # larger than the cache, and independent loads in a row overlap their misses.
        for w in range(n_walkers):
            user[w], ok[w] = _hop(iu_indptr, iu_indices, pos[w], rng)
        for w in range(n_walkers):
            if ok[w]:
                item, ok[w] = _hop(ui_indptr, ui_indices, user[w], rng)
                user[w] = item
        for w in range(n_walkers):
            back = rng.random() < restart
            if ok[w]:
                keys[n] = user[w] * n_seeds + slot[w]  # by item, then seed
                n += 1
            pos[w] = seeds[slot[w]] if back or not ok[w] else user[w]
        if stop_items > 0 and hop >= 1 and n >= need and hop < steps - 1:
            seen = np.sort(keys[:n] // n_seeds)
            hits = 0
            run = 0
            for q in range(n):
                run = run + 1 if q > 0 and seen[q] == seen[q - 1] else 1
                if run == max(stop_visits, 1):
                    hits += 1
            if hits >= stop_items:
                break
    # one pass over the sorted keys: a run of equal keys is one (item, seed) visit count, and
    # an item's runs are adjacent, seeds ascending
    keys = np.sort(keys[:n])
    out_items = np.empty(n, np.int64)
    out_score = np.empty(n)
    m = -1
    visits = 0
    for q in range(n):
        visits += 1
        if q + 1 < n and keys[q + 1] == keys[q]:
            continue
        it = keys[q] // n_seeds
        if m < 0 or out_items[m] != it:
            m += 1
            out_items[m] = it
            out_score[m] = 0.0
        out_score[m] += np.sqrt(float(visits))
        visits = 0
    return out_items[: m + 1], out_score[: m + 1] ** 2


class GraphRecall:
    """Pixie (Eksombatchai et al., WWW 2018), walked by `pixie_walks` (compiled):
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
        # compile (or load from numba's cache) for these very arrays (read-only when memory-
        # mapped: another specialisation) now, not in the first request
        pixie_walks(iu_indptr, iu_indices, ui_indptr, ui_indices, np.zeros(0, np.int64), np.zeros(0, np.int64), 1, 0.5, 0, 0,
                    np.random.default_rng(0))

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
        uniq, boosted = pixie_walks(self.iu_indptr, self.iu_indices, self.ui_indptr, self.ui_indices, np.asarray(seeds, np.int64), share,
                                    self.steps, float(self.restart), int(self.stop_items), int(self.stop_visits), rng)
        if len(uniq) == 0:
            return Candidates.empty()
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
