"""Multiplicative fusion: score = Π_k (p_k + α_k)^β_k, computed in log space over the
candidate array; β_k < 0 for negative tasks."""
from __future__ import annotations

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext
from core.schema import Schema


def default_params(schema: Schema, overrides: dict | None = None) -> dict[str, tuple[float, float]]:
    """Prior per task (alpha, beta): alpha 0.01; beta 1 for the first (primary engagement)
    task, 0.5 for the other positive tasks, -0.5 for negative ones. `overrides` maps
    task -> object with .alpha/.beta or an (alpha, beta) pair."""
    params = {t.name: (0.01, -0.5 if t.negative else (1.0 if k == 0 else 0.5)) for k, t in enumerate(schema.tasks)}
    for name, w in (overrides or {}).items():
        if name in params:
            params[name] = (float(w.alpha), float(w.beta)) if hasattr(w, "alpha") else (float(w[0]), float(w[1]))
    return params


def fused_log_score(heads: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """log Π_k (p_k + α_k)^β_k = Σ_k β_k log(p_k + α_k), for heads [n, T]."""
    return np.log(np.maximum(heads + alpha, 1e-12)) @ beta


class MultiplicativeFusion:
    name = "fusion"

    def __init__(self, schema: Schema, params: dict[str, tuple[float, float]]):
        self.tasks = schema.task_names
        self.alpha, self.beta = self._vectors(params)

    def _vectors(self, params: dict[str, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
        alpha = np.array([params[t][0] for t in self.tasks], np.float32)
        beta = np.array([params[t][1] for t in self.tasks], np.float32)
        return alpha, beta

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        if cands.heads is None:
            return cands
        alpha, beta = self._vectors(ctx.fusion) if ctx.fusion else (self.alpha, self.beta)
        # Fused score stays in log space: same order, no overflow.
        return cands.with_scores(fused_log_score(cands.heads, alpha, beta))
