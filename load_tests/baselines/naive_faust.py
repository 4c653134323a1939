"""Baseline: the naive per-event Faust agent a user would write first.

The same per-event work as the worker (decode, the Processor with its features, models and
policy, the state write to a RocksDB table with its changelog, the change and membership sends,
dead letters), wired the obvious way: one agent over both topics, ``async for event in stream``,
``await topic.send()`` per output, and Faust's defaults (stream buffer 4096, producer buffer 100,
no linger). No ordered merge, no outbox, no tuning.

Configured by STREAM_APP_* variables like the worker; serves ``/ready`` and ``/counts``.

    python -m load_tests.baselines.naive_faust
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import faust

from load_tests.baselines.faust_common import add_harness_pages, run
from stream_app.contracts.events import (
    DeadLetter,
    DeadLetterReason,
    MessageOrigin,
    dead_letter,
    encode,
)
from stream_app.contracts.events import decode_event as decode
from stream_app.core.models import SegmentModels
from stream_app.core.processor import Position, Processor, Status
from stream_app.core.state import CustomerState
from stream_app.live.pipeline import membership_record
from stream_app.live.store import partition_of
from stream_app.settings import Settings


class NaiveStore:
    """Read and write the Faust table on every event: no cache, no batching (the naive way)."""

    def __init__(self, table: Any, partition: int, partitions: int) -> None:
        self.table, self.partition, self.partitions = table, partition, partitions

    def get(self, customer_id: str) -> CustomerState | None:
        raw = self.table.get(customer_id.encode())
        return None if raw is None else CustomerState.from_bytes(raw)

    def put(self, state: CustomerState) -> None:
        self.table[state.customer_id.encode()] = state.to_bytes()

    def delete(self, customer_id: str) -> None:
        self.table.pop(customer_id.encode(), None)

    def __iter__(self) -> Iterator[CustomerState]:
        for key, raw in list(self.table.items()):
            if partition_of(key.decode(), self.partitions) == self.partition:
                yield CustomerState.from_bytes(raw)


def create_naive_app(settings: Settings) -> Any:
    datadir = settings.state_dir.expanduser().resolve() / "naive-faust" / settings.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap_servers}",
        datadir=str(datadir),
        store="rocksdb://",
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_tables_enabled=False,
    )
    customers = app.Table(
        "customers", key_type=bytes, value_type=bytes, partitions=settings.partitions
    )

    def raw(*names: str) -> Any:
        return app.topic(
            *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    inputs = raw(*settings.input_topics)
    changes = raw(settings.segment_changes_topic)
    membership = raw(settings.segment_membership_topic)
    dead_letters = raw(settings.dead_letters_topic)
    kinds: dict[str, Any] = {
        settings.clickstream_topic: "click",
        settings.transactions_topic: "transaction",
    }
    models = SegmentModels(settings.segmentation)
    processors: dict[int, Processor] = {}
    events: Counter[str] = Counter()
    letters: Counter[str] = Counter()

    async def reject(key: bytes | None, letter: DeadLetter) -> None:
        letters[letter.reason.value] += 1
        await dead_letters.send(key=key, value=encode(letter))

    @app.agent(inputs, name="naive-segment")  # type: ignore[untyped-decorator]
    async def segment(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            origin = MessageOrigin(topic=msg.topic, partition=msg.partition, offset=msg.offset)
            payload = event.value if isinstance(event.value, bytes) else b""
            decoded = decode(
                payload,
                kinds[msg.topic],
                origin,
                key=event.key,
                max_bytes=settings.max_event_bytes,
            )
            if isinstance(decoded, DeadLetter):
                await reject(event.key, decoded)
                continue
            events[decoded.event_type.value] += 1
            processor = processors.get(msg.partition)
            if processor is None:
                store = NaiveStore(customers, msg.partition, settings.partitions)
                processor = processors[msg.partition] = Processor(
                    settings.segmentation, models, store
                )
            outcome = processor.process(
                decoded, processed_at=datetime.now(UTC), position=Position(msg.topic, msg.offset)
            )
            if outcome.status is Status.LATE:
                letter = dead_letter(payload, DeadLetterReason.LATE_EVENT, "late", origin)
                await reject(event.key, letter)
                continue
            for change in outcome.changes:
                key = change.customer_id.encode()
                await changes.send(key=key, value=encode(change))
                await membership.send(key=key, value=membership_record(change))

    add_harness_pages(app, lambda: {"events": dict(events), "dead_letters": dict(letters)})
    return app


def main() -> None:
    run(create_naive_app)


if __name__ == "__main__":
    main()
