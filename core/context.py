"""Per-request inputs every stage reads. Stages hold no per-request state; this does."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestContext:
    request_id: str
    user_id: str
    user_idx: int  # -1: unknown to the bundle (cold start)
    user_fields: np.ndarray  # int64 [n_user_fields], 0 = unknown
    history: np.ndarray  # int64 item indices of positive interactions, most recent first
    history_ts: np.ndarray  # float64 timestamps matching history
    seen: np.ndarray  # int64 item indices never to serve again (sorted unique)
    exclude: np.ndarray  # int64 item indices the client asked to exclude (sorted unique)
    count: int = 20
    scene: str = "home"
    debug: bool = False
    now: float = 0.0
    fusion: dict[str, tuple[float, float]] = field(default_factory=dict)  # task -> (alpha, beta)
    bucket: str = "main"
    # Filled once per request by the user-tower stage; read by ann recall and prerank.
    user_emb: np.ndarray | None = None
    # Stage-specific notes for the debug trace (e.g. per-path recall counts).
    trace_extra: dict = field(default_factory=dict)
    # Values derived from the user once per request and shared by stages (the ranker feed's
    # user side, used by pre-rank stage B and the ranker alike); keyed by their owner.
    memo: dict = field(default_factory=dict)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    # Serving deadline, time.perf_counter() seconds (inf: no budget, e.g. eval and bench), and
    # what degraded so far: [{"stage": ..., "reason": ..., "detail"?: ...}] (app/pipeline.py).
    deadline: float = math.inf
    degraded: list[dict] = field(default_factory=list)

    def degrade(self, stage: str, reason: str, detail: str | None = None) -> None:
        self.degraded.append({"stage": stage, "reason": reason} if detail is None else {"stage": stage, "reason": reason, "detail": detail})

    @property
    def known(self) -> bool:
        return self.user_idx >= 0

    def blocked(self) -> np.ndarray:
        """Items never to return: seen ∪ excluded, sorted unique."""
        return np.union1d(self.seen, self.exclude)
