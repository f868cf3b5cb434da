"""Multi-path recall merge: per-source quotas, dedup with OR-ed source bits, blocked items
(excluded and already seen) removed *before* quotas are counted, and backfill from
beyond-quota candidates so the merged set is never short while candidates remain."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol

import numpy as np
from numba import njit

from core.candidates import Candidates
from core.context import RequestContext


class CandidateSource(Protocol):
    name: str

    def __call__(self, ctx: RequestContext) -> Candidates: ...


@dataclass(frozen=True)
class MergeModel:
    """The learned merge: the probability that a merged candidate is an item the user goes on
    to interact with, σ(w·x), from where each path ranked it. Fitted at build time on a
    validation slice of the training data (retrieval/calibrate.py).

    x per candidate: for every path the model knows, (found by it, logit of the path's
    calibrated hit rate at that rank, log(1 + rank)); then the number of parts that found it
    and a constant. Evidence adds up: an item ann ranks 150th and item-CF ranks 20th beats
    one only ann ranks 120th, which neither rank/quota nor a best-single-path rate can say.
    Parts the model does not know (a path added after the build) only count in the
    number of paths."""

    paths: tuple[str, ...]
    rates: tuple[np.ndarray, ...]  # per path: hit rate per rank (0-based), non-increasing
    weights: np.ndarray | None = None  # [3·paths + 2]; None: not fitted yet

    FEATURES_PER_PATH = ("found", "logit_rate", "log_rank")

    @property
    def n_features(self) -> int:
        return 3 * len(self.paths) + 2

    def feature_names(self) -> list[str]:
        return [f"{p}.{f}" for p in self.paths for f in self.FEATURES_PER_PATH] + ["n_paths", "bias"]

    def features(self, n: int, inv: np.ndarray, rank: np.ndarray, part: np.ndarray, names: list[str]) -> np.ndarray:
        """[n, n_features] for n merged items; row r of the concatenated parts is item inv[r],
        at `rank[r]` of part `part[r]` (named names[part[r]])."""
        x = np.zeros((n, self.n_features), np.float32)
        for j, name in enumerate(names):  # one pass per path, vectorised over its candidates
            if name not in self.paths:
                continue
            k = self.paths.index(name)
            rows = np.flatnonzero(part == j)
            r = rank[rows]
            rate = self.rates[k]
            p = np.clip(rate[np.minimum(r, len(rate) - 1)], 1e-6, 1 - 1e-6)
            x[inv[rows], 3 * k] = 1.0
            x[inv[rows], 3 * k + 1] = np.log(p / (1 - p))
            x[inv[rows], 3 * k + 2] = np.log1p(r)
        x[:, -2] = np.bincount(inv, minlength=n)
        x[:, -1] = 1.0
        return x

    def logits(self, n: int, inv: np.ndarray, rank: np.ndarray, part: np.ndarray, names: list[str]) -> np.ndarray:
        """float32 [n]: features(...) @ weights without building the feature matrix (serving).
        The model is linear, so each row adds its path's found + logit-rate terms (one table
        lookup) and its log-rank term, and rows sum per item; one pass over all rows instead of
        a handful of array ops per path."""
        table, offset, last, w_rank = self._row_tables
        w = self.weights
        k = np.array([self.paths.index(nm) if nm in self.paths else -1 for nm in names] or [-1], np.int64)[part]
        contrib = np.full(len(inv), float(w[-2]))  # every part counts in n_paths
        known = np.flatnonzero(k >= 0)
        kk, r = k[known], rank[known]
        contrib[known] += table[offset[kk] + np.minimum(r, last[kk])] + w_rank[kk] * np.log1p(r)
        return (np.bincount(inv, weights=contrib, minlength=n) + float(w[-1])).astype(np.float32)

    @cached_property
    def _row_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # per path: w_found + w_logit · logit(rate[r]) for every tabulated rank r, concatenated
        w = np.asarray(self.weights, np.float64)
        parts, offset, last = [], [], []
        for k, rate in enumerate(self.rates):
            p = np.clip(np.asarray(rate, np.float64), 1e-6, 1 - 1e-6)
            offset.append(sum(len(x) for x in parts))
            last.append(len(p) - 1)
            parts.append(w[3 * k] + w[3 * k + 1] * np.log(p / (1 - p)))
        table = np.concatenate(parts) if parts else np.zeros(0)
        return table, np.array(offset, np.int64), np.array(last, np.int64), w[2::3][: len(self.rates)].copy()

    def to_json(self) -> dict:
        return {"features": self.feature_names(), "weights": [round(float(w), 6) for w in self.weights]}


@dataclass
class _Union:
    """The parts' unblocked candidates concatenated, each part in its own score order."""

    item: np.ndarray  # merged (unique) items
    source: np.ndarray  # OR-ed source bits per merged item
    inv: np.ndarray  # row -> merged item
    rank: np.ndarray  # row -> rank inside its part
    part: np.ndarray  # row -> part index
    quota: np.ndarray  # row -> its part's quota

    @property
    def inquota(self) -> np.ndarray:
        """Merged items inside some path's quota."""
        q = np.zeros(len(self.item), bool)
        q[self.inv[self.rank < self.quota]] = True
        return q


def union_of(parts: list[tuple[Candidates, int]], blocked: np.ndarray) -> _Union | None:
    kept = [(n, c, quota) for n, (c, quota) in enumerate(parts) if len(c) and quota > 0]
    if not kept:
        return None
    # All parts at once, one array op per step rather than a few per part (the per-part
    # version spent most of the merge in call overhead: ~10 small ops per path).
    lens = np.array([len(c) for _, c, _ in kept], np.int64)
    starts = np.cumsum(lens) - lens
    k_of = np.repeat(np.arange(len(kept)), lens)  # row -> position in `kept`
    item = np.concatenate([c.item for _, c, _ in kept])
    bits = np.concatenate([c.source for _, c, _ in kept])
    score = np.concatenate([c.score for _, c, _ in kept])
    # Each part in its own score order (stable). Recall paths hand over their top-k already
    # sorted, so this is usually one comparison; blocked rows are dropped after the sort,
    # which keeps the same relative order as dropping them first.
    in_order = score[:-1] >= score[1:]
    in_order[starts[1:] - 1] = True  # part boundaries
    if not in_order.all():
        order = np.lexsort((-score, k_of))
        item, bits = item[order], bits[order]
    uniq, merged_bits, inv, rank, keep = _union_rows(item, bits, starts, np.asarray(blocked, np.int64))
    if len(uniq) == 0:
        return None
    k_of = k_of[keep]
    part_index = np.array([n for n, _, _ in kept], np.int64)
    quota = np.array([q for _, _, q in kept], np.int64)
    return _Union(uniq, merged_bits, inv, rank, part_index[k_of], quota[k_of])


@njit(cache=True, nogil=True)
def _union_rows(item, bits, starts, blocked):
    """The concatenated parts' rows (each part in its score order, part p from starts[p]) with
    blocked items dropped (`blocked` sorted unique: a binary search per row), ranked inside
    their part among its unblocked rows, and deduplicated. Returns (unique items ascending,
    their OR-ed source bits, row -> unique item, row -> rank, kept row -> original row).
    Compiled: the numpy version was ~15 array calls (membership, two cumsums, np.unique,
    bitwise_or.at) on ~1,200 rows, most of the merge's time."""
    n = len(item)
    n_parts = len(starts)
    nb = len(blocked)
    keep = np.empty(n, np.int64)
    rank = np.empty(n, np.int64)
    m = 0
    p = 0
    r = 0
    for i in range(n):
        while p + 1 < n_parts and i >= starts[p + 1]:
            p += 1
            r = 0
        x = item[i]
        if nb:
            j = np.searchsorted(blocked, x)
            if j < nb and blocked[j] == x:
                continue
        keep[m] = i
        rank[m] = r
        r += 1
        m += 1
    kept_items = np.empty(m, np.int64)
    for q in range(m):
        kept_items[q] = item[keep[q]]
    order = np.argsort(kept_items, kind="mergesort")
    uniq = np.empty(m, np.int64)
    merged = np.zeros(m, np.uint32)
    inv = np.empty(m, np.int64)
    u = -1
    for q in range(m):
        row = order[q]
        x = kept_items[row]
        if u < 0 or uniq[u] != x:
            u += 1
            uniq[u] = x
        merged[u] |= bits[keep[row]]
        inv[row] = u
    return uniq[: u + 1], merged[: u + 1], inv, rank[:m], keep[:m]


def merge_candidates(
    parts: list[tuple[Candidates, int]], blocked: np.ndarray, total: int, multi_hit: float = 1.0,
    model: MergeModel | None = None, names: list[str] | None = None,
) -> Candidates:
    """parts: (candidates of one source, its quota). Each source's candidates are ranked by
    its own score, blocked items (`blocked`: sorted unique, as RequestContext.blocked) removed first.

    Rank mode (no fitted `model`): an item's priority is rank/quota (< 1 inside its quota),
    the best over the sources that found it, divided by 1 + multi_hit·(paths that found it − 1)
    so items several paths agree on come first.

    Learned mode (`model` with weights; `names[i]` names part i): an item's score is the
    model's hit probability. Items inside some path's quota come before items only found
    beyond every quota.

    The `total` best are kept; ties broken by item order (stable)."""
    u = union_of(parts, blocked)
    if u is None:
        return Candidates.empty()
    n = len(u.item)
    if model is not None and model.weights is not None:
        z = model.logits(n, u.inv, u.rank, u.part, names or [])
        prob = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
        score = prob - 2.0 * (~u.inquota)  # beyond every quota: after all in-quota items (prob < 1)
        return Candidates(u.item, u.source, score.astype(np.float32)).top(min(total, n))
    key = u.rank.astype(np.float32) / u.quota.astype(np.float32)
    best = np.full(n, np.inf, np.float32)
    np.minimum.at(best, u.inv, key)
    if multi_hit:
        hits = np.bincount(u.inv, minlength=n).astype(np.float32)
        best = best / (1.0 + multi_hit * (hits - 1.0))
    # Score: higher is better, so the negated priority.
    return Candidates(u.item, u.source, -best).top(min(total, n))


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
        # compile (or load from numba's cache) the union now, not in the first request
        _union_rows(np.zeros(1, np.int64), np.ones(1, np.uint32), np.zeros(1, np.int64), np.zeros(1, np.int64))
        # The learned merge (manifest "merge_calibration"), its rate curves expanded once here.
        self.model: MergeModel | None = None
        if calibration and calibration.get("weights"):
            from retrieval.calibrate import merge_model

            depth = max(int(calibration.get("depth", 1024)), max(quotas.values(), default=0) * 4)
            self.model = merge_model(calibration, depth)

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
        return merge_candidates(parts, ctx.blocked(), self.total, self.multi_hit, self.model, names)
