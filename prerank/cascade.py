"""The pre-rank cascade.

Stage A (`TwoTowerPrerank`): one matrix–vector product of the candidates' item embeddings
with the user's query vector, keeping the best `keep` (~500).
Stage B (`DistilledPrerank`): the small DNN distilled from the ranker (prerank/train.py), one
onnxruntime call over stage A's survivors with the user side fed once (batch 1), keeping the
best `keep` (~150) by the request's own fusion formula over its heads: the cut keeps what the
ranker + fusion would most likely put on top, for whichever tuner bucket the request is in.
"""
from __future__ import annotations

import numpy as np

from core.arrays import take_rows
from core.candidates import Candidates
from core.context import RequestContext
from fusion.formula import MultiplicativeFusion
from rank.features import ItemTable, request_inputs


class TwoTowerPrerank:
    name = "prerank_a"

    def __init__(self, item_emb: np.ndarray, keep: int):
        self.item_emb, self.keep = item_emb, keep

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        if ctx.user_emb is None or len(cands) == 0:
            # Cold user with no history: keep recall's order (popular/fresh priority).
            return cands.top(min(self.keep, len(cands)))
        score = take_rows(self.item_emb, cands.item) @ ctx.user_emb  # whole-row gather: ~3x numpy's fancy indexing here
        return cands.with_scores(score).top(min(self.keep, len(cands)))


class DistilledPrerank:
    name = "prerank_b"

    def __init__(self, session, table: ItemTable, history_len: int, fusion: MultiplicativeFusion, keep: int, history_trim: bool = False):
        self.session, self.table, self.history_len, self.fusion, self.keep = session, table, history_len, fusion, keep
        self.history_trim = history_trim

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        if len(cands) <= self.keep:
            return cands  # nothing to cut: the ranker sees them all
        (probs,) = self.session.run(["probs"], request_inputs(self.table, ctx, self.history_len, cands.item, trim=self.history_trim))
        return cands.with_scores(self.fusion.score(ctx, probs)).top(self.keep)
