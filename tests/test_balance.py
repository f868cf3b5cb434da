"""Workers keep their open-connection counts even (app/balance.py): the accept rule on a shared
table, and real `funnel serve --workers 2` processes holding keep-alive connections."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil

from app.balance import WorkerSlot, create_table
from tests.serve_support import Server



class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_only_the_least_loaded_workers_accept(tmp_path):
    path, clock = create_table(tmp_path), Clock()
    a, b = WorkerSlot(path, clock=clock), WorkerSlot(path, clock=clock)
    assert a.index != b.index
    assert a.may_accept(0) and b.may_accept(0)  # ties: both may take the next one
    assert a.may_accept(1) is False  # b holds 0
    assert b.may_accept(0) and b.may_accept(1)  # b's 1 == a's 1
    assert b.may_accept(2) is False
    assert a.may_accept(1)


def test_a_worker_that_stops_beating_is_ignored_until_it_beats_again(tmp_path):
    path, clock = create_table(tmp_path), Clock()
    a, b = WorkerSlot(path, stale_s=1.0, clock=clock), WorkerSlot(path, stale_s=1.0, clock=clock)
    b.publish(0)
    assert a.may_accept(5) is False
    clock.t += 1.5  # b's heartbeat is now stale: a no longer waits for it
    assert a.may_accept(5)
    c = WorkerSlot(path, stale_s=1.0, clock=clock)  # a new worker takes a free row, not b's
    assert c.index not in (a.index, b.index)
    assert a.may_accept(5) is False  # and counts, with 0 connections
    c.release()
    assert a.may_accept(5)
    b.publish(0)  # b beats again: counted again
    assert a.may_accept(5) is False


def test_a_row_of_a_dead_process_is_reused(tmp_path):
    path = create_table(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = WorkerSlot(path)
    first.rows[first.index, 0] = dead.pid  # as if that process had held the row and died
    second = WorkerSlot(path)
    assert second.index == first.index
    assert np.count_nonzero(second.rows[:, 0]) == 1


def _get(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(v) for k, v in (ln.split(b":", 1) for ln in head.split(b"\r\n")[1:]) if k.strip().lower() == b"content-length")
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n", 1)[0]


def _connections_per_worker(server: psutil.Process, port: int) -> list[int]:
    return sorted(sum(1 for c in w.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)
                  for w in _workers(server))


def _workers(server: psutil.Process) -> list[psutil.Process]:
    # uvicorn's workers, not multiprocessing's resource tracker
    return [p for p in server.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def test_two_workers_split_keep_alive_connections_evenly(ml_bundle, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNNEL_")}
    env.update({"FUNNEL_BUNDLE": str(ml_bundle), "FUNNEL_DB_PATH": str(tmp_path / "state" / "funnel.db"), "FUNNEL_LOG_LEVEL": "warning"})
    srv = Server(env, workers=2, tmp_path=tmp_path, command="funnel")
    socks = []
    try:
        srv.wait_ready()
        deadline = time.time() + 120
        while len(_workers(psutil.Process(srv.proc.pid))) < 2:  # both workers up: each holds a row of the table only once it serves
            assert srv.proc.poll() is None, srv.log_tail()
            assert time.time() < deadline, "second worker not up"
            time.sleep(0.3)
        time.sleep(1.0)  # the probe connections above have closed in both workers' counts
        for _ in range(20):  # one client after another, each keeping its connection, as locust users do
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            assert _get(s, "/healthz").endswith(b"200 OK")
            socks.append(s)
        counts = _connections_per_worker(psutil.Process(srv.proc.pid), srv.port)
        assert len(counts) == 2 and sum(counts) == 20
        assert counts[1] - counts[0] <= 2, counts
        for s in socks:  # they keep working
            assert _get(s, "/healthz").endswith(b"200 OK")
    finally:
        for s in socks:
            s.close()
        srv.stop(signal.SIGINT)
    assert srv.proc.returncode == 0, srv.log_tail()
