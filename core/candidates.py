"""`Candidates`: the struct of numpy arrays that flows between stages."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Source bits: one per recall path. A merged candidate ORs the bits of every path that found it.
SOURCE_BITS: dict[str, int] = {"ann": 1, "itemcf": 2, "graph": 4, "popular": 8, "fresh": 16, "follow": 32}


def source_names(mask: int) -> list[str]:
    return [name for name, bit in SOURCE_BITS.items() if mask & bit]


@dataclass(frozen=True)
class Candidates:
    """Frozen struct of arrays, all of length n.

    item:    int64 item index into the bundle's catalog
    source:  uint32 bitmask of recall paths (SOURCE_BITS)
    score:   float32 score of the stage that produced this set (meaning varies by stage)
    heads:   optional float32 [n, n_tasks] ranker probabilities
    """

    item: np.ndarray
    source: np.ndarray
    score: np.ndarray
    heads: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.item)
        if self.item.dtype != np.int64 or self.source.dtype != np.uint32 or self.score.dtype != np.float32:
            raise TypeError(
                f"Candidates dtypes must be int64/uint32/float32, got {self.item.dtype}/{self.source.dtype}/{self.score.dtype}"
            )
        if len(self.source) != n or len(self.score) != n or (self.heads is not None and len(self.heads) != n):
            raise ValueError("Candidates arrays must share one length")

    @classmethod
    def empty(cls, n_tasks: int | None = None) -> "Candidates":
        heads = None if n_tasks is None else np.zeros((0, n_tasks), np.float32)
        return cls(np.zeros(0, np.int64), np.zeros(0, np.uint32), np.zeros(0, np.float32), heads)

    @classmethod
    def from_source(cls, item: np.ndarray, score: np.ndarray, source: str) -> "Candidates":
        item = np.asarray(item, np.int64)
        return cls(item, np.full(len(item), SOURCE_BITS[source], np.uint32), np.asarray(score, np.float32))

    def __len__(self) -> int:
        return len(self.item)

    def take(self, idx: np.ndarray) -> "Candidates":
        return Candidates(
            self.item[idx],
            self.source[idx],
            self.score[idx],
            None if self.heads is None else self.heads[idx],
        )

    def top(self, k: int) -> "Candidates":
        """The k best by score, in descending score order (stable for ties)."""
        s = self.score
        if len(s) < 2 or bool((s[:-1] >= s[1:]).all()):
            # Already in order (recall paths hand over their own top-k): a prefix, no sort.
            return self if k >= len(s) else self.take(slice(0, max(k, 0)))
        if k >= len(self):
            order = np.argsort(-self.score, kind="stable")
        else:
            part = np.argpartition(-self.score, k - 1)[:k]
            order = part[np.argsort(-self.score[part], kind="stable")]
        return self.take(order)

    def with_scores(self, score: np.ndarray, heads: np.ndarray | None = None) -> "Candidates":
        return replace(self, score=np.asarray(score, np.float32), heads=self.heads if heads is None else heads)

    def source_counts(self) -> dict[str, int]:
        return {name: int(np.count_nonzero(self.source & bit)) for name, bit in SOURCE_BITS.items()}
