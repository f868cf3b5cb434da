"""The ranker stage: one onnxruntime call over all candidates, one probability per task."""
from __future__ import annotations

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext
from rank.features import ItemTable, request_inputs


class MultiTaskRankerStage:
    name = "rank"

    def __init__(self, session, table: ItemTable, history_len: int, n_tasks: int, user_broadcast: bool = False, history_trim: bool = False):
        self.session, self.table, self.history_len, self.n_tasks = session, table, history_len, n_tasks
        self.history_trim = history_trim  # the model takes a history shorter than history_len
        # Rankers exported with user_broadcast take the user side once (batch 1); older
        # bundles need it repeated per candidate.
        self.user_broadcast = user_broadcast

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        n = len(cands)
        if n == 0:
            return Candidates.empty(self.n_tasks)
        feeds = request_inputs(self.table, ctx, self.history_len, cands.item, 1 if self.user_broadcast else n, self.history_trim)
        (probs,) = self.session.run(["probs"], feeds)
        probs = probs.astype(np.float32)
        # Stage score before fusion: the first task (click) probability.
        return cands.with_scores(probs[:, 0], heads=probs)
