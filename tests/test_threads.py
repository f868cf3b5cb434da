"""OS-level thread names (core/threads.py) and the load test's CPU split by thread role
(loadtest/run.py), on this process's real threads."""
import os
import threading
from pathlib import Path

import pytest

from core.threads import name_native_thread
from loadtest.run import thread_cpu_by_role, thread_cpu_seconds

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux /proc only")


def _comm(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def test_a_thread_names_itself_at_the_os_level_cut_to_15_bytes():
    got = {}

    def run():
        got["set"] = name_native_thread("funnel-a-very-long-name")
        got["comm"] = _comm(threading.get_native_id())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert got == {"set": True, "comm": "funnel-a-very-l"}


def test_cpu_is_split_by_thread_role_and_a_busy_named_thread_gets_its_share():
    ready, go, done, leave = (threading.Event() for _ in range(4))

    def burn():
        name_native_thread("funnel-burn")
        ready.set()
        go.wait()
        x = 0
        for i in range(3_000_000):  # a fixed amount of work, ~0.2-0.5 s of CPU
            x += i * i
        done.set()
        leave.wait()  # still alive at the second snapshot: a thread that has ended is not counted

    t = threading.Thread(target=burn)
    t.start()
    ready.wait()
    pid = os.getpid()
    before = thread_cpu_seconds(-1, [pid])
    go.set()
    done.wait()
    by_role = thread_cpu_by_role(before, thread_cpu_seconds(-1, [pid]))
    leave.set()
    t.join()
    assert "main" in by_role  # this process's first thread
    assert by_role["funnel-burn"] > 0
    # the main thread only waited meanwhile: the named thread did the work
    assert by_role["funnel-burn"] > by_role["main"]


def _own_comm() -> str:
    return _comm(threading.get_native_id())


def test_a_served_worker_names_its_compute_feedback_and_checkpoint_threads(client):
    r = client.post("/v1/recommend", json={"user_id": "1", "count": 5})
    assert r.status_code == 200
    items = [it["item_id"] for it in r.json()["items"]]
    fb = client.post("/v1/feedback", json={"request_id": r.json()["request_id"], "user_id": "1",
                                           "events": [{"item_id": items[0], "type": "click"}]})
    assert fb.status_code == 202
    # asked of this app's own threads (other tests' apps may have left named threads behind)
    state = client.app.state.funnel
    assert state.compute.submit(_own_comm).result() == "funnel-compute"
    assert state.feedback_io.submit(_own_comm).result() == "funnel-feedback"
    checkpointer = state.store.inner._checkpointer
    assert _comm(checkpointer.native_id) == "funnel-ckpt"
