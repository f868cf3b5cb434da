"""Latency of the rerank stage on realistic arrays (for `funnel bench`).

Candidates come from a synthetic catalog of `n_items` (SyntheticWorld: authors with
lognormal productivity, ~90% of an author's items in its home category, Zipf category
sizes): per request a random user's `n_candidates` best items by affinity out of a sample
drawn mostly from the user's preferred categories, so authors and categories repeat the
way a personalised candidate set does. Heads are the world's per-item probabilities for those items (only their
distribution matters here), fused with the default fusion prior. The timed call is the
whole stage: pool selection, values, continue probabilities, search, trace.
"""
from __future__ import annotations

import time

import numpy as np

from core.candidates import Candidates
from core.context import RequestContext
from core.schema import Schema
from fusion.formula import default_params, fused_log_score

HEAD_KEYS = ("click", "long_view_given_click", "like_given_click", "share_given_click", "follow_given_click", "dislike", "continue")


def _requests(n_req: int, n_candidates: int, n_tasks: int, n_items: int, seed: int):
    from sim.synthetic import WorldConfig, SyntheticWorld

    world = SyntheticWorld(WorldConfig(n_items=n_items, n_users=2000, seed=seed))
    tasks = world.schema.tasks[:n_tasks] if n_tasks <= len(world.schema.tasks) else world.schema.tasks
    schema = Schema(world.schema.dataset, tuple(tasks), world.schema.user_fields, world.schema.item_fields,
                    author_field=world.schema.author_field, category_field=world.schema.category_field)
    params = default_params(schema)
    alpha = np.array([params[t.name][0] for t in schema.tasks], np.float32)
    beta = np.array([params[t.name][1] for t in schema.tasks], np.float32)
    rng = np.random.default_rng(seed + 1)
    reqs = []
    for _ in range(n_req):
        u = int(rng.integers(world.n_users))
        # like a personalised candidate set: mostly the user's preferred categories, some of anything
        prefs = world.user_pref_categories[u][world.user_pref_weights[u] > 0]
        in_pref = np.flatnonzero(np.isin(world.item_category, prefs))
        pool = np.union1d(rng.choice(in_pref, min(len(in_pref), 30 * n_candidates), replace=False),
                          rng.choice(n_items, min(n_items, 10 * n_candidates), replace=False))
        aff = world.item_latent[pool] @ world.user_latent[u]
        items = pool[np.argsort(-aff)[:n_candidates]].astype(np.int64)
        e = world.expected_batch(np.array([u]), items[None, :])
        heads = np.stack([e[k][0] for k in HEAD_KEYS], axis=1)[:, : len(schema.tasks)].astype(np.float32)
        if heads.shape[1] < len(schema.tasks):
            heads = np.pad(heads, ((0, 0), (0, len(schema.tasks) - heads.shape[1])), constant_values=0.1)
        fused = fused_log_score(heads, alpha, beta).astype(np.float32)
        reqs.append(Candidates(items, np.ones(len(items), np.uint32), fused, heads))
    return world, schema, reqs


def bench_rerank(n_candidates: int = 150, slots: int = 20, beam: int = 8, n_tasks: int = 7, n_items: int = 1_000_000,
                 iters: int = 2000, seed: int = 0, settings=None, warmup: int = 50) -> dict:
    """Time BeamReranker (width `beam`, pool = all `n_candidates`) building `slots` slots;
    p50/p99/mean in milliseconds over `iters` calls cycling through 64 requests."""
    from core.settings import Settings
    from rerank.beam import BeamReranker, config_from_settings

    settings = settings or Settings()
    world, schema, reqs = _requests(64, n_candidates, n_tasks, n_items, seed)
    cfg = config_from_settings(settings.model_copy(update={"rerank_top_m": n_candidates}), beam=beam)
    stage = BeamReranker(schema, world.item_fields[:, 1], world.item_fields[:, 0], cfg)
    z = np.zeros(0, np.int64)
    ms = np.empty(iters)
    relaxed = 0
    for k in range(warmup + iters):
        cands = reqs[k % len(reqs)]
        ctx = RequestContext("bench", "u", 0, z, z, np.zeros(0), z, z, count=slots)
        t = time.perf_counter()
        out = stage(ctx, cands)
        dt = (time.perf_counter() - t) * 1e3
        if k >= warmup:
            ms[k - warmup] = dt
            relaxed += bool(ctx.trace_extra["rerank"]["relaxed"])
        assert len(out) == min(slots, n_candidates)
    return {
        "stage": "rerank",
        "n_candidates": n_candidates,
        "slots": slots,
        "beam": beam,
        "n_tasks": len(schema.tasks),
        "n_items": n_items,
        "iters": iters,
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "max_ms": round(float(ms.max()), 4),
        "share_relaxed": round(relaxed / iters, 4),
        "distinct_authors_per_request": round(float(np.mean([len(np.unique(world.item_author[r.item])) for r in reqs])), 1),
        "distinct_categories_per_request": round(float(np.mean([len(np.unique(world.item_category[r.item])) for r in reqs])), 1),
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(bench_rerank(**{k: int(v) for k, v in (a.split("=") for a in sys.argv[1:])}), indent=2))
