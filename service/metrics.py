"""Prometheus metrics. Labels are route templates, never raw paths (hostile ids stay out)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    generate_latest,
)

from service.activity import RecentActivity

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per app, so tests and several apps in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.recent = RecentActivity()  # the console's last hour, minute by minute
        r = self.registry
        GCCollector(registry=r)  # python_gc_collections_total{generation}: collector work under load
        self.requests = Counter(
            "http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "http_request_duration_seconds", "HTTP request latency", ["method", "route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "inference_batch_size", "Inputs per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "inference_batch_seconds", "Time of one model call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds", "Time an input waited for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.commit_group_size = Histogram(
            "event_commit_group_size", "Requests per append transaction", buckets=BATCH_BUCKETS, registry=r
        )
        self.commit_seconds = Histogram(
            "event_commit_seconds", "Time of one group append", buckets=LATENCY_BUCKETS, registry=r
        )
        # One upload's own wall time per stage: decode (from the request's start: checks and
        # decode), inference (submitted to the batcher until its output is back: queue wait,
        # model call, hand-offs) and record (handed to the group committer until committed).
        self.stage_seconds = Histogram(
            "prediction_stage_seconds", "One upload's time in each stage of the prediction path", ["stage"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self._stages = {stage: self.stage_seconds.labels(stage) for stage in ("decode", "inference", "record")}
        self.labels_wait = Histogram(
            "bulk_labels_wait_seconds", "Time a bulk label request waited for its turn (uploads come first)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.predictions = Counter(
            "predictions", "Predictions recorded", ["outcome"], registry=r
        )
        decodes = Counter(
            "image_decodes", "Uploads decoded, by where: inline (on the event loop) or thread", ["where"],
            registry=r,
        )
        self._decodes = {True: decodes.labels("inline"), False: decodes.labels("thread")}
        reads = Counter(
            "read_connections", "Read-side connections handed out, by server (replica or primary)", ["server"],
            registry=r,
        )
        self._reads = {server: reads.labels(server) for server in ("replica", "primary")}
        self.replica_lag_bytes = Gauge(
            "replica_lag_bytes", "WAL the replica has not replayed yet (NaN: unreachable)", registry=r
        )
        self.projection_lag_events = Gauge(
            "projection_lag_events", "Events appended but not yet projected", registry=r
        )
        self.projection_lag_seconds = Gauge(
            "projection_lag_seconds", "Age of the oldest event not yet projected", registry=r
        )
        self.tree_size = Gauge("tlog_tree_size", "Leaves in the stored Merkle tree (events integrated)", registry=r)
        self.checkpoint_size = Gauge("tlog_checkpoint_size", "Tree size of the latest signed checkpoint", registry=r)
        self.checkpoint_age_seconds = Gauge(
            "tlog_checkpoint_age_seconds", "Time since the latest signed checkpoint", registry=r
        )
        self.checkpoint_refusing = Gauge(
            "tlog_checkpoint_refusing",
            "1 while the integrator refuses to sign (the stored tree does not extend the last signed one)",
            registry=r,
        )

        # Model quality from the projection's quality cells (refreshed on each scrape). `window`
        # "hour" counts from the start of the previous UTC hour, "day" from the same hour a day
        # ago: the cells are hourly.
        self.model_accuracy = Gauge(
            "model_accuracy", "Correct over labelled made predictions", ["model", "version", "window"], registry=r
        )
        self.model_label_coverage = Gauge(
            "model_label_coverage", "Labelled over made predictions", ["model", "version", "window"], registry=r
        )
        self.model_predicted_class_psi = Gauge(
            "model_predicted_class_psi",
            "Population stability index of the predicted classes over the last day against the model's first day",
            ["model", "version"], registry=r,
        )

    def observe_quality(self, model: str, version: str, window: str, accuracy: float | None,
                        coverage: float | None) -> None:
        # A window without labels has no accuracy: NaN says "not measured" to Prometheus.
        self.model_accuracy.labels(model, version, window).set(float("nan") if accuracy is None else accuracy)
        self.model_label_coverage.labels(model, version, window).set(float("nan") if coverage is None else coverage)

    # the micro-batcher's metrics hook
    def observe_batch(self, size: int, inference_s: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(inference_s)

    def observe_wait(self, wait_s: float) -> None:
        self.queue_wait.observe(wait_s)

    def observe_read(self, server: str) -> None:
        self._reads[server].inc()

    def observe_decode(self, inline: bool) -> None:
        self._decodes[inline].inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        self._stages[stage].observe(seconds)

    # the group committer's hook
    def observe_labels_wait(self, seconds: float) -> None:
        self.labels_wait.observe(seconds)

    def observe_commit(self, size: int, seconds: float) -> None:
        self.commit_group_size.observe(size)
        self.commit_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
