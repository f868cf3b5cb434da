"""Pre-rank stage A: one matrix–vector product of the candidates' item embeddings with the
user's query vector, keeping the best `keep`."""
from __future__ import annotations

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext


class TwoTowerPrerank:
    name = "prerank_a"

    def __init__(self, item_emb: np.ndarray, keep: int):
        self.item_emb, self.keep = item_emb, keep

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        if ctx.user_emb is None or len(cands) == 0:
            # Cold user with no history: keep recall's order (popular/fresh priority).
            return cands.top(min(self.keep, len(cands)))
        score = self.item_emb[cands.item] @ ctx.user_emb
        return cands.with_scores(score).top(min(self.keep, len(cands)))
