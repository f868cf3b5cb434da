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
    """a[idx] for a 2-D array without numpy's 2-D fancy indexing, which walks every element.
    500 random rows (µs, this machine), fancy indexing vs this: 1M × 2 int64 96 vs 16; 1M × 32
    float32 95 vs 33; 800 rows of the 1M bundle's item embeddings 221 vs 76.
    Aligned arrays go through np.take(axis=0). Unaligned ones (members memory-mapped from inside
    an .npz start at any byte) through a view of each row as one opaque element: np.take would
    first copy the whole array to an aligned buffer (2.2 ms for the 1M bundle's item fields)."""
    if a.ndim != 2 or a.shape[1] == 0:
        return a[idx]
    if a.flags.aligned:
        return np.take(a, idx, axis=0)
    if not a.flags.c_contiguous:
        return a[idx]
    row = np.dtype((np.void, a.shape[1] * a.itemsize))
    return a.view(row).reshape(-1)[idx].view(a.dtype).reshape(len(idx), a.shape[1])
