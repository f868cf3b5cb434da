"""`funnel bench`: in-process latency of the pipeline, per stage, per recall path and end
to end (p50/p95/p99), single-threaded (one onnxruntime and one faiss thread), on sampled
known users of the bundle; and, in the same run, the bare compute kernels those requests
need, timed on the very inputs the requests fed them.

Kernels (each one call per request, same batch sizes as served):
- `user_tower`, `prerank_b` (if the bundle has one), `rank`: the stage's ONNX `session.run`
  on the recorded feeds;
- `ann_search`: the faiss `index.search` on the recorded query vector and k;
- `itemcf_merge`: gather the seeds' neighbour rows, sum weights per item (np.unique +
  bincount), top-k by argpartition;
- `graph_walks`: the random walks with restart (the compiled `pixie_walks`), fixed number of
  hops (no early stop), visit counts, multi-hit boost, top-k;
- `prerank_a`: the candidates' item embeddings times the query vector, top-k;
- `beam_search`: `BeamSearch.search` on the recorded values, continue probabilities,
  authors and categories.

Each kernel is timed two ways, both on the recorded inputs, alternating in blocks with the
end-to-end requests:
- request order (`kernels_ms`): a recorded request's kernels back to back in pipeline order,
  nothing between them, request after request; each kernel meets the caches the others leave,
  as it does when served;
- isolated (`kernels_isolated_ms`): one kernel called over and over, then the next; each call
  finds the caches warm from its own previous one, so this is the lower bound.
`kernel_floor_ms` is the sum of the request-order medians: the CPU a request cannot avoid.
`overhead_ratio` = end-to-end p50 / kernel floor: what the pipeline adds around it
(context, merge, feature assembly, Candidates bookkeeping, tracing). `kernel_floor_isolated_ms`
and `overhead_ratio_isolated` are the same over the isolated medians.
Also peak RSS and the bundle's size on disk."""
from __future__ import annotations

import os
import resource
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from app.pipeline import Pipeline
from core.arrays import take_rows
from core.bundle import Bundle
from core.settings import Settings
from loadtest.run import process_memory_mb


def _pcts(xs) -> dict:
    a = np.asarray(xs, np.float64)
    if len(a) == 0:
        return {}
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3), "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3), "n": int(len(a))}


class _Recorder:
    """Stands in for an object during the capture pass: `method` calls are recorded
    (positional and keyword arguments) and forwarded; everything else passes through."""

    def __init__(self, target, method: str, log: list):
        self._target, self._method, self._log = target, method, log

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if name != self._method:
            return attr

        def call(*args, **kwargs):
            self._log.append((args, kwargs))
            return attr(*args, **kwargs)

        return call


def _walk_objects(pipe: Pipeline):
    """(stage or recall source) objects of the pipeline, by name."""
    for stage in pipe.stages:
        yield stage.name, stage
        for src in getattr(stage, "sources", ()) or ():
            yield src.name, src


# --- bare kernels on recorded inputs ------------------------------------------------------------


def _topk(score: np.ndarray, k: int) -> np.ndarray:
    if len(score) <= k:
        return np.argsort(-score)
    part = np.argpartition(-score, k - 1)[:k]
    return part[np.argsort(-score[part])]


def _itemcf_kernel(indptr, indices, data, decay, k):
    def run(seeds):
        starts = indptr[seeds]
        lens = indptr[seeds + 1] - starts
        owner = np.repeat(np.arange(len(seeds)), lens)
        pos = starts[owner] + (np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens))
        w = data[pos] * (decay ** owner.astype(np.float32))
        uniq, inv = np.unique(indices[pos], return_inverse=True)
        score = np.bincount(inv, weights=w, minlength=len(uniq))
        return uniq[_topk(score, k)]

    return run


def _walk_kernel(g, seed: int = 0):
    from retrieval.graph import pixie_walks

    rng = np.random.default_rng(seed)

    def run(seeds):
        share = g.walker_counts(seeds)
        uniq, boosted = pixie_walks(g.iu_indptr, g.iu_indices, g.ui_indptr, g.ui_indices, seeds, share, g.steps, float(g.restart), 0, 0, rng)
        return uniq[_topk(boosted, g.k)]

    return run


def _time_kernel(fn, inputs: list, n: int, offset: int = 0, warmup: int = 3) -> list[float]:
    """Time `fn(*args, **kwargs)` n times cycling over the recorded inputs."""
    ms = []
    for k in range(warmup + n):
        args, kwargs = inputs[(offset + k) % len(inputs)]
        t = time.perf_counter()
        fn(*args, **kwargs)
        if k >= warmup:
            ms.append((time.perf_counter() - t) * 1e3)
    return ms


# Pipeline order: the request-order replay runs a request's kernels in this order.
KERNEL_ORDER = ("user_tower", "ann_search", "itemcf_merge", "graph_walks", "prerank_a", "prerank_b", "rank", "beam_search")


def kernel_functions(pipe: Pipeline, ctxs_inputs: dict[str, list]) -> list[tuple[str, object, list]]:
    """(label, bare kernel function, recorded inputs) per kernel, in pipeline order."""
    out = []
    objs = dict(_walk_objects(pipe))
    for name, inputs in ctxs_inputs.items():
        if not inputs:
            continue
        kind, target = name.split(":", 1)
        if kind == "session":  # ONNX stage: session.run on the recorded feeds
            fn = objs[target].session.run
            label = target
        elif kind == "faiss":
            fn = objs[target].index.search
            label = "ann_search"
        elif kind == "beam":
            fn = objs[target].search.search
            label = "beam_search"
        elif kind == "itemcf":
            s = objs[target]
            fn = _itemcf_kernel(s.indptr, s.indices, s.data, s.decay, s.k)
            label = "itemcf_merge"
        elif kind == "graph":
            fn = _walk_kernel(objs[target])
            label = "graph_walks"
        elif kind == "matvec":
            emb, keep = objs[target].item_emb, objs[target].keep

            def fn(items, q, emb=emb, keep=keep):
                return items[_topk(take_rows(emb, items) @ q, keep)]  # the stage's own gather (prerank/cascade.py)

            label = target
        else:
            continue
        out.append((label, fn, inputs))
    rank = {k: i for i, k in enumerate(KERNEL_ORDER)}
    return sorted(out, key=lambda x: rank.get(x[0], len(rank)))


def kernel_timings(pipe: Pipeline, ctxs_inputs: dict[str, list], n: int, offset: int = 0, warmup: int = 3) -> dict[str, list[float]]:
    """Isolated: milliseconds per call, `n` calls of one kernel in a row on the recorded inputs
    (from input `offset` on), then the next kernel. Each kernel finds the caches warmed by its
    own previous call: a lower bound of its cost inside a request."""
    return {label: _time_kernel(fn, inputs, n, offset, warmup) for label, fn, inputs in kernel_functions(pipe, ctxs_inputs)}


def kernel_sequence_timings(pipe: Pipeline, ctxs_inputs: dict[str, list], n: int, offset: int = 0, warmup: int = 3) -> dict[str, list[float]]:
    """Request order: for each recorded request in turn, every kernel it needed, back to back
    in pipeline order with nothing between them (no context, merge, feature assembly or
    bookkeeping), each timed. Each kernel meets the caches the request's other kernels leave,
    as it does when served; what the full request adds on top is the pipeline's own cost."""
    fns = kernel_functions(pipe, ctxs_inputs)
    out: dict[str, list[float]] = {label: [] for label, _, _ in fns}
    for k in range(warmup + n):
        for label, fn, inputs in fns:
            args, kwargs = inputs[(offset + k) % len(inputs)]
            t = time.perf_counter()
            fn(*args, **kwargs)
            if k >= warmup:
                out[label].append((time.perf_counter() - t) * 1e3)
    return out


def _capture(pipe: Pipeline, make_ctx, users) -> dict[str, list]:
    """Run the pipeline once per user with recorders in place; return each kernel's inputs."""
    logs: dict[str, list] = defaultdict(list)
    swaps = []
    for name, obj in _walk_objects(pipe):
        sess = getattr(obj, "session", None)
        if sess is not None and hasattr(sess, "run"):
            swaps.append((obj, "session", sess, _Recorder(sess, "run", logs[f"session:{name}"])))
        if name == "ann" and hasattr(obj, "index"):
            swaps.append((obj, "index", obj.index, _Recorder(obj.index, "search", logs[f"faiss:{name}"])))
        if name == "rerank" and hasattr(getattr(obj, "search", None), "search"):
            swaps.append((obj, "search", obj.search, _Recorder(obj.search, "search", logs[f"beam:{name}"])))
    objs = dict(_walk_objects(pipe))
    for obj, attr, _, rec in swaps:
        setattr(obj, attr, rec)
    stages = pipe.stages
    pipe.stages = [_StageSpy(s, logs["matvec:prerank_a"]) if s.name == "prerank_a" else s for s in stages]
    try:
        for n, u in enumerate(users):
            ctx = make_ctx(n, u)
            for name, key, k in (("itemcf", "itemcf", "seeds"), ("graph", "graph", "n_seeds")):
                if name in objs:
                    seeds = ctx.history[: getattr(objs[name], k)]
                    if len(seeds):
                        logs[f"{key}:{name}"].append(((seeds,), {}))
            pipe.run(ctx)
    finally:
        for obj, attr, orig, _ in swaps:
            setattr(obj, attr, orig)
        pipe.stages = stages
    return logs


class _StageSpy:
    """Records the (candidate items, query vector) a two-tower pre-rank stage is handed."""

    def __init__(self, stage, log: list):
        self.stage, self.name, self.log = stage, stage.name, log

    def __call__(self, ctx, cands):
        if ctx.user_emb is not None and len(cands):
            self.log.append(((cands.item.copy(), ctx.user_emb), {}))
        return self.stage(ctx, cands)


def bench(bundle_path: Path | str, requests: int = 2000, warmup: int = 100, seed: int = 0, settings: Settings | None = None,
          kernels: bool = True, recent_events: int = 0) -> dict:
    import faiss

    settings = settings or Settings()
    faiss.omp_set_num_threads(settings.compute_threads)
    t0 = time.perf_counter()
    bundle = Bundle.load(bundle_path, threads=settings.compute_threads, model_cache_dir=settings.model_cache())
    load_s = time.perf_counter() - t0
    stage_ms: dict[str, list[float]] = defaultdict(list)
    pipe = Pipeline(bundle, settings, seed=seed)  # requests unseeded, as served: one generator per run
    rng = np.random.default_rng(seed)
    # users with a build-time history (the warm path every stage runs on)
    has_hist = np.flatnonzero(np.diff(bundle.hist_indptr) > 0)
    users = rng.choice(has_hist, warmup + requests)

    # recent_events: each request carries that many real-time events (what the feedback of an
    # active user adds): items drawn by popularity, one in four a click (a history item), the
    # rest impressions, most recent first, fresh for every request (IdIndex's dict of recent ids
    # mostly misses: a served user's next feed repeats most of its last one's events). Drawn up
    # front: the timed context then costs what it costs a served request (id lookups, merge).
    events = [[] for _ in users]
    if recent_events > 0:
        pop = np.expm1(bundle.item_pop.astype(np.float64)) + 1e-9
        drawn = np.random.default_rng(seed + 1).choice(bundle.n_items, (len(users), recent_events), p=pop / pop.sum())
        kinds = np.where(np.arange(recent_events) % 4 == 0, "click", "impression").tolist()
        now = time.time()
        events = [list(zip(bundle.item_ids[row].tolist(), kinds, (now - np.arange(recent_events)).tolist())) for row in drawn]

    def make_ctx(n, u):
        return pipe.context(request_id=f"b{n}", user_id=str(bundle.user_ids[u]), count=20, scene="home", exclude_item_ids=[], events=events[n])

    # Kernel inputs are recorded on the warm-up requests; then end-to-end requests and bare
    # kernel calls alternate in blocks, so background load hits both sides of the ratio alike.
    inputs = _capture(pipe, make_ctx, users[: max(warmup, 1)]) if kernels else {}
    kern_ms: dict[str, list[float]] = defaultdict(list)
    iso_ms: dict[str, list[float]] = defaultdict(list)
    end_to_end, path_ms, counts, hist_items = [], defaultdict(list), defaultdict(list), []
    timings: dict[str, float] = {}
    pipe.observe = lambda stage, sec: timings.__setitem__(stage, sec * 1e3)
    block, timed = 50, 0
    for n, u in enumerate(users):
        timings.clear()
        t = time.perf_counter()
        ctx = make_ctx(n, u)
        t_ctx = time.perf_counter()
        out, _ = pipe.run(ctx)
        total = (time.perf_counter() - t) * 1e3
        if n < warmup:
            continue
        end_to_end.append(total)
        hist_items.append(len(ctx.history))
        stage_ms["context"].append((t_ctx - t) * 1e3)
        for k, v in timings.items():
            stage_ms[k].append(v)
        for name, rep in ctx.trace_extra.get("recall_paths", {}).items():
            if "ms" in rep:
                path_ms[name].append(rep["ms"])
                counts[name].append(rep["n"])
        if kernels and (len(end_to_end) % block == 0 or n == len(users) - 1):
            for name, ms in kernel_sequence_timings(pipe, inputs, len(end_to_end) - timed, offset=timed).items():
                kern_ms[name].extend(ms)
            for name, ms in kernel_timings(pipe, inputs, len(end_to_end) - timed, offset=timed).items():
                iso_ms[name].extend(ms)
            timed = len(end_to_end)
    pipe.observe = None
    e2e = _pcts(end_to_end)
    result = {
        "bundle": bundle.version,
        "items": bundle.n_items,
        "users": bundle.n_users,
        "requests": len(end_to_end),
        "threads": settings.compute_threads,
        "recent_events": recent_events,
        "history_items_mean": round(float(np.mean(hist_items)), 1) if hist_items else 0.0,  # the requests' merged histories
        "end_to_end_ms": e2e,
        "stages_ms": {k: _pcts(v) for k, v in stage_ms.items()},
        "recall_paths_ms": {k: _pcts(v) for k, v in path_ms.items()},
        "recall_path_candidates": {k: round(float(np.mean(v)), 1) for k, v in counts.items()},
    }
    if kernels:
        kern = {k: _pcts(v) for k, v in kern_ms.items()}
        floor = sum(v["p50"] for v in kern.values())
        result["kernels_ms"] = kern
        result["kernel_floor_ms"] = round(floor, 3)
        result["overhead_ratio"] = round(e2e["p50"] / floor, 3) if floor > 0 and e2e else None
        iso = {k: _pcts(v) for k, v in iso_ms.items()}
        iso_floor = sum(v["p50"] for v in iso.values())
        result["kernels_isolated_ms"] = iso
        result["kernel_floor_isolated_ms"] = round(iso_floor, 3)
        result["overhead_ratio_isolated"] = round(e2e["p50"] / iso_floor, 3) if iso_floor > 0 and e2e else None
    size = sum(p.stat().st_size for p in Path(bundle.path).iterdir() if p.is_file())
    result.update({
        "ann": {k: v for k, v in bundle.manifest.get("ann", {}).items() if k != "tried"},
        "bundle_load_s": round(load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "memory_mb": process_memory_mb(),
        "bundle_bytes": size,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    })
    return result
