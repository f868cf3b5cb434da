"""Popular and fresh recall: the fallback paths and the cold-start feed."""
from __future__ import annotations

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext


def build_popular(item: np.ndarray, ts: np.ndarray, n_items: int, half_life_days: float = 14.0) -> np.ndarray:
    """Time-decayed popularity of each item (weight halves every `half_life_days` before the newest event)."""
    if len(ts) == 0:
        return np.zeros(n_items, np.float64)
    age_days = (ts.max() - ts) / 86400.0
    return np.bincount(item, weights=0.5 ** (age_days / half_life_days), minlength=n_items)


class ListRecall:
    """Serves a precomputed ranked list (popular or fresh), skipping blocked items."""

    def __init__(self, name: str, items: np.ndarray, scores: np.ndarray, k: int):
        self.name, self.items, self.scores, self.k = name, items, scores.astype(np.float32), k

    def __call__(self, ctx: RequestContext) -> Candidates:
        # Read a little more than k so blocked items do not leave the path short.
        n = min(len(self.items), self.k + len(ctx.seen) + len(ctx.exclude))
        return Candidates.from_source(self.items[:n], self.scores[:n], self.name)
