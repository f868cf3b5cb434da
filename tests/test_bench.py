"""`funnel bench` reports what it promises (structure only: speed is measured, not asserted)."""
from app.bench import bench


def test_bench_reports_stages_and_paths(ml_bundle):
    r = bench(ml_bundle, requests=30, warmup=5)
    assert r["requests"] == 30 and r["threads"] == 1
    assert set(r["stages_ms"]) >= {"context", "user_tower", "recall", "prerank_a", "rank", "fusion", "rerank"}
    assert set(r["recall_paths_ms"]) == {"ann", "itemcf", "graph", "popular", "fresh"}
    for m in [r["end_to_end_ms"], *r["stages_ms"].values()]:
        assert m["p50"] <= m["p95"] <= m["p99"] and m["n"] == 30
    assert r["peak_rss_mb"] > 0 and r["bundle_bytes"] > 0


def test_bench_kernel_floors(ml_bundle):
    """Both kernel timings cover the same kernels; each floor is the sum of its medians and
    each ratio the end-to-end p50 over it."""
    r = bench(ml_bundle, requests=20, warmup=5)
    assert set(r["kernels_ms"]) == set(r["kernels_isolated_ms"]) >= {"user_tower", "ann_search", "itemcf_merge", "graph_walks", "rank", "beam_search"}
    for kern, floor, ratio in (("kernels_ms", "kernel_floor_ms", "overhead_ratio"),
                               ("kernels_isolated_ms", "kernel_floor_isolated_ms", "overhead_ratio_isolated")):
        assert all(v["n"] == 20 for v in r[kern].values())
        assert abs(r[floor] - sum(v["p50"] for v in r[kern].values())) < 1e-2
        assert abs(r[ratio] - r["end_to_end_ms"]["p50"] / r[floor]) < 1e-2


def test_bench_recent_events_lengthen_the_histories(ml_bundle):
    """--recent-events: every request carries real-time events whose clicks join its history."""
    base = bench(ml_bundle, requests=10, warmup=2, kernels=False)
    r = bench(ml_bundle, requests=10, warmup=2, kernels=False, recent_events=40)
    assert base["recent_events"] == 0 and r["recent_events"] == 40
    assert r["history_items_mean"] > base["history_items_mean"]
