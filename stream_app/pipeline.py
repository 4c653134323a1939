"""The live step, free of Faust: raw message -> decode -> Processor -> outputs.

The Faust agent hands every message to :meth:`LivePipeline.handle`; tests drive it directly with
in-memory sinks. One :class:`Processor` per input partition (each with its own due-time index and
watermark) shares the worker's single model set, because Faust only lets a stream write table keys
of the partition it is iterating, and a customer's events all live in one partition.

Delivery (at-least-once, every duplicate detectable): a change goes into the customer's outbox in
the same state write that records the event's offset, and is then sent; the broker's
acknowledgement empties the outbox on the customer's next update. After a crash, a re-delivered
event is recognised by its offset and the customer's unacknowledged changes are sent again, with
the same change ids and sequence numbers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import orjson

from stream_app.events import (
    DeadLetter,
    DeadLetterReason,
    EventKind,
    MessageOrigin,
    Origin,
    SegmentChange,
    dead_letter,
    decode_event,
    encode,
)
from stream_app.metrics import Metrics
from stream_app.models import SegmentModels
from stream_app.processor import CustomerState, Position, Processor, StateStore, Status
from stream_app.settings import Settings

log = logging.getLogger(__name__)

OUTBOX_LIMIT: Final = 256


class Sinks(Protocol):
    """Where the pipeline's output goes (Faust topics live, lists in tests)."""

    async def change(self, customer_id: str, value: bytes) -> Awaitable[Any]:
        """Send a change; return an awaitable that completes when the broker acknowledged it."""
        ...

    async def membership(self, customer_id: str, value: bytes) -> None: ...

    async def dead_letter(self, key: bytes | None, value: bytes) -> None: ...


class AckTracker:
    """Per-customer sequence numbers sent and acknowledged by this process (not persisted)."""

    limit = OUTBOX_LIMIT

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.acked: dict[str, int] = {}

    def acknowledged(self, customer_id: str) -> int:
        return self.acked.get(customer_id, 0)

    def on_ack(self, customer_id: str, sequence: int) -> None:
        if sequence > self.acked.get(customer_id, 0):
            self.acked[customer_id] = sequence


def membership_record(change: SegmentChange) -> bytes:
    """The compacted `segment-membership` value: a customer's current segment."""
    return orjson.dumps(
        {
            "schema_version": 1,
            "customer_id": change.customer_id,
            "segment": change.current.model_dump(mode="json"),
            "segment_name": change.current.name,
            "sequence": change.sequence,
            "change_id": change.change_id,
            "event_time": change.event_time.isoformat(),
            "origin": change.origin.value,
            "model_version": change.model_version,
        }
    )


class LivePipeline:
    def __init__(
        self,
        settings: Settings,
        store_for_partition: Callable[[int], StateStore],
        sinks: Sinks,
        metrics: Metrics | None = None,
        models: SegmentModels | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.models = models or SegmentModels(settings.segmentation)
        self.metrics = metrics or Metrics()
        self.sinks = sinks
        self.acks = AckTracker()
        self._store_for = store_for_partition
        self._clock = clock or (lambda: datetime.now(UTC))
        self.processors: dict[int, Processor] = {}
        self._kinds: dict[str, EventKind] = {
            settings.clickstream_topic: "click",
            settings.transactions_topic: "transaction",
        }

    def processor(self, partition: int) -> Processor:
        proc = self.processors.get(partition)
        if proc is None:
            proc = Processor(
                self.settings.segmentation,
                self.models,
                self._store_for(partition),
                outbox=self.acks,
            )
            proc.rebuild_due_index()
            self.processors[partition] = proc
        return proc

    def forget_partitions(self, partitions: set[int]) -> None:
        """On revocation: another worker owns these customers now."""
        for partition in partitions:
            self.processors.pop(partition, None)

    async def handle(self, key: bytes | None, value: bytes | None, origin: MessageOrigin) -> None:
        """Process one raw message. Never raises: anything wrong becomes a dead letter."""
        started = time.perf_counter()
        payload = value if isinstance(value, bytes) else b""
        try:
            await self._handle(key, payload, origin)
        except Exception as exc:
            log.exception(
                "processing failed at %s[%s]@%s", origin.topic, origin.partition, origin.offset
            )
            detail = f"{type(exc).__name__}: {exc}"
            await self._reject(
                key, dead_letter(payload, DeadLetterReason.PROCESSING_ERROR, detail, origin, key)
            )
        finally:
            self.metrics.processing_seconds.observe(time.perf_counter() - started)

    async def _handle(self, key: bytes | None, payload: bytes, origin: MessageOrigin) -> None:
        kind = self._kinds[origin.topic]
        decoded = decode_event(
            payload, kind, origin, key=key, max_bytes=self.settings.max_event_bytes
        )
        if isinstance(decoded, DeadLetter):
            await self._reject(key, decoded)
            return
        self.metrics.events_in.labels(decoded.event_type.value).inc()
        now = self._clock()
        outcome = self.processor(origin.partition).process(
            decoded, processed_at=now, position=Position(origin.topic, origin.offset)
        )
        if outcome.status is Status.LATE:
            detail = (
                f"event_time {decoded.event_time.isoformat()} is before the watermark "
                f"(allowed lateness {self.settings.segmentation.allowed_lateness_seconds:.0f}s)"
            )
            await self._reject(
                key, dead_letter(payload, DeadLetterReason.LATE_EVENT, detail, origin, key)
            )
            return
        if outcome.status is Status.DUPLICATE:
            self.metrics.duplicates.inc()
        await self._deliver(outcome.state, outcome.changes, now)

    async def _deliver(
        self, state: CustomerState | None, changes: list[SegmentChange], now: datetime
    ) -> None:
        """Send, in sequence order, what this process has not sent yet: first changes left in the
        customer's outbox by a previous process (possibly undelivered), then the fresh ones."""
        fresh = {change.change_id for change in changes}
        if state is not None:
            sent = self.acks.sent.get(state.customer_id, 0)
            for entry in state.outbox:
                head = orjson.loads(entry)
                if head["sequence"] > sent and head["change_id"] not in fresh:
                    self.metrics.resent_changes.inc()
                    await self._send(SegmentChange.model_validate_json(entry))
        for change in changes:
            if change.sequence > self.acks.sent.get(change.customer_id, 0):
                await self._send(change)
                if change.origin is Origin.LIVE:
                    latency = (now - change.event_time).total_seconds()
                    self.metrics.event_to_emit_seconds.observe(max(latency, 0.0))

    async def _send(self, change: SegmentChange) -> None:
        customer = change.customer_id
        acked = await self.sinks.change(customer, encode(change))
        self.acks.sent[customer] = change.sequence
        sequence = change.sequence
        if isinstance(acked, asyncio.Future):
            acked.add_done_callback(lambda fut: self._acked(fut, customer, sequence))
        else:
            self.acks.on_ack(customer, sequence)
        await self.sinks.membership(customer, membership_record(change))
        self.metrics.segment_changes.labels(change.component.value, change.origin.value).inc()

    def _acked(self, fut: asyncio.Future[Any], customer: str, sequence: int) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.acks.on_ack(customer, sequence)

    async def _reject(self, key: bytes | None, letter: DeadLetter) -> None:
        self.metrics.dead_letters.labels(letter.reason.value).inc()
        log.info(
            "dead letter %s from %s[%s]@%s: %s",
            letter.reason.value,
            letter.source_topic,
            letter.source_partition,
            letter.source_offset,
            letter.detail[:200],
        )
        await self.sinks.dead_letter(key, encode(letter))

    def update_quality_metrics(self) -> None:
        for name, model in (("purchase", self.models.purchase), ("churn", self.models.churn)):
            quality = model.quality()
            for metric in ("roc_auc", "log_loss"):
                if quality[metric] is not None:
                    self.metrics.model_quality.labels(name, metric).set(quality[metric])
