"""Pipeline wiring: a declarative list of stages built once from a bundle and settings.

Deadlines and fail-open (DESIGN.md, issue "Keeps serving under faults"). Every stage has a
fallback, so a stage failure degrades the feed instead of failing the request:

| stage | raises → | skipped when short of time → |
|---|---|---|
| user_tower | no query vector (ann recall empty, prerank keeps recall order) | — |
| recall | path by path in RecallMerge (error / late / budget); the merge itself → popular | — |
| prerank_a | recall order, cut to the pre-rank size | — |
| prerank_b | stage A's order, cut to its size | — |
| rank | the pre-ranker's order (no task heads, fusion passes it through) | yes: rank_budget_ms |
| fusion | the ranker's primary head order | — |
| rerank | the fused order (sort) | yes: rerank_budget_ms |

With a serving deadline (ctx.deadline, set from FUNNEL_REQUEST_BUDGET_MS at the request's
arrival) an optional stage starts only while at least its own budget is left; a stage that
overruns its own budget is reported "late" (Python cannot preempt a running numpy or
onnxruntime call: lateness is seen when the stage returns; its output is kept, and the
stages after it see less time left). Everything lands in ctx.degraded as
{stage, reason: error|late|budget, detail?}; the response lists it and /metrics counts it.
Without a deadline (eval, bench) nothing is skipped or dropped."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from core.bundle import Bundle
from core.candidates import Candidates, source_names
from core.context import RequestContext
from core.settings import Settings
from fusion.formula import MultiplicativeFusion, default_params
from prerank.cascade import DistilledPrerank, TwoTowerPrerank
from rank.features import ItemTable, pad_history, user_tower_inputs
from rank.ranker import MultiTaskRankerStage
from rerank.beam import make_reranker
from retrieval.ann import AnnRecall
from retrieval.graph import FollowRecall, GraphRecall
from retrieval.itemcf import ItemCFRecall
from rerank.sort import FusedSortReranker
from retrieval.merge import RecallMerge, merge_candidates
from retrieval.popular import ListRecall

POSITIVE_EVENTS = frozenset({"click", "dwell", "like", "share", "follow"})


class Stage(Protocol):
    name: str

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates: ...


class UserQueryStage:
    """Computes the user's query vector once per request (ann recall and prerank read it).
    Cold users with no history get none, so they are served popular + fresh."""

    name = "user_tower"

    def __init__(self, session, history_len: int):
        self.session, self.history_len = session, history_len

    def __call__(self, ctx: RequestContext, cands: Candidates) -> Candidates:
        if ctx.known or len(ctx.history):
            feeds = user_tower_inputs(
                np.array([ctx.user_idx if ctx.known else -1]),
                ctx.user_fields.reshape(1, -1),
                pad_history(ctx.history, self.history_len).reshape(1, -1),
            )
            (emb,) = self.session.run(["user_emb"], feeds)
            ctx.user_emb = emb[0].astype(np.float32)
        return cands


@dataclass
class StageTrace:
    name: str
    n_in: int
    n_out: int
    ms: float
    sources: dict[str, int]
    degraded: str | None = None  # "error", "late" or "budget" when the stage degraded


class Pipeline:
    def __init__(self, bundle: Bundle, settings: Settings, observe: Callable[[str, float], None] | None = None, on_error=None,
                 on_stage_error: Callable[[str, Exception], None] | None = None, seed: int | None = None):
        self.bundle, self.settings = bundle, settings
        self.rng = np.random.default_rng(seed)
        schema = bundle.schema
        s = settings
        f = bundle.follow or {}
        table = ItemTable.for_schema(bundle.item_fields, bundle.item_pop, schema, f.get("user_indptr"), f.get("user_authors"))
        sources = [
            AnnRecall(bundle.ann_index, s.ann_k),
            ItemCFRecall(bundle.itemcf_indptr, bundle.itemcf_indices, bundle.itemcf_data, s.itemcf_seeds, s.itemcf_decay, s.quota_itemcf * 2),
            GraphRecall(
                bundle.ui_indptr, bundle.ui_indices, bundle.iu_indptr, bundle.iu_indices, s.graph_walkers, s.graph_steps,
                s.graph_restart, s.graph_seeds, s.quota_graph * 2, s.itemcf_decay, s.graph_stop_items, s.graph_stop_visits,
            ),
            ListRecall("popular", bundle.popular, bundle.popular_score, s.quota_popular),
            ListRecall("fresh", bundle.fresh, -np.arange(len(bundle.fresh), dtype=np.float32), s.quota_fresh),
        ]
        if bundle.follow is not None:  # datasets with authors and a follow graph
            f = bundle.follow
            sources.append(FollowRecall(f["user_indptr"], f["user_authors"], f["author_indptr"], f["author_items"], bundle.item_created, s.quota_follow * 2, s.follow_per_author))
        self.fusion_params = default_params(schema, s.fusion)
        models = bundle.manifest.get("models", {})
        fusion = MultiplicativeFusion(schema, self.fusion_params)  # the fusion stage; stage B cuts by the same formula
        self.stages: list[Stage] = [
            UserQueryStage(bundle.user_tower, schema.history_len),
            RecallMerge(
                sources, s.quotas(), s.recall_total, on_error=on_error, multi_hit=s.merge_multi_hit,
                calibration=bundle.manifest.get("merge_calibration") if s.merge_mode == "calibrated" else None,
                path_budget_s=s.recall_path_budget_ms / 1e3, stage_budget_s=s.recall_budget_ms / 1e3,
            ),
            TwoTowerPrerank(bundle.item_emb, s.prerank_a_keep),
            *([DistilledPrerank(bundle.prerank, table, schema.history_len, fusion, s.prerank_b_keep, history_trim=bool(models.get("prerank", {}).get("history_trim")))]
              if bundle.prerank is not None else []),
            MultiTaskRankerStage(bundle.ranker, table, schema.history_len, len(schema.tasks),
                                 user_broadcast=bool(models.get("ranker", {}).get("user_broadcast", False)),
                                 history_trim=bool(models.get("ranker", {}).get("history_trim", False))),
            fusion,
            make_reranker(schema, bundle.item_fields, s),  # rerank_mode: beam | greedy | sort
        ]
        self.observe = observe
        self.on_stage_error = on_stage_error
        # Own budgets (seconds): "late" above them; optional stages start only with this much left.
        self.budgets = {"recall": s.recall_budget_ms / 1e3, "rank": s.rank_budget_ms / 1e3, "rerank": s.rerank_budget_ms / 1e3}
        self.optional = frozenset({"rank", "rerank"})
        popular_fallback = ListRecall("popular", bundle.popular, bundle.popular_score, s.recall_total)
        sort = FusedSortReranker()
        self.fallbacks: dict[str, Callable[[RequestContext, Candidates], Candidates]] = {
            "user_tower": lambda ctx, c: c,
            "recall": lambda ctx, c: merge_candidates([(popular_fallback(ctx), s.recall_total)], ctx.blocked(), s.recall_total),
            "prerank_a": lambda ctx, c: c.top(min(s.prerank_a_keep, len(c))),
            "prerank_b": lambda ctx, c: c.top(min(s.prerank_b_keep, len(c))),
            "rank": lambda ctx, c: c,
            "fusion": lambda ctx, c: c,
            "rerank": sort,
        }

    def stage(self, name: str) -> Stage:
        """The stage called `name` (stages are addressed by name: stage B is only there when
        the bundle has a pre-ranker)."""
        return next(s for s in self.stages if s.name == name)

    def run(self, ctx: RequestContext) -> tuple[Candidates, list[StageTrace]]:
        cands = Candidates.empty()
        trace = []
        timed = math.isfinite(ctx.deadline)
        for stage in self.stages:
            name = stage.name
            t0 = time.perf_counter()
            n_in = len(cands)
            degraded = None
            if timed and name in self.optional and ctx.deadline - t0 < self.budgets[name]:
                degraded = "budget"
                ctx.degrade(name, "budget", f"{max(0.0, ctx.deadline - t0) * 1e3:.1f} ms left < {self.budgets[name] * 1e3:.0f} ms")
                cands = self.fallbacks[name](ctx, cands)
            else:
                try:
                    cands = stage(ctx, cands)
                except Exception as e:  # fail open: the stage's fallback serves instead
                    degraded = "error"
                    ctx.degrade(name, "error", type(e).__name__)
                    if self.on_stage_error:
                        self.on_stage_error(name, e)
                    cands = self.fallbacks[name](ctx, cands)
            sec = time.perf_counter() - t0
            if timed and degraded is None and sec > self.budgets.get(name, math.inf):
                degraded = "late"
                ctx.degrade(name, "late", f"{sec * 1e3:.1f} ms > {self.budgets[name] * 1e3:.0f} ms")
            if self.observe:
                self.observe(name, sec)
            if ctx.debug:
                trace.append(StageTrace(name, n_in, len(cands), round(sec * 1e3, 3), {k: v for k, v in cands.source_counts().items() if v}, degraded))
        return cands, trace

    # --- request context -------------------------------------------------------------------

    def context(
        self,
        *,
        request_id: str,
        user_id: str,
        count: int,
        scene: str,
        exclude_item_ids: list[str],
        events: list[tuple[str, str, float]],  # real-time (item_id, type, ts), most recent first
        debug: bool = False,
        now: float | None = None,
        fusion: dict | None = None,
        bucket: str = "main",
        seed: int | None = None,
        deadline: float = math.inf,
        degraded: list[dict] | None = None,
    ) -> RequestContext:
        b = self.bundle
        u = b.user_index.get(user_id, -1)
        if u >= 0:
            fields = b.user_fields[u]
            base_items, base_ts = b.user_history(u)
        else:
            fields = np.zeros(len(b.schema.user_fields), np.int64)
            base_items, base_ts = np.zeros(0, np.int64), np.zeros(0, np.float64)
        rt_items = b.item_index.lookup([i for i, _, _ in events])
        rt_pos = np.array([t in POSITIVE_EVENTS for _, t, _ in events], bool)
        rt_ts = np.array([ts for _, _, ts in events], np.float64)
        known_rt = rt_items >= 0
        pos = known_rt & rt_pos
        # History: real-time positives (most recent first, deduplicated) then build-time history reversed.
        hist = np.concatenate([rt_items[pos], base_items[::-1]])
        hts = np.concatenate([rt_ts[pos], base_ts[::-1]])
        _, first = np.unique(hist, return_index=True)
        first.sort()
        hist, hts = hist[first], hts[first]
        seen = np.unique(np.concatenate([base_items, rt_items[known_rt]]))
        ex = b.item_index.lookup(exclude_item_ids)
        exclude = np.unique(ex[ex >= 0])
        return RequestContext(
            request_id=request_id,
            user_id=user_id,
            user_idx=u,
            user_fields=np.asarray(fields, np.int64),
            history=hist.astype(np.int64),
            history_ts=hts,
            seen=seen.astype(np.int64),
            exclude=exclude,
            count=count,
            scene=scene,
            debug=debug,
            now=time.time() if now is None else now,
            fusion=fusion or {},
            bucket=bucket,
            # Unseeded requests (serving) draw from the pipeline's one generator: a new one per
            # request costs ~50 µs of OS entropy and seeding. Only the worker's compute thread runs
            # requests, so it is never drawn from by two threads at once.
            rng=self.rng if seed is None else np.random.default_rng(seed),
            deadline=deadline,
            degraded=list(degraded or []),
        )

    def describe(self, cands: Candidates) -> list[dict]:
        """Response items: external id, fused score, recall sources."""
        ids = self.bundle.item_ids[cands.item].tolist()
        return [
            {"item_id": str(i), "score": float(s), "sources": source_names(int(m))}
            for i, s, m in zip(ids, cands.score.tolist(), cands.source.tolist())
        ]
