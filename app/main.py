"""The app factory: `create_app(settings)`; the lifespan owns the store and the bundle."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from app.errors import FieldError, field_error_handler, validation_handler
from app.metrics import Metrics
from app.routes import admin, feedback, health, recommend
from app.state import AppState
from core.settings import Settings
from core.store import Store, open_store


def create_app(settings: Settings | None = None, *, store: Store | None = None, background_load: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = store or open_store(settings)
        state = AppState(settings=settings, store=st, metrics=Metrics())
        app.state.funnel = state
        # Load off the event loop so /healthz answers (and /readyz says 503) while loading.
        task = asyncio.get_running_loop().run_in_executor(None, state.load_bundle)
        if not background_load:
            await task
        state.start_poller()
        try:
            yield
        finally:
            await state.stop_poller()
            if not task.done():
                await task
            if store is None:
                st.close()

    app = FastAPI(title="Funnel", version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(FieldError, field_error_handler)
    app.include_router(health.router)
    app.include_router(recommend.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    return app
