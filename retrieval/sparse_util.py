"""Small vectorised helpers over CSR arrays."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def topk_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the k largest entries of every row (vectorised: one lexsort, no row loop)."""
    m = m.tocsr()
    m.eliminate_zeros()
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((-m.data, rows))
    rank = np.arange(len(order)) - m.indptr[rows[order]]
    keep = order[rank < k]
    keep.sort()  # back to row-major order; within a row, re-sort by score below
    r, c, d = rows[keep], m.indices[keep], m.data[keep]
    o = np.lexsort((-d, r))
    out = sp.csr_matrix((d[o], (r[o], c[o])), shape=m.shape)
    # csr_matrix from COO sorts columns within rows; rebuild to keep score order
    counts = np.bincount(r, minlength=m.shape[0])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return sp.csr_matrix((d[o], c[o], indptr), shape=m.shape) if len(o) else out


def gather_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CSR rows `rows`: returns (positions into `indices`, owning row position)."""
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(rows)), lens)
    offsets = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
    return starts[owner] + offsets, owner
