"""The feature/task schema a bundle is built for and served with.

The schema travels in the bundle manifest; serving code reads field counts and task
names from it and checks them against the ONNX inputs at load time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # Negative tasks (dislike, ...) enter fusion with beta < 0.
    negative: bool = False
    # Label is only defined where this other task's label is 1 (e.g. like given click).
    given: str | None = None


@dataclass(frozen=True)
class FieldSpec:
    """A categorical field: codes are 0..vocab-1 and code 0 means unknown."""

    name: str
    vocab: int


@dataclass(frozen=True)
class Schema:
    dataset: str
    tasks: tuple[TaskSpec, ...]
    user_fields: tuple[FieldSpec, ...]
    item_fields: tuple[FieldSpec, ...]
    history_len: int = 50
    emb_dim: int = 32
    # Item fields that name an author / category, when the dataset has them.
    author_field: str | None = None
    category_field: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task_index(self, name: str) -> int:
        return self.task_names.index(name)

    def item_authors(self, item_fields: np.ndarray) -> np.ndarray | None:
        """int64 [I] author index of each item (-1: unknown; codes are author + 1), or None
        when the dataset has no author field."""
        names = [f.name for f in self.item_fields]
        if self.author_field not in names:
            return None
        return np.asarray(item_fields[:, names.index(self.author_field)], np.int64) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        return cls(
            dataset=d["dataset"],
            tasks=tuple(TaskSpec(**t) for t in d["tasks"]),
            user_fields=tuple(FieldSpec(**f) for f in d["user_fields"]),
            item_fields=tuple(FieldSpec(**f) for f in d["item_fields"]),
            history_len=int(d.get("history_len", 50)),
            emb_dim=int(d.get("emb_dim", 32)),
            author_field=d.get("author_field"),
            category_field=d.get("category_field"),
            extra=dict(d.get("extra", {})),
        )
