"""Baseline reranker: sort by fused score and cut to the requested count."""
from __future__ import annotations

from core.candidates import Candidates
from core.context import RequestContext


class FusedSortReranker:
    name = "rerank"

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        return cands.top(min(ctx.count, len(cands)))
