"""HTTP request/response models. Strict types: a wrong type is a 422 naming the field."""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EventType = Literal["impression", "click", "dwell", "like", "share", "follow", "dislike"]

# Ids: 1-256 characters, no control characters (they would end up in log lines and store keys).
_ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
_Id = Field(min_length=1, max_length=256, pattern=_ID_PATTERN)


class RecommendRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    user_id: str = _Id
    count: int = Field(20, ge=1, le=200)
    scene: str = Field("home", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    exclude_item_ids: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=1000)
    debug: bool = False

    @field_validator("count", mode="before")
    @classmethod
    def _integral(cls, v):
        # JSON Schema counts 20.0 as an integer; strings and booleans stay refused.
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v


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
    degraded: str | None = None  # error | late | budget


class Degradation(BaseModel):
    """A stage that fell back instead of failing the request (app/pipeline.py, app/resilience.py)."""

    stage: str  # user_tower, recall.<path>, prerank_a, rank, fusion, rerank, history, fusion_params, served_log
    reason: str  # error | late | budget | store_unavailable
    detail: str | None = None


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
    degraded: list[Degradation] = []  # empty when every stage ran in time
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
    spooled: bool | None = None  # true (else absent): the store was down; the events wait, durable, in the local spool


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every error: `message` names the field (or the header, the body, the store) it is about."""

    detail: list[ErrorDetail]
    message: str


def _err(desc: str) -> dict:
    return {"model": ErrorResponse, "description": desc}


ERROR_RESPONSES: dict = {
    400: _err("Malformed JSON or header"),
    413: _err("Request body too large (FUNNEL_MAX_BODY_BYTES)"),
    422: _err("Invalid field; `message` names it"),
    503: _err("Not ready (no bundle), overloaded (FUNNEL_MAX_INFLIGHT; Retry-After), or store down with a full spool (Retry-After)"),
}
ADMIN_RESPONSES: dict = {
    **ERROR_RESPONSES,
    401: _err("Missing or wrong bearer token"),
    403: _err("Admin API disabled (no FUNNEL_ADMIN_TOKEN)"),
}
