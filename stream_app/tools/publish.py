"""Publish events into the input topics with confluent-kafka (replays, demos, tests).

Keys are customer ids and the partitioner is librdkafka's ``murmur2_random``: the same murmur2
hash Java and aiokafka (Faust) use, so a customer lands on the partition the worker expects.
(librdkafka's default, ``consistent_random``, is CRC32 and would scatter customers.)
The Kafka message timestamp is the event time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from confluent_kafka import KafkaException, Producer

from stream_app.contracts.events import ClickEvent, Event, encode
from stream_app.errors import UserError
from stream_app.progress import Progress
from stream_app.settings import Settings
from stream_app.tools.datasets import RowError

POLL_EVERY: Final = 1000
PRODUCER_CONFIG: Final[dict[str, Any]] = {
    "partitioner": "murmur2_random",
    "linger.ms": 20,
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 500000,
    "compression.type": "lz4",
    "enable.idempotence": True,
}


@dataclass
class PublishSummary:
    published: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    elapsed_s: float = 0.0  # from the first produce to the broker's last acknowledgement

    @property
    def rate(self) -> float:
        return self.published / self.elapsed_s if self.elapsed_s else 0.0


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(
        {"bootstrap.servers": settings.bootstrap_servers, **PRODUCER_CONFIG, **overrides}
    )


def topic_for(event: Event, settings: Settings) -> str:
    return (
        settings.clickstream_topic if isinstance(event, ClickEvent) else settings.transactions_topic
    )


def publish(
    items: Iterable[Event | RowError],
    settings: Settings,
    *,
    speed: float | None = None,
    producer: Producer | None = None,
    progress: Progress | None = None,
    event_span: tuple[float, float] | None = None,
    flush: bool | None = None,
) -> PublishSummary:
    """Publish events in order. `speed` None = as fast as the broker takes them; otherwise event
    time is played back `speed` times faster than real time. `event_span` (first and last event
    time, epoch seconds) lets a paced replay's progress bar show an ETA in event time. `flush`
    (default: only when the producer is our own) waits for the broker's acknowledgements."""
    own = producer is None if flush is None else flush
    prod = producer or make_producer(settings)
    summary = PublishSummary()
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    started = time.monotonic()
    first_event_s: float | None = None
    for item in items:
        if isinstance(item, RowError):
            summary.invalid[item.reason] += 1
            continue
        if speed is not None:
            event_s = item.event_time.timestamp()
            first_event_s = event_s if first_event_s is None else first_event_s
            _pace(started, (event_s - first_event_s) / speed)
        _produce(prod, topic_for(item, settings), item, delivered)
        summary.published += 1
        if summary.published % POLL_EVERY == 0:
            prod.poll(0)  # serve delivery callbacks without paying for a poll per message
        if progress is not None and (speed is not None or summary.published % POLL_EVERY == 0):
            progress.update(summary.published, fraction=_played(item, event_span))
    if own and prod.flush(60) > 0:
        raise UserError("the broker did not acknowledge every event within 60 s")
    summary.elapsed_s = time.monotonic() - started
    summary.failed = len(failures)
    if progress is not None:
        progress.finish(summary.published)
    if failures:
        raise UserError(f"{len(failures)} events were not delivered: {failures[0]}")
    return summary


def _played(event: Event, span: tuple[float, float] | None) -> float | None:
    """Share of the replay's event-time span already played back (None without a span)."""
    if span is None or span[1] <= span[0]:
        return None
    return (event.event_time.timestamp() - span[0]) / (span[1] - span[0])


def _pace(started: float, due_after_s: float) -> None:
    wait = started + due_after_s - time.monotonic()
    if wait > 0:
        time.sleep(wait)


def _produce(prod: Producer, topic: str, event: Event, callback: Any) -> None:
    timestamp_ms = int(event.event_time.timestamp() * 1000)
    send(prod, topic, event.customer_id.encode(), encode(event), callback, timestamp_ms)


def send(
    prod: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    callback: Any,
    timestamp_ms: int = 0,
    partition: int = -1,
) -> None:
    """Hand one message to the producer, waiting while its local queue is full (backpressure).
    ``partition`` -1 lets the murmur2 partitioner place it by key."""
    while True:
        try:
            prod.produce(
                topic,
                key=key,
                value=value,
                timestamp=timestamp_ms,
                partition=partition,
                on_delivery=callback,
            )
            return
        except BufferError:
            prod.poll(0.05)  # local queue full: let deliveries drain
        except KafkaException as exc:
            raise UserError(f"cannot publish to {topic}: {exc}") from exc
