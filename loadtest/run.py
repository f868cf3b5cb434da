"""`funnel loadtest`: start the server with W workers on 127.0.0.1, run locust headless for
a bounded time against it, write locust's CSV stats and `summary.json`.

summary.json:
    {"workers", "users", "items", "bundle", "duration_s", "load_s" (how long locust sent load:
     from its test start to its stop), "think_s", "feedback_share",
     "endpoints": {"recommend": {"requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms",
                                 "mean_ms", "max_ms"}, "feedback": {...}},
     "rps", "recommend_rps", "error_rate", "errors", "server_memory_mb": {"rss", "pss", "uss",
     "processes", "per_process"}, "loadavg_before", "loadavg_after", "locust_cpu_s", "server_cpu_s",
     "server_cpu_ms_per_feed", "locust_cpu_ms_per_feed" (CPU seconds over answered recommend calls;
     locust's counts from its test start: "locust_startup_cpu_s", its imports and the world it
     builds, is left out),
     "server_thread_cpu_ms_per_feed" (the server's by thread role: funnel-compute, main = event
     loops, funnel-feedback, funnel-ckpt, supervisor, ...),
     "steps": [...] (step mode), "max_rps_p99_ok" (step mode),
     "host_wakeup_us": {"p50", "p90", "p99", "gap_ms", "n"} (see `host_wakeup_us`),
     "host_cpu_pct": {"busy", "iowait", "idle", "steal", "window_s"} (the whole host's CPU time while
     locust sent load, in % of all its CPUs; see `HostCpuSampler`)}

Step mode (`--step-users 20,40,80,...`): the server stays up; one locust run per user
count, each `--duration` seconds; stops at the first step whose recommend p99 exceeds
`--p99-ms` or that has errors; `max_rps_p99_ok` is the highest recommend rps of a step
that stayed within bounds.

Only 127.0.0.1 is ever targeted; every run is bounded by `--duration` (plus start-up).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        out = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    kids = [int(x) for x in out]
    return kids + [g for k in kids for g in _children(k)]


# The echo child of `host_wakeup_us`: one byte in, the same byte out, until stdin closes.
_ECHO = "import os\nwhile True:\n    b = os.read(0, 1)\n    if not b:\n        break\n    os.write(1, b)\n"


def host_wakeup_us(samples: int = 400, gap_s: float = 0.001) -> dict:
    """Round trips of one byte to a child process over pipes, each after `gap_s` of idleness:
    what it costs this host to wake a sleeping process. On a VM whose idle vCPUs halt (no polling
    cpuidle driver: the Firecracker guest these targets are measured on) a wake-up can wait
    milliseconds for the host to run the vCPU again, and a request's path has several (client →
    event loop → compute thread → event loop → client): it sets the latency tail at light load.
    Recorded with every load test so runs on different days compare."""
    import numpy as np

    child = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    rtt = []
    try:
        w, r = child.stdin.fileno(), child.stdout.fileno()
        for i in range(samples + 20):  # the first 20: the child starting up
            time.sleep(gap_s)
            t = time.perf_counter()
            os.write(w, b"x")
            if os.read(r, 1) != b"x":
                raise RuntimeError("wake-up probe: the echo child answered wrong")
            if i >= 20:
                rtt.append((time.perf_counter() - t) * 1e6)
    finally:
        child.stdin.close()  # the child's read sees EOF and it exits
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()
    p50, p90, p99 = np.percentile(rtt, [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1), "gap_ms": gap_s * 1e3, "n": len(rtt)}


def process_memory_mb(pid: int | str = "self") -> dict:
    """RSS, PSS (shared pages divided among the processes mapping them) and USS (private
    pages) of one process in MB, from /proc/<pid>/smaps_rollup (Linux); {} elsewhere."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return {}
    kb = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            kb[parts[0].rstrip(":")] = int(parts[1])
    uss = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    return {"rss": round(kb.get("Rss", 0) / 1024, 1), "pss": round(kb.get("Pss", 0) / 1024, 1), "uss": round(uss / 1024, 1)}


def tree_memory_mb(root: int) -> dict:
    """RSS / PSS / USS of a process and all its descendants (MB). PSS splits shared pages
    (the memory-mapped bundle, shared libraries) among the processes mapping them, so the
    PSS sum is the tree's real footprint; the RSS sum counts shared pages once per process."""
    per = {pid: m for pid in [root, *_children(root)] if (m := process_memory_mb(pid))}
    tot = {k: round(sum(m[k] for m in per.values()), 1) for k in ("rss", "pss", "uss")}
    return {**tot, "processes": len(per), "per_process": per}


def _stat_cpu_seconds(stat: Path) -> float | None:
    """User + system CPU seconds from a /proc `stat` file (a process's or one thread's); None
    when it is gone or unreadable."""
    try:
        f = stat.read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _cpu_seconds(pids: list[int]) -> float:
    return sum(c for pid in pids if (c := _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))) is not None)


def thread_cpu_seconds(root: int, pids: list[int]) -> dict[int, tuple[str, float]]:
    """{tid: (role, CPU seconds)} for every thread of `pids`. The role is the thread's OS name
    (the server names its compute, feedback and checkpoint threads: core/threads.py), "main"
    for a process's first thread (a worker's event loop), "supervisor" for `root`'s."""
    out = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            task = Path(f"/proc/{pid}/task/{tid}")
            try:
                comm = (task / "comm").read_text().strip()
            except OSError:
                continue
            sec = _stat_cpu_seconds(task / "stat")
            if sec is not None:
                out[tid] = ("supervisor" if tid == root else "main" if tid == pid else comm, sec)
    return out


def thread_cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per role between two `thread_cpu_seconds` snapshots (a thread born in between
    counts from zero; one that ended in between is lost)."""
    by: dict[str, float] = {}
    for tid, (role, sec) in after.items():
        by[role] = by.get(role, 0.0) + sec - before.get(tid, (role, 0.0))[1]
    return by


def wait_ready(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server not ready after {timeout:.0f} s")


def _bundle_items(bundle: Path) -> int | None:
    try:
        m = json.loads((Path(bundle) / "manifest.json").read_text())
        return int(m.get("source", {}).get("world", {}).get("n_items") or 0) or None
    except (OSError, ValueError):
        return None


def _items_from_npz(bundle: Path) -> int | None:
    import numpy as np

    try:
        with np.load(Path(bundle) / "items.npz", allow_pickle=False) as z:
            return int(len(z["item_ids"]))
    except (OSError, KeyError, ValueError):
        return None


def start_server(bundle: Path, workers: int, port: int, state_dir: Path, env_extra: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({
        "FUNNEL_BUNDLE": str(bundle), "FUNNEL_HOST": HOST, "FUNNEL_PORT": str(port), "FUNNEL_WORKERS": str(workers),
        "FUNNEL_DB_PATH": str(state_dir / "funnel.db"), "FUNNEL_LOG_LEVEL": "warning",
    })
    env.update(env_extra or {})
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def run_locust(port: int, users: int, spawn_rate: float, duration: float, csv_prefix: Path, bundle: Path, env_extra: dict) -> tuple[int, float, dict]:
    """One headless locust run (one process, FastHttpUser); returns (exit code, its CPU seconds,
    the locustfile's marks: {"start": {"wall", "cpu"}, "stop": {...}} when it began and ended
    sending load; before "start" it imported and, for a synthetic bundle, built the world, ~10 s
    of CPU that is no load on the server's cores)."""
    env = dict(os.environ)
    run_file = Path(str(csv_prefix) + "_locust_run.json")
    run_file.unlink(missing_ok=True)
    env.update({"FUNNEL_LT_BUNDLE": str(bundle), "FUNNEL_LT_RUN_FILE": str(run_file), **{k: str(v) for k, v in env_extra.items()}})
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(spawn_rate),
        "-t", f"{int(round(duration))}s", "--host", f"http://{HOST}:{port}", "--csv", str(csv_prefix),
        "--only-summary", "--stop-timeout", "5", "--loglevel", "WARNING",
        "--exit-code-on-error", "0",
    ]
    t0 = os.times()
    with open(str(csv_prefix) + "_locust.log", "wb") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=duration + 180)
    t1 = os.times()
    try:
        marks = json.loads(run_file.read_text())
    except (OSError, ValueError):  # locust failed before its test started
        marks = {}
    return proc.returncode, (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system), marks


def read_stats(csv_prefix: Path, duration: float) -> dict:
    """Per-endpoint figures from locust's `<prefix>_stats.csv`."""
    rows = list(csv.DictReader(open(f"{csv_prefix}_stats.csv")))
    eps = {}
    for r in rows:
        name = r["Name"]
        if r["Type"] == "" and name == "Aggregated":
            name = "aggregated"
        n, fails = int(r["Request Count"]), int(r["Failure Count"])

        def num(key):
            v = r.get(key, "N/A")
            return None if v in ("N/A", "", None) else float(v)

        eps[name] = {
            "requests": n, "failures": fails, "rps": round(num("Requests/s") or 0.0, 2),
            "p50_ms": num("50%"), "p95_ms": num("95%"), "p99_ms": num("99%"),
            "mean_ms": round(num("Average Response Time") or 0.0, 2), "max_ms": num("Max Response Time"),
        }
    return eps


def _failures(csv_prefix: Path, limit: int = 10) -> list[dict]:
    p = Path(f"{csv_prefix}_failures.csv")
    if not p.exists():
        return []
    return [{"name": r["Name"], "error": r["Error"][:300], "count": int(r["Occurrences"])} for r in list(csv.DictReader(open(p)))[:limit]]


def one_run(port: int, users: int, spawn_rate: float, duration: float, out: Path, prefix: str, bundle: Path, lt_env: dict, server_pid: int) -> dict:
    server_pids = [server_pid, *_children(server_pid)]
    cpu0 = _cpu_seconds(server_pids)
    threads0 = thread_cpu_seconds(server_pid, server_pids)
    load0 = os.getloadavg()
    t0 = time.time()
    with HostCpuSampler() as host:
        code, locust_cpu_all, marks = run_locust(port, users, spawn_rate, duration, out / prefix, bundle, lt_env)
    start, stop = marks.get("start"), marks.get("stop")
    locust_startup = min(locust_cpu_all, start["cpu"]) if start else 0.0
    locust_cpu = locust_cpu_all - locust_startup  # while it sent load (and shut down)
    # how long load was sent: the run time asked for, unless something cut it short
    load_s = round(stop["wall"] - start["wall"], 1) if start and stop else None
    wall = time.time() - t0
    server_cpu = _cpu_seconds(server_pids) - cpu0
    by_role = thread_cpu_by_role(threads0, thread_cpu_seconds(server_pid, server_pids))
    # rps as locust computes it, over the time it sent load (load_s)
    eps = read_stats(out / prefix, duration)
    rec, agg = eps.get("recommend", {}), eps.get("aggregated", {})
    total = agg.get("requests", 0)
    errors = agg.get("failures", 0)
    # `<endpoint> shed` rows: 503 + Retry-After (see locustfile._fail); everything else failing is a real error
    shed = sum(v["requests"] for k, v in eps.items() if k.endswith(" shed"))
    feeds = rec.get("requests", 0)  # answered recommend calls
    return {
        "users": users, "duration_s": duration, "load_s": load_s, "wall_s": round(wall, 1), "locust_exit": code,
        "endpoints": {k: v for k, v in eps.items() if k != "aggregated"},
        "rps": agg.get("rps"), "recommend_rps": rec.get("rps"), "recommend_p99_ms": rec.get("p99_ms"),
        "errors": errors, "error_rate": round(errors / total, 6) if total else None,
        "shed_503_retry_after": shed, "errors_not_shed": errors - shed, "failures": _failures(out / prefix),
        "locust_cpu_s": round(locust_cpu, 1), "locust_startup_cpu_s": round(locust_startup, 1), "server_cpu_s": round(server_cpu, 1),
        # CPU per answered feed (its feedback included): steadier than p99 on a shared machine,
        # so runs on different days or code compare by it
        "server_cpu_ms_per_feed": round(server_cpu * 1e3 / feeds, 3) if feeds else None,
        "locust_cpu_ms_per_feed": round(locust_cpu * 1e3 / feeds, 3) if feeds else None,
        # the same split by server thread role: where the cores go under this load
        "server_thread_cpu_ms_per_feed": {k: round(v * 1e3 / feeds, 3) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1]) if v > 0}
        if feeds else None,
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        # the host's CPU while load was sent (the whole run if locust never marked it)
        "host_cpu_pct": host.window(start["wall"], stop["wall"]) if start and stop else host.window(),
    }


_HOST_CPU_FIELDS = 8  # user nice system idle iowait irq softirq steal


def read_host_cpu(path: str = "/proc/stat") -> tuple[int, ...] | None:
    """The host's CPU time counters summed over its CPUs (clock ticks: user, nice, system, idle,
    iowait, irq, softirq, steal) from the first line of /proc/stat; None where there is none."""
    try:
        with open(path) as f:
            parts = f.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu":
        return None
    vals = [int(x) for x in parts[1:1 + _HOST_CPU_FIELDS]]
    return tuple(vals + [0] * (_HOST_CPU_FIELDS - len(vals)))


def host_cpu_shares(before: tuple[int, ...], after: tuple[int, ...]) -> dict:
    """Where all the host's CPU time went between two readings, in %: busy (user, nice, system,
    irq, softirq), iowait, idle, and steal: time a vCPU wanted to run while the hypervisor ran
    something else. {} when no time passed."""
    d = [b - a for a, b in zip(before, after)]
    total = sum(d)
    if total <= 0:
        return {}
    user, nice, system, idle, iowait, irq, softirq, steal = d

    def pct(x: int) -> float:
        return round(100.0 * x / total, 1)

    return {"busy": pct(user + nice + system + irq + softirq), "iowait": pct(iowait), "idle": pct(idle), "steal": pct(steal)}


class HostCpuSampler:
    """Reads the host's CPU counters every `interval_s` on a daemon thread while a run lasts, so
    their shares can be taken over the window locust sent load (its start and stop marks), not
    over its start-up. On a shared VM the same code and load land far apart from one run to the
    next; `steal` says how much of that was the hypervisor taking the vCPUs away, `busy` how
    close the run came to using every core."""

    def __init__(self, interval_s: float = 0.5, read=read_host_cpu, clock=time.time):
        self.interval_s, self._read, self._clock = interval_s, read, clock
        self.readings: list[tuple[float, tuple[int, ...]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        c = self._read()
        if c is not None:
            self.readings.append((self._clock(), c))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "HostCpuSampler":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="host-cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def window(self, start: float | None = None, stop: float | None = None) -> dict:
        """Shares between the last reading at or before `start` and the first at or after `stop`
        (the window is at most one interval wider on each side); the whole run without bounds."""
        r = self.readings
        if len(r) < 2:
            return {}
        # readings are in time order
        a = r[0] if start is None else ([x for x in r if x[0] <= start] or r[:1])[-1]
        b = r[-1] if stop is None else ([x for x in r if x[0] >= stop] or r[-1:])[0]
        shares = host_cpu_shares(a[1], b[1])
        return {**shares, "window_s": round(b[0] - a[0], 1)} if shares else {}


def run_loadtest(
    bundle: Path, out: Path, *, workers: int = 2, users: int = 100, spawn_rate: float = 50.0, duration: float = 60.0,
    think_min: float = 0.5, think_max: float = 1.5, feedback: float = 1.0, cold: float = 0.02, seed: int = 0,
    step_users: list[int] | None = None, p99_ms: float = 50.0, ready_timeout: float = 300.0, server_env: dict | None = None,
    redis: bool = False, warmup: float = 10.0, recovery_users: int = 0, recovery_duration: float = 30.0, show=print,
) -> dict:
    bundle, out = Path(bundle).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="funnel-lt-", dir=out))
    port = free_port()
    lt_env = {"FUNNEL_LT_THINK_MIN": think_min, "FUNNEL_LT_THINK_MAX": think_max, "FUNNEL_LT_FEEDBACK": feedback,
              "FUNNEL_LT_COLD": cold, "FUNNEL_LT_SEED": seed}
    wakeup = host_wakeup_us()  # before anything starts: the idle host's wake-up cost
    show(f"host wake-up round trip (1 ms idle gaps): p50 {wakeup['p50']} us, p99 {wakeup['p99']} us")
    env_extra = dict(server_env or {})
    redis_proc = None
    if redis:
        rport = free_port()
        redis_proc = subprocess.Popen(["redis-server", "--bind", HOST, "--port", str(rport), "--save", "", "--appendonly", "no",
                                       "--dir", str(state_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        env_extra["FUNNEL_REDIS_URL"] = f"redis://{HOST}:{rport}/0"
    t0 = time.time()
    proc = start_server(bundle, workers, port, state_dir, env_extra, out / "server.log")
    summary: dict = {
        "bundle": str(bundle), "items": _bundle_items(bundle) or _items_from_npz(bundle), "workers": workers,
        "think_s": [think_min, think_max], "feedback_share": feedback, "cold_share": cold, "host": f"{HOST}:{port}",
        "store": "redis" if redis else "sqlite", "warmup_s": warmup, "host_wakeup_us": wakeup,
    }
    try:
        wait_ready(port, ready_timeout, proc)
        summary["server_ready_s"] = round(time.time() - t0, 1)
        summary["server_memory_idle_mb"] = _mem_brief(tree_memory_mb(proc.pid))
        show(f"server ready ({workers} worker(s)) in {summary['server_ready_s']} s on {HOST}:{port}")
        if warmup > 0:  # untimed: first onnxruntime runs, page faults into the mapped bundle, connections
            # at the first step's load: warming up at the largest would start the steps on a backlog
            w = one_run(port, (step_users or [users])[0], spawn_rate, warmup, out, "warmup", bundle, lt_env, proc.pid)
            summary["warmup"] = {"duration_s": warmup, "users": w["users"], "recommend_rps": w["recommend_rps"], "errors": w["errors"]}
            show(f"warm-up {warmup:.0f} s: {w['recommend_rps']} recommend rps, errors {w['errors']}")
        if step_users:
            steps = []
            for u in step_users:
                r = one_run(port, u, spawn_rate, duration, out, f"step_{u:04d}", bundle, lt_env, proc.pid)
                ok = r["errors"] == 0 and r["recommend_p99_ms"] is not None and r["recommend_p99_ms"] <= p99_ms
                r["within_bounds"] = ok
                steps.append(r)
                show(f"step {u} users: recommend {r['recommend_rps']} rps, p99 {r['recommend_p99_ms']} ms, errors {r['errors']}")
                if not ok:
                    break
            good = [s for s in steps if s["within_bounds"]]
            summary.update(mode="step", p99_bound_ms=p99_ms, steps=steps,
                           max_rps_p99_ok=max((s["recommend_rps"] for s in good), default=None),
                           max_rps_users=max(good, key=lambda s: s["recommend_rps"])["users"] if good else None)
            last = max(good, key=lambda s: s["recommend_rps"]) if good else steps[-1]
            summary.update({k: last[k] for k in ("users", "endpoints", "rps", "recommend_rps", "errors", "error_rate")})
        else:
            r = one_run(port, users, spawn_rate, duration, out, "locust", bundle, lt_env, proc.pid)
            summary.update(mode="fixed", **r)
            if recovery_users:  # the same server right after: does it recover at once when load drops?
                rec = one_run(port, recovery_users, spawn_rate, recovery_duration, out, "recovery", bundle, lt_env, proc.pid)
                summary["recovery"] = rec
                show(f"recovery {recovery_users} users: recommend {rec['recommend_rps']} rps, p99 {rec['recommend_p99_ms']} ms, errors {rec['errors']}")
        summary["server_memory_mb"] = tree_memory_mb(proc.pid)
    finally:
        stop_server(proc)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(state_dir, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mem_brief(m: dict) -> dict:
    return {k: m[k] for k in ("rss", "pss", "uss", "processes")}
