"""Request ids (app/ids.py): random, unique across blocks, and not shared by a forked child."""
import os
import re

import pytest

from app.ids import RequestIds


def test_ids_are_128_bit_hex_and_unique_across_blocks():
    ids = RequestIds(block=64)
    got = [ids() for _ in range(64 * 50 + 7)]  # 50 refills and part of one more
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in got)
    assert len(set(got)) == len(got)
    # the bits are random, not a counter: every hex digit shows up in every position
    for pos in range(32):
        assert len({i[pos] for i in got}) == 16


def test_a_forked_child_does_not_reuse_the_parents_block():
    ids = RequestIds(block=1024)
    ids()  # the parent holds a block with 1023 ids left
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next id
        os.close(r)
        os.write(w, ids().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child != ids()  # the parent's next id, which the child would have taken without the reset


def test_block_must_be_positive():
    with pytest.raises(ValueError):
        RequestIds(block=0)
