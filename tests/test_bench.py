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
