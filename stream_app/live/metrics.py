"""Prometheus metrics of a worker, in a registry of its own (one per app, so tests stay apart)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "stream_app_events_in", "Valid events read, by type", ["event_type"], registry=r
        )
        self.dead_letters = Counter(
            "stream_app_dead_letters",
            "Messages sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "stream_app_duplicate_events", "Events ignored as already applied", registry=r
        )
        self.segment_changes = Counter(
            "stream_app_segment_changes",
            "Segment changes emitted",
            ["component", "origin"],
            registry=r,
        )
        self.rerouted = Counter(
            "stream_app_rerouted_events",
            "Events keyed by something other than their customer id, re-keyed to its partition",
            registry=r,
        )
        self.resent_changes = Counter(
            "stream_app_resent_changes",
            "Unacknowledged changes sent again (after a restart); consumers drop them by change_id",
            registry=r,
        )
        self.processing_seconds = Histogram(
            "stream_app_processing_seconds",
            "Time to process one event (decode, features, models, policy, state write)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.event_to_emit_seconds = Histogram(
            "stream_app_event_to_emit_seconds",
            "Live events only: from the event's time to its segment change being handed to Kafka",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_events = Histogram(
            "stream_app_batch_events",
            "Messages the agent handled as one batch (what Faust had buffered, up to the maximum)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "stream_app_consumer_lag",
            "Messages between the committed position and the end of each input partition",
            ["topic", "partition"],
            registry=r,
        )
        self.model_quality = Gauge(
            "stream_app_model_quality",
            "Progressive (predict-then-learn) model quality",
            ["model", "metric"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
