"""ANN recall: the user tower (ONNX) gives a query vector, faiss finds the nearest item
embeddings. Faiss runs with one thread per request (PERF-NOTES: a second thread only slows
single-query search)."""
from __future__ import annotations

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext

EXACT_BELOW = 50_000
TARGET_RECALL = 0.95


def index_recall(index, exact, queries: np.ndarray, k: int) -> float:
    """Mean recall@k of `index` against exact search for `queries`."""
    _, truth = exact.search(queries, k)
    _, got = index.search(queries, k)
    hits = [len(np.intersect1d(t[t >= 0], g[g >= 0])) / max((t >= 0).sum(), 1) for t, g in zip(truth, got)]
    return float(np.mean(hits))


def build_index(item_emb: np.ndarray, queries: np.ndarray | None = None, k: int = 400, exact_below: int = EXACT_BELOW, target: float = TARGET_RECALL):
    """Exact inner product below `exact_below` items; HNSW32 above, with efSearch raised
    (never below k: faiss does not do it itself) until recall@k against exact search on
    `queries` (real user vectors) reaches `target`. Returns (index, params for the manifest)."""
    import faiss

    n, d = item_emb.shape
    x = np.ascontiguousarray(item_emb, dtype=np.float32)
    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    if n < exact_below:
        return exact, {"type": "flat_ip", "k": k, "recall_at_k": 1.0}
    index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.add(x)
    k = min(k, n)
    if queries is None or len(queries) == 0:
        queries = x[np.random.default_rng(0).choice(n, 200, replace=False)]
    q = np.ascontiguousarray(queries, dtype=np.float32)
    tried = {}
    for ef in (k, int(1.5 * k), 2 * k, 3 * k, 4 * k, 6 * k, 8 * k):
        index.hnsw.efSearch = ef
        tried[ef] = round(index_recall(index, exact, q, k), 4)
        if tried[ef] >= target:
            break
    ef = index.hnsw.efSearch
    return index, {"type": "hnsw32", "efConstruction": 40, "efSearch": ef, "k": k, "recall_at_k": tried[ef], "tried": tried, "queries": len(q)}


class AnnRecall:
    name = "ann"

    def __init__(self, index, k: int):
        self.index, self.k = index, min(k, index.ntotal)
        # HNSW must explore at least k nodes to return k good neighbours.
        hnsw = getattr(index, "hnsw", None)
        if hnsw is not None and hnsw.efSearch < self.k:
            hnsw.efSearch = self.k

    def __call__(self, ctx: RequestContext) -> Candidates:
        if ctx.user_emb is None:
            return Candidates.empty()
        scores, ids = self.index.search(ctx.user_emb.reshape(1, -1), self.k)
        ok = ids[0] >= 0
        return Candidates.from_source(ids[0][ok], scores[0][ok], self.name)
