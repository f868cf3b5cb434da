"""A real server in a subprocess for tests: `uvicorn app.asgi:app` or `funnel serve` (the
balanced workers of app/balance.py), started in its own session and stopped by signal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loadtest.run import free_port

REPO = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, env: dict, workers: int, tmp_path: Path, command: str = "uvicorn"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / f"{command}-{self.port}.log", "w")
        where = ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        argv = {
            "uvicorn": ["-m", "uvicorn", "app.asgi:app", *where, "--log-level", "warning"],
            "funnel": ["-m", "app.cli", "serve", *where],  # log level from FUNNEL_LOG_LEVEL
        }[command]
        self.proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        # fresh connection per request, so the kernel spreads them over the workers
        self.http = httpx.Client(base_url=self.url, timeout=30.0, limits=httpx.Limits(max_keepalive_connections=0))

    def log_tail(self) -> str:
        return Path(self.log.name).read_text()[-2000:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_tail()}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.http.close()
        self.log.close()
