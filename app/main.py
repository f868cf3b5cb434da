"""The app factory: `create_app(settings)`; the lifespan owns the store and the bundle."""
from __future__ import annotations

import asyncio
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (FieldError, field_error_handler, http_exception_handler, spool_full_handler, store_unavailable_handler,
                        validation_handler)
from app.guard import GuardMiddleware
from app.hot import HotRoute, HotRoutes
from app.metrics import Metrics
from app.resilience import StoreUnavailable
from app.routes import admin, bundles, feedback, health, recommend
from app.schemas import FeedbackRequest, RecommendRequest
from app.state import AppState
from core.settings import Settings
from core.spool import SpoolFull
from core.store import Store, open_store


def create_app(settings: Settings | None = None, *, store: Store | None = None, background_load: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1e3)  # per process: each worker sets its own
        st = store or open_store(settings)
        state = AppState(settings=settings, store=st, metrics=Metrics())
        app.state.funnel = state
        # Load off the event loop so /healthz answers (and /readyz says 503) while loading.
        task = asyncio.get_running_loop().run_in_executor(None, state.load_bundle)
        if not background_load:
            await task
        state.start_background()
        try:
            yield
        finally:
            await state.stop_background()
            if not task.done():
                await task
            state.spool.close()
            if store is None:
                st.close()

    app = FastAPI(title="Funnel", version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(FieldError, field_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(StoreUnavailable, store_unavailable_handler)
    app.add_exception_handler(SpoolFull, spool_full_handler)
    # Innermost of ours: valid recommend / feedback calls skip FastAPI's per-request machinery
    # (app/hot.py); CORS and the guard still wrap them.
    app.add_middleware(HotRoutes, routes=[HotRoute("/v1/recommend", RecommendRequest, recommend.hot, recommend.router),
                                          HotRoute("/v1/feedback", FeedbackRequest, feedback.hot, feedback.router)])
    if settings.cors_origins:  # CORS is off unless origins are configured
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "PUT"],
                           allow_headers=["authorization", "content-type"])
    # Outermost: refuse oversized bodies and shed load before anything else runs.
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, max_inflight=settings.max_inflight,
                       retry_after_s=settings.retry_after_s)
    app.include_router(health.router)
    app.include_router(recommend.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    app.include_router(bundles.router)
    return app
