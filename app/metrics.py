"""Prometheus metrics, one registry per app (so tests can build many apps).

| metric | type | labels | what |
|---|---|---|---|
| funnel_stage_seconds | histogram | stage | latency of each pipeline stage (user_tower, recall, prerank_*, rank, fusion, rerank) |
| funnel_request_seconds | histogram | endpoint | end-to-end handler latency (recommend, feedback) |
| funnel_requests_total | counter | endpoint, status | requests by endpoint and HTTP status |
| funnel_recall_candidates | histogram | source | candidates each recall path returned per request |
| funnel_recall_seconds | histogram | source | latency of each recall path |
| funnel_recall_errors_total | counter | source | recall paths that raised and were skipped (fail-open) |
| funnel_errors_total | counter | kind | errors by kind: validation, unknown_request, not_ready, recall_<source>, internal, ... |
| funnel_feedback_events_total | counter | type | feedback events accepted, by type |
| funnel_tuner_round | gauge | scene | open tuner round id (-1: no round / tuner off) |
| funnel_tuner_bucket_impressions | gauge | scene, bucket | impressions counted in the open round, per bucket |
| funnel_tuner_bucket_reward | gauge | scene, bucket | mean reward per impression in the open round, per bucket |
| funnel_bundle_info | gauge | version, dataset | the loaded bundle (value 1) |
| funnel_bundle_items | gauge | | catalog size of the loaded bundle |
| funnel_ready | gauge | | 1 when a bundle is loaded |
| funnel_degraded_total | counter | stage, reason | stages that degraded instead of failing: stage user_tower, recall.<path>, prerank_a, rank, fusion, rerank, history, fusion_params, served_log, feedback; reason error, late, budget, store_unavailable |
| funnel_shed_total | counter | endpoint | requests refused with 503 + Retry-After because the worker was at FUNNEL_MAX_INFLIGHT |
| funnel_inflight | gauge | | /v1/* requests being handled by this worker |
| funnel_store_up | gauge | | 1 while the state store answers, 0 while it is down (requests fail over to fallbacks) |
| funnel_spool_events | gauge | | feedback events (and served records) waiting in the local spool for the store |
| funnel_spool_drained_total | counter | kind | spooled rows written to the store once it returned (feedback, served) |
| funnel_spool_dropped_total | counter | reason | spooled feedback that failed validation once the store could be asked (never acknowledged data the store accepts) |
| funnel_bundle_reloads_total | counter | result | POST /admin/bundles/reload outcomes: ok, refused, not_found, busy |
| funnel_feedback_stream_applied_total | counter | | Redis feedback-stream entries this worker's consumer applied to the tuner tally |

Tuner gauges are read from the state store when /metrics is scraped (every worker reports
the shared round; take max/avg across workers, not sum)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)
_COUNT_BUCKETS = (0, 10, 25, 50, 100, 200, 300, 400, 600, 800, 1200, 2000)


class _TunerCollector:
    """Scrape-time gauges of the open tuner round (from the fusion service and the store)."""

    def __init__(self) -> None:
        self.fusion = None  # set by AppState once the fusion service exists

    def collect(self):
        rnd = GaugeMetricFamily("funnel_tuner_round", "Open tuner round id (-1: none)", labels=["scene"])
        imp = GaugeMetricFamily("funnel_tuner_bucket_impressions", "Impressions in the open round per bucket", labels=["scene", "bucket"])
        rew = GaugeMetricFamily("funnel_tuner_bucket_reward", "Mean reward per impression in the open round per bucket", labels=["scene", "bucket"])
        f = self.fusion
        if f is not None and getattr(f, "tuner", None) is not None:
            try:
                view = f._tuner_view()
                rid = view.round_id if view.enabled and view.round_id is not None else -1
                rnd.add_metric([f.scene], rid)
                if rid >= 0:
                    for bucket, st in sorted(f.store.bucket_stats(f.scene, rid).items()):
                        imp.add_metric([f.scene, bucket], st.n)
                        rew.add_metric([f.scene, bucket], st.mean)
            except Exception:  # a store hiccup must not break the scrape
                pass
        yield rnd
        yield imp
        yield rew


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram("funnel_stage_seconds", "Latency per pipeline stage", ["stage"], registry=r, buckets=_BUCKETS)
        self.request_seconds = Histogram("funnel_request_seconds", "End-to-end latency per endpoint", ["endpoint"], registry=r, buckets=_BUCKETS)
        self.requests = Counter("funnel_requests_total", "Requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.recall_candidates = Histogram("funnel_recall_candidates", "Candidates per recall path per request", ["source"], registry=r, buckets=_COUNT_BUCKETS)
        self.recall_seconds = Histogram("funnel_recall_seconds", "Latency per recall path", ["source"], registry=r, buckets=_BUCKETS)
        self.feedback_events = Counter("funnel_feedback_events_total", "Feedback events accepted, by type", ["type"], registry=r)
        self.recall_errors = Counter("funnel_recall_errors_total", "Recall paths that raised and were skipped", ["source"], registry=r)
        self.errors = Counter("funnel_errors_total", "Errors by kind", ["kind"], registry=r)
        self.bundle_info = Gauge("funnel_bundle_info", "Loaded bundle (value 1)", ["version", "dataset"], registry=r)
        self.bundle_items = Gauge("funnel_bundle_items", "Catalog size of the loaded bundle", registry=r)
        self.ready = Gauge("funnel_ready", "1 when a bundle is loaded", registry=r)
        self.degraded = Counter("funnel_degraded_total", "Stages that degraded instead of failing", ["stage", "reason"], registry=r)
        self.shed = Counter("funnel_shed_total", "Requests refused with 503 at the in-flight limit", ["endpoint"], registry=r)
        self.inflight = Gauge("funnel_inflight", "/v1/* requests being handled", registry=r)
        self.store_up = Gauge("funnel_store_up", "1 while the state store answers", registry=r)
        self.store_up.set(1)
        self.spool_events = Gauge("funnel_spool_events", "Rows waiting in the local spool", registry=r)
        self.spool_drained = Counter("funnel_spool_drained_total", "Spooled rows written to the store", ["kind"], registry=r)
        self.spool_dropped = Counter("funnel_spool_dropped_total", "Spooled feedback refused by validation at drain", ["reason"], registry=r)
        self.bundle_reloads = Counter("funnel_bundle_reloads_total", "Bundle reloads by result", ["result"], registry=r)
        self.stream_applied = Counter("funnel_feedback_stream_applied_total", "Feedback-stream entries applied by this worker", registry=r)
        self.tuner = _TunerCollector()
        r.register(self.tuner)

    def observe_recall(self, paths: dict) -> None:
        """Per-path candidate counts and latency from the recall stage's report."""
        for source, rep in paths.items():
            if "error" in rep or "skipped" in rep:
                continue
            self.recall_candidates.labels(source).observe(rep.get("n", 0))
            if "ms" in rep:
                self.recall_seconds.labels(source).observe(rep["ms"] / 1e3)

    def observe_degraded(self, degraded: list[dict]) -> None:
        for d in degraded:
            self.degraded.labels(d["stage"], d["reason"]).inc()

    def set_bundle(self, version: str, dataset: str, items: int) -> None:
        """The loaded bundle: exactly one version series is 1."""
        self.bundle_info.clear()
        self.bundle_info.labels(version, dataset).set(1)
        self.bundle_items.set(items)
