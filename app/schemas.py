"""HTTP request/response models. Strict types: a wrong type is a 422 naming the field."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EventType = Literal["impression", "click", "dwell", "like", "share", "follow", "dislike"]

_Id = Field(min_length=1, max_length=256)


class RecommendRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    user_id: str = _Id
    count: int = Field(20, ge=1, le=200)
    scene: str = Field("home", min_length=1, max_length=64)
    exclude_item_ids: list[str] = Field(default_factory=list, max_length=1000)
    debug: bool = False


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    sources: list[str]


class StageTraceOut(BaseModel):
    stage: str
    n_in: int
    n_out: int
    ms: float
    sources: dict[str, int]


class Trace(BaseModel):
    stages: list[StageTraceOut]
    recall_paths: dict[str, dict]
    rerank: dict = {}  # reranker notes: mode, reach source, relaxed constraints per slot
    heads: dict[str, list[float]]  # task -> probability per returned item
    total_ms: float


class RecommendResponse(BaseModel):
    request_id: str
    bundle_version: str
    bucket: str
    items: list[RecommendedItem]
    trace: Trace | None = None


class FeedbackEventIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    item_id: str = _Id
    type: EventType
    value: float | None = Field(None, ge=-1e9, le=1e9)
    ts: float | None = Field(None, ge=0, le=1e11)

    @field_validator("value", "ts", mode="before")
    @classmethod
    def _finite(cls, v):
        # JSON ints are fine for float fields even in strict mode; NaN/inf are not.
        if isinstance(v, bool):
            raise ValueError("must be a number")
        if isinstance(v, int):
            return float(v)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    request_id: str = _Id
    user_id: str = _Id
    events: list[FeedbackEventIn] = Field(min_length=1, max_length=1000)


class FeedbackResponse(BaseModel):
    accepted: int
    duplicates: int
