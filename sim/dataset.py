"""One in-memory form for every dataset the builder trains on.

Events are rows of struct-of-arrays, sorted by (user, ts). A row is an impression with
its outcomes (synthetic world) or a rating (MovieLens, where every row is a positive and
the ranker samples unrated items as click = 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.schema import Schema


@dataclass
class Dataset:
    schema: Schema
    user_ids: np.ndarray  # str [U] external ids
    item_ids: np.ndarray  # str [I] external ids
    user_fields: np.ndarray  # int64 [U, Fu], 0 = unknown
    item_fields: np.ndarray  # int64 [I, Fi], 0 = unknown
    item_created: np.ndarray  # float64 [I] time the item entered the catalog
    ev_user: np.ndarray  # int64 [N]
    ev_item: np.ndarray  # int64 [N]
    ev_ts: np.ndarray  # float64 [N]
    labels: np.ndarray  # float32 [N, T] per schema.tasks; NaN where undefined
    positive: np.ndarray  # bool [N]: counts as an interaction (history, CF, graph, two-tower)
    test: np.ndarray  # bool [N]: held out by the per-user temporal split
    implicit_negatives: bool = False
    # user -> followed authors (CSR), where the dataset has authors
    follow_indptr: np.ndarray | None = None
    follow_authors: np.ndarray | None = None
    # optional dense item features (e.g. content vectors), float32 [I, D]
    item_dense: np.ndarray | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.test)

    def test_rows(self) -> np.ndarray:
        return np.flatnonzero(self.test)


def sort_events(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Order rows by (user, ts), stable."""
    return np.lexsort((ts, user))


def temporal_split(user: np.ndarray, ts: np.ndarray, test_frac: float = 0.2, min_train: int = 1) -> np.ndarray:
    """Per-user split by time: each user's last `test_frac` of events (rows sorted by
    (user, ts)) is held out, keeping at least `min_train` events in train."""
    if len(user) and np.any(np.diff(user) < 0):
        raise ValueError("rows must be sorted by (user, ts)")
    _, start, counts = np.unique(user, return_index=True, return_counts=True)
    n_test = np.floor(counts * test_frac).astype(np.int64)
    n_test = np.minimum(n_test, np.maximum(counts - min_train, 0))
    rank_in_user = np.arange(len(user)) - np.repeat(start, counts)
    first_test = np.repeat(counts - n_test, counts)
    return rank_in_user >= first_test


def recent_history(
    user: np.ndarray, item: np.ndarray, keep: np.ndarray, n_users: int, length: int, rows: np.ndarray | None = None
) -> np.ndarray:
    """For each row (or each of `rows`), the `length` most recent kept items of the same
    user strictly before that row (rows sorted by (user, ts)); most recent first, padded
    with -1.

    Vectorised: a per-user running index over kept rows, then a gather."""
    n = len(user)
    if n == 0:
        return np.full((0 if rows is None else len(rows), length), -1, np.int64)
    kept_pos = np.cumsum(keep) - keep  # number of kept rows strictly before each row (global)
    kept_items = item[keep]
    # global kept index of the first kept row of each user
    first_row = np.searchsorted(user, np.arange(n_users))
    user_kept_start = kept_pos[np.minimum(first_row, n - 1)]
    user_kept_start = np.where(first_row < n, user_kept_start, 0)
    rows = np.arange(n) if rows is None else np.asarray(rows, np.int64)
    start = user_kept_start[user[rows]]
    base = kept_pos[rows]
    out = np.full((len(rows), length), -1, np.int64)
    for j in range(length):  # loop over history slots, not rows
        pos = base - 1 - j
        ok = pos >= start
        out[ok, j] = kept_items[pos[ok]]
    return out
