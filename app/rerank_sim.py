"""`funnel rerank-sim`: the reranker against simulated users of the synthetic world.

For each sampled user the serving pipeline runs up to fusion on a bundle built from the
synthetic world (recall, pre-rank, the ranker's predicted heads, fusion), then every
reranker under comparison orders the same fused candidates: sort by fused score, greedy
(beam width 1), beam B = 4, beam B = 8. The rerankers see only what serving sees — the
ranker's heads and the catalog's author/category fields — never the world's hidden
state. Each served list is then scored by the world's true behaviour model
(`SyntheticWorld.expected_batch` / `session_reward_batch`, with or without fatigue):
expected session reward (default reward weights), expected items viewed per session
(Σ reach), and distinct authors / categories in the list.

Without --bundle a bundle is built once (app.build.build_bundle; needs torch) from the
world's own logs and cached under bundles/rerank-sim-<items>-s<seed>-f<fatigue>.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from core.candidates import Candidates
from core.settings import Settings

MODES = {"sort": ("sort", None), "greedy": ("greedy", 1), "beam4": ("beam", 4), "beam8": ("beam", 8)}


def _distinct_per_row(x: np.ndarray) -> np.ndarray:
    s = np.sort(x, axis=1)
    return 1 + (s[:, 1:] != s[:, :-1]).sum(axis=1)


def ensure_bundle(items: int, users: int, seed: int, fatigue: bool, bundle_dir: Path, show=None) -> Path:
    """The cached simulation bundle for this world, built if missing."""
    from core.bundle import MANIFEST

    path = Path(bundle_dir) / f"rerank-sim-{items}-s{seed}-f{int(fatigue)}"
    if (path / MANIFEST).exists():
        return path
    from app.build import build_bundle
    from sim.synthetic import SyntheticWorld, WorldConfig

    cfg = WorldConfig(n_items=items, n_users=users or max(200, int(items / 2.5)), seed=seed, fatigue=fatigue)
    if show:
        show(f"building {path} (synthetic world, {cfg.n_items} items, {cfg.n_users} users, fatigue={fatigue}) ...")
    ds = SyntheticWorld(cfg).generate_log()
    build_bundle(ds, {"dataset": "synthetic", "world": asdict(cfg)}, path, epochs_tt=4, epochs_rank=3, seed=seed)
    return path


def sim_world(b, fatigue: bool):
    """The synthetic world a bundle was built from, with fatigue switched on or off (the
    catalog, users and follow graph do not depend on it)."""
    from sim.synthetic import SyntheticWorld, WorldConfig

    cfg = dict(b.manifest["source"]["world"])
    cfg["fatigue"] = bool(fatigue)
    world = SyntheticWorld(WorldConfig(**cfg))
    # bundle indices are world indices (ids "u<k>" / "i<k>" in order)
    if len(b.item_ids) != world.n_items or int(str(b.item_ids[-1])[1:]) != world.n_items - 1:
        raise ValueError("bundle catalog does not match its synthetic world")
    return world


def fused_candidates(pipe, sessions: int, count: int, seed: int, show=None) -> tuple[np.ndarray, list[Candidates]]:
    """Run the pipeline up to fusion for `sessions` distinct known users (sampled with the
    seed); users whose fused list is shorter than `count` are dropped."""
    b = pipe.bundle
    rng = np.random.default_rng(seed + 17)
    known = np.flatnonzero(np.diff(b.hist_indptr) > 0)
    chosen = np.sort(rng.choice(known, min(sessions, len(known)), replace=False))
    users, out = [], []
    t0 = time.perf_counter()
    for k, u in enumerate(chosen.tolist()):
        ctx = pipe.context(request_id=f"sim-{k}", user_id=str(b.user_ids[u]), count=count, scene="home",
                           exclude_item_ids=[], events=[], seed=seed * 1_000_003 + k)
        cands = Candidates.empty()
        for stage in pipe.stages[:-1]:  # everything up to fusion
            cands = stage(ctx, cands)
        if len(cands) >= count:
            users.append(u)
            out.append(cands)
        if show and (k + 1) % 250 == 0:
            show(f"rerank-sim: {k + 1}/{len(chosen)} users served ({time.perf_counter() - t0:.0f} s)")
    return np.array(users, np.int64), out


def rerank_all(reranker, fused: list[Candidates], count: int) -> tuple[np.ndarray, dict]:
    """Apply one rerank stage to every fused list: item lists [S, count] and timing/trace counts."""
    from core.context import RequestContext

    z = np.zeros(0, np.int64)
    lists, ms, relaxed, picked_sort = [], [], 0, 0
    for cands in fused:
        ctx = RequestContext("sim", "sim", 0, z, z, np.zeros(0), z, z, count=count)
        t = time.perf_counter()
        out = reranker(ctx, cands)
        ms.append((time.perf_counter() - t) * 1e3)
        lists.append(out.item)
        tr = ctx.trace_extra.get("rerank", {})
        relaxed += bool(tr.get("relaxed"))
        picked_sort += tr.get("picked") == "sort"
    info = {"rerank_ms_mean": float(np.mean(ms)), "rerank_ms_p99": float(np.percentile(ms, 99)),
            "lists_with_relaxation": int(relaxed), "fell_back_to_sort": int(picked_sort)}
    return np.stack(lists).astype(np.int64), info


def evaluate_lists(world, users: np.ndarray, lists: np.ndarray) -> tuple[np.ndarray, dict]:
    """Per-user session reward under the world's true model, and the table's metrics."""
    e = world.expected_batch(users, lists)
    rew = world.session_reward_batch(users, lists)
    return rew, {
        "session_reward": float(rew.mean()),
        "items_viewed": float(e["reach"].sum(axis=1).mean()),
        "clicks": float((e["reach"] * e["click"]).sum(axis=1).mean()),
        "dislikes": float((e["reach"] * e["dislike"]).sum(axis=1).mean()),
        "distinct_authors": float(_distinct_per_row(world.item_author[lists]).mean()),
        "distinct_categories": float(_distinct_per_row(world.item_category[lists]).mean()),
    }


def run_rerank_sim(
    bundle: Path | None = None,
    *,
    items: int = 20_000,
    users: int = 0,
    seed: int = 0,
    fatigue: bool = True,
    sessions: int = 1000,
    count: int = 20,
    bundle_dir: Path = Path("bundles"),
    settings: Settings | None = None,
    modes: tuple[str, ...] = ("sort", "greedy", "beam4", "beam8"),
    show=None,
) -> dict:
    from app.pipeline import Pipeline
    from core.bundle import Bundle
    from rerank.beam import make_reranker

    if show is True:
        show = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    path = Path(bundle) if bundle is not None else ensure_bundle(items, users, seed, fatigue, bundle_dir, show)
    b = Bundle.load(path)
    source = b.manifest.get("source", {})
    if source.get("dataset") != "synthetic":
        raise ValueError(f"{path}: rerank-sim needs a bundle built from the synthetic world (funnel build --dataset synthetic)")
    world_cfg = dict(source["world"])
    trained_fatigue = bool(world_cfg.get("fatigue", True))
    world = sim_world(b, fatigue)

    settings = settings or Settings()
    pipe = Pipeline(b, settings.model_copy(update={"rerank_mode": "sort"}))
    rerankers = {}
    for m in modes:
        mode, width = MODES[m]
        rerankers[m] = make_reranker(b.schema, b.item_fields, settings, mode=mode, beam=width)

    t0 = time.perf_counter()
    U, fused = fused_candidates(pipe, sessions, count, seed, show)
    res: dict = {}
    per_user: dict[str, np.ndarray] = {}
    for m, rr in rerankers.items():
        lists, info = rerank_all(rr, fused, count)
        per_user[m], res[m] = evaluate_lists(world, U, lists)
        res[m].update(info)
    if "sort" in modes:
        base = per_user["sort"]
        for m in modes:
            d = per_user[m] - base
            res[m]["reward_vs_sort_pct"] = float(100 * d.mean() / base.mean())
            res[m]["reward_vs_sort_se_pct"] = float(100 * d.std(ddof=1) / np.sqrt(len(d)) / base.mean()) if len(d) > 1 else 0.0
            res[m]["users_better_than_sort"] = float((d > 1e-12).mean())
    return {
        "bundle": str(path),
        "world": {"items": world.n_items, "users": world.n_users, "authors": world.n_authors,
                  "categories": world.n_categories, "seed": world_cfg.get("seed"), "fatigue": fatigue,
                  "bundle_trained_with_fatigue": trained_fatigue},
        "sessions": int(len(U)),
        "count": count,
        "rerank_settings": {k: v for k, v in settings.model_dump().items() if k.startswith("rerank_")},
        "seconds": round(time.perf_counter() - t0, 1),
        "results": res,
    }
