"""What the app's lifespan owns: settings, store, metrics, and the loaded pipeline."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from app.metrics import Metrics
from app.pipeline import Pipeline
from core.bundle import Bundle, BundleError
from core.settings import Settings
from core.store import Store

log = logging.getLogger("funnel")


@dataclass
class AppState:
    settings: Settings
    store: Store
    metrics: Metrics
    pipeline: Pipeline | None = None
    load_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load_bundle(self) -> None:
        """Load and validate the configured bundle; on failure keep the error for /readyz."""
        s = self.settings
        try:
            _set_faiss_threads(s.compute_threads)
            bundle = Bundle.load(s.bundle, threads=s.compute_threads)
        except BundleError as e:
            self.load_error = str(e)
            log.error("bundle not loaded: %s", e)
            return
        self.install(bundle)

    def install(self, bundle: Bundle) -> None:
        pipeline = Pipeline(
            bundle,
            self.settings,
            observe=lambda stage, sec: self.metrics.stage_seconds.labels(stage).observe(sec),
            on_error=lambda source, exc: self.metrics.recall_errors.labels(source).inc(),
        )
        with self._lock:
            self.pipeline = pipeline
            self.load_error = None
        self.metrics.bundle_info.labels(bundle.version, bundle.schema.dataset).set(1)
        self.metrics.ready.set(1)
        log.info("serving bundle %s (%s, %d items)", bundle.version, bundle.schema.dataset, bundle.n_items)


def _set_faiss_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(n)
