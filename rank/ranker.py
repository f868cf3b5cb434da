"""The ranker stage: one onnxruntime call over all candidates, one probability per task."""
from __future__ import annotations

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext
from rank.features import ItemTable, pad_history, ranker_inputs


class MultiTaskRankerStage:
    name = "rank"

    def __init__(self, session, table: ItemTable, history_len: int, n_tasks: int, user_broadcast: bool = False):
        self.session, self.table, self.history_len, self.n_tasks = session, table, history_len, n_tasks
        # Rankers exported with user_broadcast take the user side once (batch 1); older
        # bundles need it repeated per candidate.
        self.user_broadcast = user_broadcast

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        n = len(cands)
        if n == 0:
            return Candidates.empty(self.n_tasks)
        hist = pad_history(ctx.history, self.history_len)
        m = 1 if self.user_broadcast else n
        feeds = ranker_inputs(
            self.table,
            np.full(m, ctx.user_idx, np.int64),
            np.broadcast_to(ctx.user_fields, (m, len(ctx.user_fields))),
            np.broadcast_to(hist, (m, self.history_len)),
            cands.item,
        )
        (probs,) = self.session.run(["probs"], feeds)
        probs = probs.astype(np.float32)
        # Stage score before fusion: the first task (click) probability.
        return cands.with_scores(probs[:, 0], heads=probs)
