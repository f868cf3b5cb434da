"""Multi-path recall merge: per-source quotas, dedup with OR-ed source bits, blocked items
(excluded and already seen) removed *before* quotas are counted, and backfill from
beyond-quota candidates so the merged set is never short while candidates remain."""
from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext


class CandidateSource(Protocol):
    name: str

    def __call__(self, ctx: RequestContext) -> Candidates: ...


def merge_candidates(parts: list[tuple[Candidates, int]], blocked: np.ndarray, total: int, multi_hit: float = 1.0) -> Candidates:
    """parts: (candidates of one source, its quota). Each source's candidates are ranked by
    its own score; an item's priority is rank/quota (< 1 inside its quota), the best over
    the sources that found it, divided by 1 + multi_hit·(paths that found it − 1) so items
    several paths agree on come first. The `total` best priorities are kept."""
    items, bits, keys = [], [], []
    for cands, quota in parts:
        if len(cands) == 0 or quota <= 0:
            continue
        c = cands.take(np.flatnonzero(~np.isin(cands.item, blocked, assume_unique=False))) if len(blocked) else cands
        c = c.top(len(c))
        items.append(c.item)
        bits.append(c.source)
        keys.append(np.arange(len(c), dtype=np.float32) / np.float32(quota))
    if not items:
        return Candidates.empty()
    item = np.concatenate(items)
    bit = np.concatenate(bits)
    key = np.concatenate(keys)
    uniq, inv = np.unique(item, return_inverse=True)
    merged_bits = np.zeros(len(uniq), np.uint32)
    np.bitwise_or.at(merged_bits, inv, bit)
    best = np.full(len(uniq), np.inf, np.float32)
    np.minimum.at(best, inv, key)
    if multi_hit:
        hits = np.bincount(inv, minlength=len(uniq)).astype(np.float32)
        best = best / (1.0 + multi_hit * (hits - 1.0))
    # Score: higher is better, so the negated priority; ties broken by item order (stable).
    merged = Candidates(uniq, merged_bits, -best)
    return merged.top(min(total, len(merged)))


class RecallMerge:
    """The recall stage: runs every source (fail-open: a path that raises is skipped and
    reported), then merges."""

    name = "recall"

    def __init__(self, sources: list[CandidateSource], quotas: dict[str, int], total: int, on_error: Callable[[str, Exception], None] | None = None, multi_hit: float = 1.0):
        self.sources, self.quotas, self.total, self.multi_hit = sources, quotas, total, multi_hit
        self.on_error = on_error

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        parts, report = [], {}
        for src in self.sources:
            t0 = time.perf_counter()
            try:
                out = src(ctx)
                report[src.name] = {"n": len(out), "ms": round((time.perf_counter() - t0) * 1e3, 3)}
            except Exception as e:  # fail open: one broken path must not fail the feed
                report[src.name] = {"n": 0, "error": type(e).__name__}
                if self.on_error:
                    self.on_error(src.name, e)
                continue
            parts.append((out, self.quotas.get(src.name, 0)))
        ctx.trace_extra["recall_paths"] = report
        if len(cands):  # candidates handed in (e.g. by a caller) compete too
            parts.append((cands, len(cands)))
        return merge_candidates(parts, ctx.blocked(), self.total, self.multi_hit)
