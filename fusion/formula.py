"""Fusion of the ranker's task heads into one score per candidate.

Multiplicative (served): score = Π_k (p_k + α_k)^β_k, computed in log space over the
candidate array, log score = Σ_k β_k log(p_k + α_k) (one [n, T] @ [T] product): same order,
no overflow. β_k > 0 for positive tasks, β_k < 0 for negative ones (dislike), so a higher
negative head lowers the score. α_k > 0 keeps a zero head from zeroing the product (and
softens the task's say: the larger α_k, the flatter (p_k + α_k)^β_k).

Additive (baseline for comparison only, never served): score = Σ_k w_k p_k. It is sensitive
to the heads' scales (a rare task's head barely moves the sum) where the multiplicative form
compares relative changes (ALGORITHM-NOTES "Fusion").

Parameters are per scene: a scene without its own parameters serves the configured prior
(`default_params`). Bounds (`FusionBounds`) hold for every scene and every task: α in
[alpha_min, alpha_max]; |β| in [beta_min, beta_max], with the sign of β fixed by the task's
polarity (positive tasks β > 0, negative tasks β < 0). The online tuner works in log|β|
space inside the same bounds (fusion/tuner.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext
from core.schema import Schema

Params = dict[str, tuple[float, float]]  # task -> (alpha, beta)


def default_params(schema: Schema, overrides: dict | None = None) -> Params:
    """Prior per task (alpha, beta): alpha 0.01; beta 1 for the first (primary engagement)
    task, 0.5 for the other positive tasks, -0.5 for negative ones. `overrides` maps
    task -> object with .alpha/.beta or an (alpha, beta) pair."""
    params = {t.name: (0.01, -0.5 if t.negative else (1.0 if k == 0 else 0.5)) for k, t in enumerate(schema.tasks)}
    for name, w in (overrides or {}).items():
        if name in params:
            params[name] = (float(w.alpha), float(w.beta)) if hasattr(w, "alpha") else (float(w[0]), float(w[1]))
    return params


@dataclass(frozen=True)
class FusionBounds:
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    beta_min: float = 0.01  # bounds of |β|
    beta_max: float = 5.0

    def __post_init__(self):
        if not (0.0 <= self.alpha_min <= self.alpha_max):
            raise ValueError("need 0 <= alpha_min <= alpha_max")
        if not (0.0 < self.beta_min <= self.beta_max):
            raise ValueError("need 0 < beta_min <= beta_max")

    def alpha_range(self) -> tuple[float, float]:
        return self.alpha_min, self.alpha_max

    def beta_range(self, negative: bool) -> tuple[float, float]:
        return (-self.beta_max, -self.beta_min) if negative else (self.beta_min, self.beta_max)

    def log_beta_range(self) -> tuple[float, float]:
        return math.log(self.beta_min), math.log(self.beta_max)

    def to_dict(self, schema: Schema) -> dict:
        return {t.name: {"alpha": list(self.alpha_range()), "beta": list(self.beta_range(t.negative))} for t in schema.tasks}

    def clip(self, schema: Schema, params: Params) -> Params:
        """Params pushed inside the bounds, β taking the sign of its task's polarity."""
        out = {}
        for t in schema.tasks:
            a, b = params[t.name]
            mag = min(max(abs(b), self.beta_min), self.beta_max)
            out[t.name] = (min(max(a, self.alpha_min), self.alpha_max), -mag if t.negative else mag)
        return out


def check_params(schema: Schema, bounds: FusionBounds, patch: dict) -> list[tuple[tuple, str]]:
    """Problems of a params patch {task: {"alpha"?: a, "beta"?: b}} as (loc, message) pairs,
    loc relative to the patch (task, field). Empty list: the patch is valid."""
    errors: list[tuple[tuple, str]] = []
    names = set(schema.task_names)
    neg = {t.name: t.negative for t in schema.tasks}
    for task, w in patch.items():
        if task not in names:
            errors.append(((task,), f"unknown task {task!r}; the bundle's tasks are {schema.task_names}"))
            continue
        for key, val in w.items():
            if key == "alpha":
                lo, hi = bounds.alpha_range()
            elif key == "beta":
                lo, hi = bounds.beta_range(neg[task])
            else:
                errors.append(((task, key), "unknown parameter; use alpha or beta"))
                continue
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                errors.append(((task, key), "must be a finite number"))
            elif not (lo <= val <= hi):
                polarity = " (negative task: beta < 0)" if key == "beta" and neg[task] else ""
                errors.append(((task, key), f"{key} of {task} = {val} is outside its bounds [{lo}, {hi}]{polarity}"))
    return errors


def params_vectors(tasks: list[str], params: Params) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.array([params[t][0] for t in tasks], np.float32)
    beta = np.array([params[t][1] for t in tasks], np.float32)
    return alpha, beta


def fused_log_score(heads: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """log Π_k (p_k + α_k)^β_k = Σ_k β_k log(p_k + α_k), for heads [n, T]."""
    return np.log(np.maximum(heads + alpha, 1e-12)) @ beta


def additive_score(heads: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Baseline: Σ_k w_k p_k, for heads [n, T] (comparison only)."""
    return np.asarray(heads, np.float32) @ np.asarray(weights, np.float32)


class MultiplicativeFusion:
    name = "fusion"

    def __init__(self, schema: Schema, params: Params):
        self.tasks = schema.task_names
        self.alpha, self.beta = params_vectors(self.tasks, params)

    def _vectors(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        return params_vectors(self.tasks, params)

    def score(self, ctx: RequestContext, heads: np.ndarray) -> np.ndarray:
        """The fused log score of `heads` [N, T] under the request's parameters (its tuner
        bucket's), else the configured ones. Log space: same order, no overflow."""
        alpha, beta = self._vectors(ctx.fusion) if ctx.fusion else (self.alpha, self.beta)
        return fused_log_score(heads, alpha, beta)

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        if cands.heads is None:
            return cands
        return cands.with_scores(self.score(ctx, cands.heads))


class AdditiveFusion:
    """Σ_k w_k p_k with w_k = β_k of the params (negative tasks subtract): a baseline to
    compare the multiplicative form against, not wired into serving."""

    name = "fusion_additive"

    def __init__(self, schema: Schema, params: Params):
        self.tasks = schema.task_names
        self.weights = np.array([params[t][1] for t in self.tasks], np.float32)

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        if cands.heads is None:
            return cands
        w = np.array([ctx.fusion[t][1] for t in self.tasks], np.float32) if ctx.fusion else self.weights
        return cands.with_scores(additive_score(cands.heads, w))
