"""`funnel loadtest`'s per-run summary (loadtest/run.py one_run), with locust and the server's
CPU counters replaced: the figures it derives from what they report."""
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


_LOCUSTFILE_CHECK = r"""
import gc, json, os, time
import gevent
import loadtest.locustfile as lf

gevent.sleep(0.01)  # the loop has run, as locust's has when its init event fires


built = []


def slow_build(bundle):  # building the world blocks gevent's loop (time.sleep is gevent's here: it would not)
    built.append([[k] for k in range(1000)])  # lists: tracked by the collector until frozen
    t = time.perf_counter()
    while time.perf_counter() - t < 0.6:
        pass


lf.load_world = slow_build
lf._on_init(None)
lag = time.time() - gevent.get_hub().loop.now()
tracked = {id(o) for o in gc.get_objects()}
world_tracked = sum(id(o) in tracked for o in [built[0], *built[0]])
lf._on_test_start(None)
lf._on_test_stop(None)
print(json.dumps({"lag": lag, "world_tracked": world_tracked, "marks": json.loads(open(os.environ["FUNNEL_LT_RUN_FILE"]).read())}))
"""


def test_locustfile_init_keeps_run_time_and_marks_the_load(tmp_path):
    """In locust's process (gevent patches it, hence a subprocess): after the world is built the
    loop's clock is current, so locust's -t timer counts from there and not from before the build
    (a '60 s' run sent ~45 s of load), and the world is frozen out of the collector's reach; the
    test's start and stop are marked for `funnel loadtest`."""
    run_file = tmp_path / "run.json"
    env = {**os.environ, "FUNNEL_LT_RUN_FILE": str(run_file)}
    out = subprocess.run([sys.executable, "-c", _LOCUSTFILE_CHECK], env=env, cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["lag"] < 0.3  # without the refresh: the 0.6 s of the build
    assert got["world_tracked"] == 0  # frozen: no collection walks the world's objects
    marks = got["marks"]
    assert set(marks) == {"start", "stop"} and marks["start"]["wall"] <= marks["stop"]["wall"]
    assert marks["start"]["cpu"] > 0


def test_host_wakeup_probe_times_round_trips_to_a_child_that_exits():
    before = set(run._children(os.getpid()))
    w = run.host_wakeup_us(samples=50, gap_s=0.0005)
    assert w["n"] == 50 and w["gap_ms"] == 0.5
    assert 0 < w["p50"] <= w["p90"] <= w["p99"]
    assert set(run._children(os.getpid())) == before  # the echo child was reaped


def test_host_cpu_shares_split_the_hosts_cpu_time_and_count_steal():
    # user nice system idle iowait irq softirq steal, in clock ticks
    before = (100, 0, 20, 500, 0, 0, 0, 0)
    after = (160, 0, 40, 600, 10, 0, 0, 10)  # 200 ticks: 80 busy, 100 idle, 10 iowait, 10 stolen
    assert run.host_cpu_shares(before, after) == {"busy": 40.0, "iowait": 5.0, "idle": 50.0, "steal": 5.0}
    assert run.host_cpu_shares(after, after) == {}


def test_host_cpu_sampler_takes_the_load_window_not_the_whole_run():
    # a reading a second; the load (locust's marks) ran from t=2 to t=4: busy then, idle before and after
    ticks = {0: (0, 0, 0, 0, 0, 0, 0, 0), 1: (0, 0, 0, 200, 0, 0, 0, 0), 2: (0, 0, 0, 400, 0, 0, 0, 0),
             3: (150, 0, 30, 410, 0, 0, 0, 10), 4: (300, 0, 60, 420, 0, 0, 0, 20), 5: (300, 0, 60, 620, 0, 0, 0, 20)}
    t = iter(range(6))
    now = [0]

    def read():
        now[0] = next(t)
        return ticks[now[0]]

    s = run.HostCpuSampler(read=read, clock=lambda: float(now[0]))
    for _ in range(6):
        s.sample()
    assert s.window(2.0, 4.0) == {"busy": 90.0, "iowait": 0.0, "idle": 5.0, "steal": 5.0, "window_s": 2.0}
    whole = s.window()
    assert whole["window_s"] == 5.0 and whole["busy"] == 36.0 and whole["steal"] == 2.0
    # marks between readings: the window widens to the readings around them
    assert s.window(2.5, 3.5)["window_s"] == 2.0
    assert run.HostCpuSampler(read=lambda: None).window() == {}


def test_host_cpu_sampler_reads_this_hosts_counters_while_a_run_lasts():
    with run.HostCpuSampler(interval_s=0.01) as s:
        end = time.perf_counter() + 0.2  # long enough for the counters (clock ticks) to move
        while time.perf_counter() < end:
            pass
    if run.read_host_cpu() is None:  # no /proc/stat here
        assert s.window() == {}
        return
    assert len(s.readings) >= 2
    w = s.window()
    assert set(w) == {"busy", "iowait", "idle", "steal", "window_s"} and 0.0 <= w["busy"] <= 100.0


def test_one_run_reports_the_hosts_cpu_over_the_window_locust_sent_load(tmp_path, monkeypatch):
    windows = []

    class FakeSampler:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def window(self, start=None, stop=None):
            windows.append((start, stop))
            return {"busy": 80.0, "iowait": 0.0, "idle": 15.0, "steal": 5.0, "window_s": 60.0}

    monkeypatch.setattr(run, "HostCpuSampler", FakeSampler)
    monkeypatch.setattr(run, "_children", lambda pid: [])
    monkeypatch.setattr(run, "_cpu_seconds", lambda pids: 0.0)
    monkeypatch.setattr(run, "read_stats", lambda prefix, duration: {"aggregated": {"requests": 0, "failures": 0, "rps": 0.0}})
    marks = {"start": {"wall": 1000.0, "cpu": 1.0}, "stop": {"wall": 1060.0, "cpu": 2.0}}
    monkeypatch.setattr(run, "run_locust", lambda *a, **k: (0, 2.0, marks))
    r = run.one_run(0, 10, 50.0, 60.0, tmp_path, "locust", tmp_path, {}, server_pid=1)
    assert windows == [(1000.0, 1060.0)] and r["host_cpu_pct"]["steal"] == 5.0
    monkeypatch.setattr(run, "run_locust", lambda *a, **k: (1, 0.5, {}))  # locust never started its test: the whole run
    run.one_run(0, 10, 50.0, 60.0, tmp_path, "locust", tmp_path, {}, server_pid=1)
    assert windows[-1] == (None, None)
