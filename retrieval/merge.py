"""Multi-path recall merge: per-source quotas, dedup with OR-ed source bits, blocked items
(excluded and already seen) removed *before* quotas are counted, and backfill from
beyond-quota candidates so the merged set is never short while candidates remain."""
from __future__ import annotations

import math
import time
from typing import Callable, Protocol

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext


class CandidateSource(Protocol):
    name: str

    def __call__(self, ctx: RequestContext) -> Candidates: ...


def merge_candidates(
    parts: list[tuple[Candidates, int]], blocked: np.ndarray, total: int, multi_hit: float = 1.0,
    rates: list[np.ndarray | None] | None = None,
) -> Candidates:
    """parts: (candidates of one source, its quota). Each source's candidates are ranked by
    its own score, blocked items removed first.

    Uncalibrated (rates None): an item's priority is rank/quota (< 1 inside its quota), the
    best over the sources that found it, divided by 1 + multi_hit·(paths that found it − 1)
    so items several paths agree on come first.

    Calibrated (rates[i]: part i's hit rate per rank, from retrieval/calibrate.py; None for a
    part without a curve, which then gets half the lowest calibrated rate): an item's value is
    its best rate over the paths that found it × (1 + multi_hit·(paths − 1)); the calibration
    chooses multi_hit on its validation users. Items inside some path's quota come before
    items only found beyond every quota.

    The `total` best are kept; ties broken by item order (stable)."""
    items, bits, keys, inquota, vals = [], [], [], [], []
    calibrated = rates is not None and any(r is not None for r in rates)
    floor = min(float(r[-1]) for r in rates if r is not None and len(r)) if calibrated else 0.0
    for n, (cands, quota) in enumerate(parts):
        if len(cands) == 0 or quota <= 0:
            continue
        c = cands.take(np.flatnonzero(~np.isin(cands.item, blocked, assume_unique=False))) if len(blocked) else cands
        c = c.top(len(c))
        rank = np.arange(len(c), dtype=np.float32)
        items.append(c.item)
        bits.append(c.source)
        keys.append(rank / np.float32(quota))
        if calibrated:
            r = rates[n]
            if r is None or len(r) == 0:
                v = np.full(len(c), floor * 0.5, np.float32)
            else:
                v = r[np.minimum(rank.astype(np.int64), len(r) - 1)].astype(np.float32)
            vals.append(np.clip(v, 0.0, 0.999))
            inquota.append(rank < quota)
    if not items:
        return Candidates.empty()
    item = np.concatenate(items)
    bit = np.concatenate(bits)
    uniq, inv = np.unique(item, return_inverse=True)
    merged_bits = np.zeros(len(uniq), np.uint32)
    np.bitwise_or.at(merged_bits, inv, bit)
    if calibrated:
        best = np.zeros(len(uniq), np.float32)
        np.maximum.at(best, inv, np.concatenate(vals))
        if multi_hit:
            best = best * (1.0 + multi_hit * (np.bincount(inv, minlength=len(uniq)).astype(np.float32) - 1.0))
        q = np.zeros(len(uniq), bool)
        np.logical_or.at(q, inv, np.concatenate(inquota))
        score = best - 2.0 * (~q)  # beyond every quota: after all in-quota items (values < 2)
        merged = Candidates(uniq, merged_bits, score.astype(np.float32))
        return merged.top(min(total, len(merged)))
    key = np.concatenate(keys)
    best = np.full(len(uniq), np.inf, np.float32)
    np.minimum.at(best, inv, key)
    if multi_hit:
        hits = np.bincount(inv, minlength=len(uniq)).astype(np.float32)
        best = best / (1.0 + multi_hit * (hits - 1.0))
    # Score: higher is better, so the negated priority.
    merged = Candidates(uniq, merged_bits, -best)
    return merged.top(min(total, len(merged)))


# Paths that only slice a precomputed list: always run, so a feed stays full whatever else
# failed or ran out of time.
CHEAP_PATHS = frozenset({"popular", "fresh"})


class RecallMerge:
    """The recall stage: runs every source, then merges. Fail-open, path by path:
    - a path that raises is skipped (reason "error");
    - with a serving deadline (ctx.deadline finite), a path that returns more than
      `path_budget_s` after it started is late: its candidates are dropped (reason "late"),
      the same outcome a preemptive timeout would give (Python cannot interrupt a running
      numpy/faiss call, so lateness is seen when the path returns);
    - once the stage's own budget (`stage_budget_s`, capped by the request deadline) is
      spent, the expensive paths not yet run are skipped (reason "budget"); the cheap list
      paths (popular, fresh) always run.
    Each case is reported in ctx.trace_extra["recall_paths"] and ctx.degraded ("recall.<path>")."""

    name = "recall"

    def __init__(
        self, sources: list[CandidateSource], quotas: dict[str, int], total: int,
        on_error: Callable[[str, Exception], None] | None = None, multi_hit: float = 1.0, calibration: dict | None = None,
        path_budget_s: float = float("inf"), stage_budget_s: float = float("inf"),
    ):
        self.sources, self.quotas, self.total, self.multi_hit = sources, quotas, total, multi_hit
        self.on_error = on_error
        self.path_budget_s, self.stage_budget_s = path_budget_s, stage_budget_s
        # Per-path hit rate per rank (manifest "merge_calibration"), expanded once at build time.
        self.rates: dict[str, np.ndarray] | None = None
        if calibration:
            from retrieval.calibrate import curve_rates

            depth = max(int(calibration.get("depth", 1024)), max(quotas.values(), default=0) * 4)
            self.rates = {name: curve_rates(c, depth) for name, c in calibration["paths"].items()}
            self.cal_multi_hit = float(calibration.get("multi_hit", 0.0))

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        parts, names, report = [], [], {}
        timed = math.isfinite(ctx.deadline)
        stage_deadline = min(ctx.deadline, time.perf_counter() + self.stage_budget_s) if timed else math.inf
        for src in self.sources:
            t0 = time.perf_counter()
            if timed and src.name not in CHEAP_PATHS and t0 >= stage_deadline:
                report[src.name] = {"n": 0, "skipped": "budget"}
                ctx.degrade(f"recall.{src.name}", "budget")
                continue
            try:
                out = src(ctx)
            except Exception as e:  # fail open: one broken path must not fail the feed
                report[src.name] = {"n": 0, "error": type(e).__name__}
                ctx.degrade(f"recall.{src.name}", "error", type(e).__name__)
                if self.on_error:
                    self.on_error(src.name, e)
                continue
            sec = time.perf_counter() - t0
            report[src.name] = {"n": len(out), "ms": round(sec * 1e3, 3)}
            if timed and sec > self.path_budget_s and src.name not in CHEAP_PATHS:
                report[src.name]["dropped"] = "late"
                ctx.degrade(f"recall.{src.name}", "late", f"{sec * 1e3:.1f} ms > {self.path_budget_s * 1e3:.0f} ms")
                continue
            parts.append((out, self.quotas.get(src.name, 0)))
            names.append(src.name)
        ctx.trace_extra["recall_paths"] = report
        if len(cands):  # candidates handed in (e.g. by a caller) compete too
            parts.append((cands, len(cands)))
            names.append("")
        rates = [self.rates.get(n) for n in names] if self.rates else None
        return merge_candidates(parts, ctx.blocked(), self.total, self.cal_multi_hit if rates else self.multi_hit, rates)
