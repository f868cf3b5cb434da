"""Request ids: 128 random bits as 32 hex digits (the shape uuid4().hex had), read from the OS's
CSPRNG a block at a time.

Why not uuid4 per request: os.urandom releases the GIL around its getrandom call, and a
release on a worker's event loop lets the compute thread take the GIL for up to the switch
interval (5 ms) before the loop gets it back. py-spy on a loaded worker (1M bundle, 215 users)
put 3.5% of the event loop's samples in uuid4, nearly all of it waiting to retake the GIL.
Here one read serves `block` ids.
"""
from __future__ import annotations

import os
import threading


class RequestIds:
    def __init__(self, block: int = 1024):
        if block < 1:
            raise ValueError("block must be >= 1")
        self._block = block
        self._lock = threading.Lock()
        self._reset()
        # A forked child must not hand out the ids left in its parent's block.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._buf = b""
        self._pos = 0

    def __call__(self) -> str:
        with self._lock:
            if self._pos >= len(self._buf):
                self._buf = os.urandom(16 * self._block)
                self._pos = 0
            raw = self._buf[self._pos:self._pos + 16]
            self._pos += 16
        return raw.hex()


new_request_id = RequestIds()
