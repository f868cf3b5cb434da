"""What the app's lifespan owns: settings, store (behind a circuit breaker), the local
feedback spool, metrics, the loaded pipeline, and the fusion service (parameters, buckets,
tuner) with its round-closing poller; the spool drainer; with Redis, this worker's consumer
of the feedback stream; and bundle reloads (validate fully, warm up, then swap)."""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import time
import uuid
from pathlib import Path

from app.metrics import Metrics
from app.pipeline import Pipeline
from app.resilience import GuardedStore, RecentServed, drain_spool
from core.bundle import Bundle, BundleError
from core.settings import Settings
from core.spool import Spool
from core.store import Store
from core.threads import name_native_thread
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
    _drainer: asyncio.Task | None = None
    _consumer: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    spool: Spool | None = None
    recent_served: RecentServed = field(default_factory=RecentServed)
    loaded_at: float | None = None
    reload_lock: threading.Lock = field(default_factory=threading.Lock)
    # The one thread per worker that runs pipelines (numpy, faiss and onnxruntime release the
    # GIL there, so the event loop keeps parsing and answering other requests meanwhile).
    compute: ThreadPoolExecutor | None = None
    # Feedback writes (store round trip or SQLite commit with fsync). SQLite serialises them on one
    # write lock: more threads only wait on it, wake up and take turns at the GIL.
    feedback_io: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.store, GuardedStore):
            self.store = GuardedStore(self.store, self.settings.store_retry_seconds, on_change=lambda up: self.metrics.store_up.set(int(up)))
        if self.spool is None:
            self.spool = Spool(self.settings.spool(), self.settings.spool_max_events)
        self.metrics.spool_events.set(self.spool.pending)
        if self.compute is None:
            # OpenMP's thread count is per calling thread: set faiss's in the compute thread itself.
            self.compute = ThreadPoolExecutor(1, thread_name_prefix="funnel-compute", initializer=_init_compute_thread,
                                              initargs=(self.settings.compute_threads,))
        if self.feedback_io is None and self.settings.feedback_threads > 0:
            self.feedback_io = ThreadPoolExecutor(self.settings.feedback_threads, thread_name_prefix="funnel-feedback",
                                                  initializer=name_native_thread, initargs=("funnel-feedback",))
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
        try:
            self.install(self.prepare(self.settings.bundle))
        except BundleError as e:
            self.load_error = str(e)
            log.error("bundle not loaded: %s", e)

    def prepare(self, path: Path | str) -> Pipeline:
        """A pipeline over the bundle at `path`, fully validated (Bundle.load: manifest,
        files, checksums, shapes, ONNX signatures, faiss index) and warmed up: one cold and
        one known user run through every stage, and a stage that raises there refuses the
        bundle. Raises BundleError with the reason. Nothing served changes here."""
        s = self.settings
        _set_faiss_threads(s.compute_threads)
        bundle = Bundle.load(path, threads=s.compute_threads, model_cache_dir=s.model_cache())
        pipeline = Pipeline(
            bundle,
            s,
            observe=lambda stage, sec: self.metrics.stage_seconds.labels(stage).observe(sec),
            on_error=self._recall_error,
            on_stage_error=self._stage_error,
        )
        users = ["__warmup__"] + ([str(bundle.user_ids[0])] if bundle.n_users else [])
        for user in users:
            ctx = pipeline.context(request_id="warmup", user_id=user, count=10, scene="home", exclude_item_ids=[], events=[], seed=0)
            ctx.debug = True
            try:
                out, _ = pipeline.run(ctx)
                pipeline.describe(out)
            except Exception as e:
                raise BundleError(f"{path}: warm-up request failed ({type(e).__name__}: {e})") from e
            errors = [d for d in ctx.degraded if d["reason"] == "error"]
            if errors:
                raise BundleError(f"{path}: warm-up request failed in {errors[0]['stage']} ({errors[0].get('detail')})")
        return pipeline

    def install(self, pipeline: Pipeline | Bundle) -> None:
        """Atomic swap: requests already running keep the pipeline they started with."""
        if isinstance(pipeline, Bundle):
            pipeline = Pipeline(pipeline, self.settings, observe=lambda stage, sec: self.metrics.stage_seconds.labels(stage).observe(sec),
                                on_error=self._recall_error, on_stage_error=self._stage_error)
        bundle = pipeline.bundle
        self.fusion.bind(bundle.schema, pipeline.fusion_params)
        with self._lock:
            self.pipeline = pipeline
            self.load_error = None
            self.loaded_at = time.time()
        self.metrics.set_bundle(bundle.version, bundle.schema.dataset, bundle.n_items)
        self.metrics.ready.set(1)
        # The loaded objects live as long as the bundle: move them out of the collector's reach.
        # Otherwise every full collection walks them all (~30 ms with the GIL held at 1M items,
        # once every few dozen requests: the p99). unfreeze first so a replaced bundle is freed.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        log.info("serving bundle %s (%s, %d items)", bundle.version, bundle.schema.dataset, bundle.n_items)

    def _recall_error(self, source: str, exc: Exception) -> None:
        self.metrics.recall_errors.labels(source).inc()
        self.metrics.errors.labels(f"recall_{source}").inc()

    def _stage_error(self, stage: str, exc: Exception) -> None:
        self.metrics.errors.labels(f"stage_{stage}").inc()
        log.warning("stage %s failed open: %s: %s", stage, type(exc).__name__, exc)

    # --- background work: spool drainer, Redis feedback-stream consumer

    def start_background(self) -> None:
        loop = asyncio.get_running_loop()
        self.start_poller()
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain_loop(self.settings.spool_drain_seconds))
        if self._consumer is None and hasattr(self.store.inner, "consume_feedback"):
            self._stop.clear()
            self._consumer = threading.Thread(target=self._consume_loop, name="funnel-feedback-consumer", daemon=True)
            self._consumer.start()

    async def stop_background(self) -> None:
        await self.stop_poller()
        if self._drainer is not None:
            self._drainer.cancel()
            try:
                await self._drainer
            except asyncio.CancelledError:
                pass
            self._drainer = None
        if self._consumer is not None:
            self._stop.set()
            await asyncio.get_running_loop().run_in_executor(None, self._consumer.join, 2.0)
            self._consumer = None

    async def _drain_loop(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(None, drain_spool, self)
            except Exception:  # keep draining on the next tick
                log.exception("spool drain failed")

    def _consume_loop(self) -> None:
        """Apply the Redis feedback stream to the tuner's tally (consumer group; see
        core/redis_store.py). Blocks at most 200 ms per read so shutdown is prompt."""
        name_native_thread("funnel-consumer")
        name = f"{self.fusion.owner}-{uuid.uuid4().hex[:6]}"
        failing = False
        while not self._stop.is_set():
            try:
                n = self.store.consume_feedback(name, block_ms=200)
                if n:
                    self.metrics.stream_applied.inc(n)
                failing = False
            except Exception as e:
                if self._stop.is_set():
                    return
                if not failing:  # once per outage, not every retry
                    log.warning("feedback stream consumer: %s: %s", type(e).__name__, e)
                failing = True
                self._stop.wait(0.5)

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


def _init_compute_thread(n: int) -> None:
    name_native_thread("funnel-compute")  # what top -H, perf and the load test's thread report show
    _set_faiss_threads(n)
