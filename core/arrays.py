"""Small array helpers shared by serving stages."""
from __future__ import annotations

import numpy as np


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values ∈ sorted_set, elementwise; `sorted_set` sorted ascending (may be empty). A binary
    search: np.isin sorts both sides again, or loops over a short set one comparison each."""
    if len(sorted_set) == 0:
        return np.zeros(np.shape(values), bool)
    pos = np.searchsorted(sorted_set, values)
    pos[pos == len(sorted_set)] = 0
    return sorted_set[pos] == values


def take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[idx] for a 2-D array, rows gathered as one opaque element each: numpy's 2-D fancy
    indexing walks every element (500 random rows of a 1M × 2 int64 table: ~54 µs vs ~18 µs)."""
    if a.ndim != 2 or a.shape[1] == 0 or not a.flags.c_contiguous:
        return a[idx]
    row = np.dtype((np.void, a.shape[1] * a.itemsize))
    return a.view(row).reshape(-1)[idx].view(a.dtype).reshape(len(idx), a.shape[1])
