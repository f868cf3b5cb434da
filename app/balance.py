"""Even open-connection counts across uvicorn's worker processes (`funnel serve --workers N`).

Why: the workers share one listening socket and whichever wakes first accepts. Clients that
keep their connections (locust, a proxy's keep-alive pool) then stay split as the accepts fell:
~120 / 95 of 215 locust users in 7 of 8 load tests on the 1M bundle, so one worker carried
~56% of the load and its compute queue set the latency tail. Per-worker SO_REUSEPORT sockets
only hash connections (measured splits 118 / 97 and 102 / 113). Like Envoy's exact connection
balance or nginx's accept mutex, a worker here accepts only while no live worker holds fewer
open connections than it does.

How: a small table in a shared file (one row per worker: pid, open connections, heartbeat),
memory-mapped by every worker. A worker replaces uvicorn's `create_server` with its own accept
loop on the shared socket: before each accept it publishes its own count and compares it with
the other live rows; a worker above the minimum waits (re-checking every `poll_s`) while a
less loaded one takes the connection. A row whose heartbeat is older than `stale_s` (a dead or
stuck worker) is ignored, so the others never wait on it; a restarted worker takes a free row or a dead one's.
Whatever the counts, the least loaded worker always accepts, so a connection never waits for
more than a few milliseconds in the backlog.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess

log = logging.getLogger("funnel.balance")

TABLE_ENV = "FUNNEL_WORKER_TABLE"  # the table's path, from the supervisor to its workers
SLOTS = 64
_COLS = 3  # pid, open connections, heartbeat (CLOCK_MONOTONIC seconds: one clock for all processes)


def create_table(directory: str | os.PathLike | None = None) -> Path:
    """A zeroed table file (the supervisor makes it before it starts the workers)."""
    fd, path = tempfile.mkstemp(prefix="funnel-workers-", suffix=".bin", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(bytes(SLOTS * _COLS * 8))
    return Path(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkerSlot:
    """This worker's row of the table, and the accept rule."""

    def __init__(self, path: str | os.PathLike, stale_s: float = 1.0, clock=time.monotonic):
        self.path, self.stale_s, self.clock = Path(path), float(stale_s), clock
        self._file = open(self.path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), SLOTS * _COLS * 8)
        self.rows = np.ndarray((SLOTS, _COLS), np.float64, buffer=self._map)
        self.index = self._claim()

    def _claim(self) -> int:
        # Under an exclusive lock: two workers starting together never take the same row.
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        try:
            now = self.clock()
            # A free row or one of a dead process; else one whose worker has stopped beating
            # (alive but stuck: the others ignore it already).
            free = [i for i in range(SLOTS) if self.rows[i, 0] == 0 or not _alive(int(self.rows[i, 0]))]
            stale = [i for i in range(SLOTS) if now - self.rows[i, 2] > self.stale_s]
            if not free and not stale:
                raise RuntimeError(f"no free row in the worker table {self.path} ({SLOTS} rows)")
            i = (free or stale)[0]
            self.rows[i] = (os.getpid(), 0.0, now)
            return i
        finally:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)

    def publish(self, connections: int) -> None:
        # Two aligned 8-byte stores; a reader may see the count before the beat, which is harmless.
        row = self.rows[self.index]
        row[1] = connections
        row[2] = self.clock()

    def others(self) -> np.ndarray:
        """Open-connection counts of the other live workers."""
        live = (self.rows[:, 0] != 0) & (self.clock() - self.rows[:, 2] <= self.stale_s)
        live[self.index] = False
        return self.rows[live, 1]

    def may_accept(self, connections: int) -> bool:
        """Publishes this worker's count; True unless another live worker holds fewer connections."""
        self.publish(connections)
        others = self.others()
        return bool(others.size == 0 or connections <= others.min())

    def release(self) -> None:
        self.rows[self.index] = 0.0

    def close(self) -> None:
        del self.rows
        self._map.close()
        self._file.close()


class BalancedServer(uvicorn.Server):
    """uvicorn's Server with the balanced accept loop when it serves sockets its supervisor bound."""

    poll_s = 0.02  # a worker above the minimum re-checks this often (the others accept meanwhile)
    heartbeat_s = 0.1

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        path = os.environ.get(TABLE_ENV)
        if not sockets or not path:
            return await super().startup(sockets)
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config

        def create_protocol(_loop=None):  # as uvicorn's own startup builds it
            return config.http_protocol_class(config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=_loop)

        self.servers = []
        self._slot = WorkerSlot(path)
        self._starting = 0
        loop = asyncio.get_running_loop()
        self._balance_tasks = [loop.create_task(self._accept(sock, create_protocol)) for sock in sockets]
        self._balance_tasks.append(loop.create_task(self._heartbeat()))
        self.started = True

    def _open(self) -> int:
        return len(self.server_state.connections) + self._starting

    async def _heartbeat(self) -> None:
        while True:
            self._slot.publish(self._open())
            await asyncio.sleep(self.heartbeat_s)

    async def _accept(self, sock: socket.socket, create_protocol) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        sock.listen(self.config.backlog)  # the supervisor only binds it; create_server would listen here
        while True:
            while not self._slot.may_accept(self._open()):
                await asyncio.sleep(self.poll_s)
            try:
                conn, _ = await loop.sock_accept(sock)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:  # out of file descriptors, aborted handshake: back off as asyncio's server does
                log.warning("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._starting += 1
            loop.create_task(self._start(loop, conn, create_protocol))

    async def _start(self, loop, conn: socket.socket, create_protocol) -> None:
        # A task of its own: a TLS handshake must not hold up the accept loop.
        try:
            await loop.connect_accepted_socket(create_protocol, conn, ssl=self.config.ssl)
        except OSError:
            conn.close()
        finally:
            self._starting -= 1

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for t in getattr(self, "_balance_tasks", []):
            t.cancel()
        slot = getattr(self, "_slot", None)
        if slot is not None:
            slot.release()
            slot.close()
        await super().shutdown(sockets)


class BalancedProcess(multiprocess.Process):
    """uvicorn's worker process, serving with BalancedServer (module level: workers unpickle it by name)."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = BalancedServer(config=self.config)
        return self._server


def run_workers(config) -> None:
    """Runs `config.workers` balanced workers under uvicorn's supervisor (restarts, signals).
    A uvicorn whose supervisor no longer builds workers this way runs them unbalanced."""
    if not isinstance(getattr(_UvicornProcess, "server", None), property):
        log.warning("uvicorn %s: workers not balanced (its supervisor changed shape)", uvicorn.__version__)
        return multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()
    table = create_table()
    os.environ[TABLE_ENV] = str(table)
    # uvicorn's supervisor builds its worker processes from this module global.
    multiprocess.Process = BalancedProcess
    try:
        sock = config.bind_socket()
        multiprocess.Multiprocess(config, sockets=[sock]).run()
    finally:
        multiprocess.Process = _UvicornProcess
        os.environ.pop(TABLE_ENV, None)
        table.unlink(missing_ok=True)


_UvicornProcess = multiprocess.Process
