"""OS-level names for the server's long-lived threads.

Python names its threads only for itself: `top -H`, `ps -L`, `/proc/<pid>/task/*/comm` and
perf all show every thread of a worker as "python". The load test's per-thread CPU report
(loadtest/run.py) and anyone looking at a loaded host need to tell the compute thread from
the event loop and the feedback writer, so each of those threads names itself when it starts.
"""
from __future__ import annotations

import threading

MAX_LEN = 15  # Linux keeps 15 bytes of a thread's name (TASK_COMM_LEN - 1)


def name_native_thread(name: str) -> bool:
    """Give the calling thread `name` (cut to 15 bytes) at the OS level. True when it was set
    (Linux); elsewhere, or when /proc is not writable, nothing happens."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name.encode()[:MAX_LEN].decode(errors="ignore"))
        return True
    except OSError:
        return False
