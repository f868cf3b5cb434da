"""What the app's lifespan owns: settings, store, metrics, the loaded pipeline, and the
fusion service (parameters, buckets, tuner) with its round-closing poller."""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app.metrics import Metrics
from app.pipeline import Pipeline
from core.bundle import Bundle, BundleError
from core.settings import Settings
from core.store import Store
from fusion.formula import FusionBounds
from fusion.service import FusionService
from fusion.tuner import TunerConfig

log = logging.getLogger("funnel")


@dataclass
class AppState:
    settings: Settings
    store: Store
    metrics: Metrics
    pipeline: Pipeline | None = None
    load_error: str | None = None
    fusion: FusionService | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _poller: asyncio.Task | None = None
    # The one thread per worker that runs pipelines (numpy, faiss and onnxruntime release the
    # GIL there, so the event loop keeps parsing and answering other requests meanwhile).
    compute: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        if self.compute is None:
            # OpenMP's thread count is per calling thread: set faiss's in the compute thread itself.
            self.compute = ThreadPoolExecutor(1, thread_name_prefix="funnel-compute", initializer=_set_faiss_threads,
                                              initargs=(self.settings.compute_threads,))
        if self.fusion is None:
            s = self.settings
            self.fusion = FusionService(
                self.store,
                FusionBounds(s.fusion_alpha_min, s.fusion_alpha_max, s.fusion_beta_min, s.fusion_beta_max),
                scene=s.tuner_scene,
                initial_config=TunerConfig.model_validate(s.tuner),
                cache_seconds=s.fusion_cache_seconds,
            )
        self.metrics.tuner.fusion = self.fusion

    def load_bundle(self) -> None:
        """Load and validate the configured bundle; on failure keep the error for /readyz."""
        s = self.settings
        try:
            _set_faiss_threads(s.compute_threads)
            bundle = Bundle.load(s.bundle, threads=s.compute_threads, model_cache_dir=s.model_cache())
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
            on_error=self._recall_error,
        )
        self.fusion.bind(bundle.schema, pipeline.fusion_params)
        with self._lock:
            self.pipeline = pipeline
            self.load_error = None
        self.metrics.set_bundle(bundle.version, bundle.schema.dataset, bundle.n_items)
        self.metrics.ready.set(1)
        log.info("serving bundle %s (%s, %d items)", bundle.version, bundle.schema.dataset, bundle.n_items)

    def _recall_error(self, source: str, exc: Exception) -> None:
        self.metrics.recall_errors.labels(source).inc()
        self.metrics.errors.labels(f"recall_{source}").inc()

    # --- the tuner's round-closing poller: every worker checks; the store's lock lets one close

    def start_poller(self) -> None:
        interval = self.settings.tuner_poll_seconds
        if interval > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(interval))

    async def stop_poller(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None

    async def _poll(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                entry = await loop.run_in_executor(None, self.fusion.maybe_close)
                if entry is not None:
                    log.info("tuner: closed round %s (%s, %s)", entry["round"], entry["reason"], entry["update"])
            except Exception:  # a store hiccup must not kill the poller
                log.exception("tuner: round close check failed")


def _set_faiss_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(n)
