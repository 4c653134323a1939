"""The worker's own reader of input that Faust's consumer skipped.

Across a takeover, Faust sometimes never hands some messages of a partition to the stream and
then commits past them (issue 11). The pipeline notices the jump in offsets, or a partition with
unread messages that stopped delivering (``LivePipeline._fill_skipped``), and reads the missing
offsets with this reader: a plain confluent-kafka consumer with ``assign()``, no group, nothing
committed. Each record becomes a Faust event (``faust_internals.event_for_record``), so it is
processed where it belongs and acked through Faust like any event.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from confluent_kafka import Consumer

from stream_app.contracts.events import MessageOrigin
from stream_app.kafka.ranges import PartitionRange, range_consumer, read_ranges, watermarks
from stream_app.live import faust_internals
from stream_app.live.pipeline import RawMessage
from stream_app.settings import Settings

READ_TIMEOUT_S: Final = 10.0  # no message for this long while some are missing: give up

Record = tuple[bytes | None, bytes | None, int, float]  # key, value, offset, timestamp (s)


class RebalancedWhileReadingError(RuntimeError):
    """A rebalance happened during the read: the partition may have another owner now."""


class SkippedReader:
    """Reads offsets [start, end) of an input partition from the log (``ReadSkipped``)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self._app = app
        self._settings = settings
        self._consumer: Consumer | None = None

    async def __call__(
        self, topic: str, partition: int, start: int, end: int
    ) -> tuple[list[RawMessage], int]:
        generation = faust_internals.consumer_generation(self._app)
        records, stop = await asyncio.to_thread(self._read, topic, partition, start, end)
        if faust_internals.consumer_generation(self._app) != generation:
            raise RebalancedWhileReadingError(f"{topic}[{partition}] was rebalanced while read")
        found: list[RawMessage] = []
        for key, value, offset, timestamp in records:
            origin = MessageOrigin.model_construct(topic=topic, partition=partition, offset=offset)
            event = faust_internals.event_for_record(
                self._app, topic, partition, offset, key, value, timestamp
            )
            found.append((key, value, origin, event))
        return found, stop

    def _read(self, topic: str, partition: int, start: int, end: int) -> tuple[list[Record], int]:
        """The records of [start, end), and where the read ended (``end``, or the partition's
        end now if that comes first)."""
        if self._consumer is None:
            self._consumer = range_consumer(
                self._settings, f"{self._settings.app_id}-skipped-input-reader"
            )
        low, high = watermarks(self._consumer, topic, partition)
        stop = min(end, high)
        wanted = PartitionRange(topic, partition, max(start, low), stop)
        records = [
            (m.key(), m.value(), int(m.offset()), m.timestamp()[1] / 1000)
            for m in read_ranges(self._consumer, [wanted], idle_timeout_s=READ_TIMEOUT_S)
        ]
        return records, max(stop, start)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
