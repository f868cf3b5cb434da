"""`funnel loadtest`'s per-run summary (loadtest/run.py one_run), with locust and the server's
CPU counters replaced: the figures it derives from what they report."""
import itertools

from loadtest import run


def test_one_run_reports_cpu_per_answered_feed(tmp_path, monkeypatch):
    cpu = itertools.chain([10.0, 22.5])  # server CPU seconds before and after the run
    monkeypatch.setattr(run, "_children", lambda pid: [])
    monkeypatch.setattr(run, "_cpu_seconds", lambda pids: next(cpu))
    # exit code, locust CPU seconds in all, its marks: 10 s of CPU before its test started, 60 s of load
    marks = {"start": {"wall": 1000.0, "cpu": 10.0}, "stop": {"wall": 1060.04, "cpu": 15.9}}
    monkeypatch.setattr(run, "run_locust", lambda *a, **k: (0, 16.0, marks))
    eps = {
        "recommend": {"requests": 5000, "failures": 0, "rps": 83.3, "p99_ms": 40.0},
        "recommend shed": {"requests": 20, "failures": 20, "rps": 0.3, "p99_ms": 1.0},
        "feedback": {"requests": 5000, "failures": 0, "rps": 83.3, "p99_ms": 9.0},
        "aggregated": {"requests": 10020, "failures": 20, "rps": 167.0},
    }
    monkeypatch.setattr(run, "read_stats", lambda prefix, duration: eps)
    r = run.one_run(0, 100, 50.0, 60.0, tmp_path, "locust", tmp_path, {}, server_pid=1)
    assert r["server_cpu_s"] == 12.5 and r["locust_cpu_s"] == 6.0 and r["locust_startup_cpu_s"] == 10.0 and r["load_s"] == 60.0
    # per answered recommend call (its feedback included; shed calls are not feeds); locust's
    # start-up (imports, building the world) is no load on the server's cores
    assert r["server_cpu_ms_per_feed"] == 2.5 and r["locust_cpu_ms_per_feed"] == 1.2
    assert r["errors"] == 20 and r["shed_503_retry_after"] == 20 and r["errors_not_shed"] == 0
    assert "recommend shed" in r["endpoints"] and "aggregated" not in r["endpoints"]


def test_one_run_without_answered_feeds_reports_no_cpu_per_feed(tmp_path, monkeypatch):
    cpu = itertools.chain([0.0, 1.0])
    monkeypatch.setattr(run, "_children", lambda pid: [])
    monkeypatch.setattr(run, "_cpu_seconds", lambda pids: next(cpu))
    monkeypatch.setattr(run, "run_locust", lambda *a, **k: (1, 0.5, {}))
    monkeypatch.setattr(run, "read_stats", lambda prefix, duration: {"aggregated": {"requests": 0, "failures": 0, "rps": 0.0}})
    r = run.one_run(0, 10, 50.0, 5.0, tmp_path, "locust", tmp_path, {}, server_pid=1)
    assert r["server_cpu_ms_per_feed"] is None and r["locust_cpu_ms_per_feed"] is None and r["error_rate"] is None
    assert r["load_s"] is None and r["locust_startup_cpu_s"] == 0.0  # locust never started its test
