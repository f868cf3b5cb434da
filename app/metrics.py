"""Prometheus metrics, one registry per app (so tests can build many apps)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram("funnel_stage_seconds", "Latency per pipeline stage", ["stage"], registry=r, buckets=_BUCKETS)
        self.request_seconds = Histogram("funnel_request_seconds", "End-to-end latency per endpoint", ["endpoint"], registry=r, buckets=_BUCKETS)
        self.requests = Counter("funnel_requests_total", "Requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.feedback_events = Counter("funnel_feedback_events_total", "Feedback events accepted, by type", ["type"], registry=r)
        self.recall_errors = Counter("funnel_recall_errors_total", "Recall paths that raised and were skipped", ["source"], registry=r)
        self.bundle_info = Gauge("funnel_bundle_info", "Loaded bundle (value 1)", ["version", "dataset"], registry=r)
        self.ready = Gauge("funnel_ready", "1 when a bundle is loaded", registry=r)
