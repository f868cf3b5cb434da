"""`funnel bench`: in-process latency of the pipeline, per stage, per recall path and end
to end (p50/p95/p99), single-threaded (one onnxruntime and one faiss thread), on sampled
known users of the bundle. Also peak RSS and the bundle's size on disk."""
from __future__ import annotations

import resource
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from app.pipeline import Pipeline
from core.bundle import Bundle
from core.settings import Settings


def _pcts(xs: list[float]) -> dict:
    a = np.asarray(xs, np.float64)
    if len(a) == 0:
        return {}
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3), "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3), "n": int(len(a))}


def bench(bundle_path: Path | str, requests: int = 2000, warmup: int = 100, seed: int = 0, settings: Settings | None = None) -> dict:
    import faiss

    settings = settings or Settings()
    faiss.omp_set_num_threads(settings.compute_threads)
    t0 = time.perf_counter()
    bundle = Bundle.load(bundle_path, threads=settings.compute_threads)
    load_s = time.perf_counter() - t0
    stage_ms: dict[str, list[float]] = defaultdict(list)
    pipe = Pipeline(bundle, settings)
    rng = np.random.default_rng(seed)
    # users with a build-time history (the warm path every stage runs on)
    has_hist = np.flatnonzero(np.diff(bundle.hist_indptr) > 0)
    users = rng.choice(has_hist, warmup + requests)
    end_to_end, path_ms, counts = [], defaultdict(list), defaultdict(list)
    for n, u in enumerate(users):
        t = time.perf_counter()
        ctx = pipe.context(request_id=f"b{n}", user_id=str(bundle.user_ids[u]), count=20, scene="home", exclude_item_ids=[], events=[], seed=n)
        t_ctx = time.perf_counter()
        timings = {}
        pipe.observe = lambda stage, sec: timings.__setitem__(stage, sec * 1e3)
        out, _ = pipe.run(ctx)
        total = (time.perf_counter() - t) * 1e3
        if n < warmup:
            continue
        end_to_end.append(total)
        stage_ms["context"].append((t_ctx - t) * 1e3)
        for k, v in timings.items():
            stage_ms[k].append(v)
        for name, rep in ctx.trace_extra.get("recall_paths", {}).items():
            if "ms" in rep:
                path_ms[name].append(rep["ms"])
                counts[name].append(rep["n"])
    size = sum(p.stat().st_size for p in Path(bundle.path).iterdir() if p.is_file())
    return {
        "bundle": bundle.version,
        "items": bundle.n_items,
        "users": bundle.n_users,
        "requests": len(end_to_end),
        "threads": settings.compute_threads,
        "end_to_end_ms": _pcts(end_to_end),
        "stages_ms": {k: _pcts(v) for k, v in stage_ms.items()},
        "recall_paths_ms": {k: _pcts(v) for k, v in path_ms.items()},
        "recall_path_candidates": {k: round(float(np.mean(v)), 1) for k, v in counts.items()},
        "ann": bundle.manifest.get("ann", {}),
        "bundle_load_s": round(load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "bundle_bytes": size,
    }
