"""FastAPI dependencies (overridable in tests)."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import FieldError
from app.pipeline import Pipeline
from app.state import AppState


async def get_state(request: Request) -> AppState:
    # async: a plain `def` dependency is run in the thread pool, a thread hop per request for a getattr
    return request.app.state.funnel


async def get_pipeline(state: Annotated[AppState, Depends(get_state)]) -> Pipeline:
    if state.pipeline is None:
        raise FieldError(("bundle",), f"no bundle loaded: {state.load_error or 'loading'}", status=503, type_="not_ready")
    return state.pipeline


StateDep = Annotated[AppState, Depends(get_state)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
