"""ANN recall: the user tower (ONNX) gives a query vector, faiss finds the nearest item
embeddings. Faiss runs with one thread per request (PERF-NOTES: a second thread only slows
single-query search)."""
from __future__ import annotations

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext


def build_index(item_emb: np.ndarray, exact_below: int = 50_000, seed: int = 0):
    """Exact inner product below `exact_below` items, HNSW above. Returns (index, params)."""
    import faiss

    n, d = item_emb.shape
    x = np.ascontiguousarray(item_emb, dtype=np.float32)
    if n < exact_below:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index, {"type": "flat_ip"}
    index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.add(x)
    return index, {"type": "hnsw32", "efConstruction": 40, "efSearch": 512}


class AnnRecall:
    name = "ann"

    def __init__(self, index, k: int):
        self.index, self.k = index, k

    def __call__(self, ctx: RequestContext) -> Candidates:
        if ctx.user_emb is None:
            return Candidates.empty()
        # Ask for extra neighbours to make up for blocked ones (bounded at 2k).
        k = min(self.k + min(len(ctx.seen) + len(ctx.exclude), self.k), self.index.ntotal)
        scores, ids = self.index.search(ctx.user_emb.reshape(1, -1), k)
        ok = ids[0] >= 0
        return Candidates.from_source(ids[0][ok], scores[0][ok], self.name)
