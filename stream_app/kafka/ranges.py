"""Offset ranges of topics: resolve them from times or offsets, and read them without a group.

Used by shadow runs (copy a range of the live inputs), ``compare`` (read an output topic) and
``rewind`` (find the offsets of a time). Reading uses ``assign()`` with auto-commit off, so it
never joins or moves any consumer group, least of all the live worker's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from stream_app.errors import UserError
from stream_app.kafka.topics import librdkafka_log
from stream_app.settings import Settings

OFFSET_SPEC: Final = re.compile(r"^(?P<topic>[^:=,\s]+):(?P<partition>\d+)=(?P<offset>\d+)$")
METADATA_TIMEOUT_S: Final = 10.0
WATERMARK_RETRY_S: Final = 0.2
# What a partition answers while its leader is not known everywhere (librdkafka does not mark
# them retriable when get_watermark_offsets raises them).
LEADER_UNKNOWN: Final = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)


@dataclass(frozen=True, order=True)
class PartitionRange:
    """Offsets ``start`` (inclusive) to ``end`` (exclusive) of one partition."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(self.end - self.start, 0)


def parse_offsets(spec: str, flag: str) -> dict[tuple[str, int], int]:
    """``clickstream:0=120,transactions:1=40`` -> {("clickstream", 0): 120, ...}."""
    found: dict[tuple[str, int], int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = OFFSET_SPEC.match(part)
        if match is None:
            raise UserError(
                f"{flag} takes TOPIC:PARTITION=OFFSET[,...] (e.g. clickstream:0=120), not {part!r}"
            )
        found[(match["topic"], int(match["partition"]))] = int(match["offset"])
    return found


def range_consumer(settings: Settings, group_id: str) -> Consumer:
    """A consumer for assign()-only reading: it commits nothing and joins no group."""
    return Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        },
        logger=librdkafka_log(),
    )


def partitions_of(consumer: Consumer, topic: str) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise UserError(f"topic {topic!r} does not exist")
    return sorted(metadata.partitions)


def offset_at(consumer: Consumer, topic: str, partition: int, instant: datetime) -> int:
    """The first offset whose Kafka timestamp is at or after ``instant`` (the end if none)."""
    wanted = TopicPartition(topic, partition, int(instant.timestamp() * 1000))
    (found,) = consumer.offsets_for_times([wanted], timeout=METADATA_TIMEOUT_S)
    if found.offset >= 0:
        return int(found.offset)
    return watermarks(consumer, topic, partition)[1]


def watermarks(
    consumer: Consumer, topic: str, partition: int, sleep: Callable[[float], None] = time.sleep
) -> tuple[int, int]:
    """A partition's low and high watermarks. A retriable broker error, or one of a topic
    created a moment ago whose leader is not known everywhere yet (NOT_LEADER_FOR_PARTITION,
    seen in CI right after `topics create`), is asked again for up to METADATA_TIMEOUT_S."""
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_S
            )
            return int(low), int(high)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            retriable = isinstance(error, KafkaError) and (
                error.retriable() or error.code() in LEADER_UNKNOWN
            )
            if not retriable or time.monotonic() >= deadline:
                raise
            sleep(WATERMARK_RETRY_S)


@dataclass(frozen=True)
class Bounds:
    """Where a range starts and ends: a Kafka timestamp, explicit offsets, or open."""

    start_time: datetime | None = None
    end_time: datetime | None = None
    start_offsets: Mapping[tuple[str, int], int] | None = None
    end_offsets: Mapping[tuple[str, int], int] | None = None


def resolve(consumer: Consumer, topics: Iterable[str], bounds: Bounds) -> list[PartitionRange]:
    """Each partition's range now: open starts are the earliest offset, open ends the current
    end (the range is fixed when resolved; later messages are not part of it)."""
    ranges = []
    for topic in topics:
        for partition in partitions_of(consumer, topic):
            low, high = watermarks(consumer, topic, partition)
            start = _bound(consumer, topic, partition, bounds.start_time, bounds.start_offsets, low)
            end = _bound(consumer, topic, partition, bounds.end_time, bounds.end_offsets, high)
            ranges.append(PartitionRange(topic, partition, max(start, low), min(end, high)))
    return ranges


def _bound(
    consumer: Consumer,
    topic: str,
    partition: int,
    instant: datetime | None,
    offsets: Mapping[tuple[str, int], int] | None,
    default: int,
) -> int:
    if offsets is not None and (topic, partition) in offsets:
        return offsets[(topic, partition)]
    if instant is not None:
        return offset_at(consumer, topic, partition, instant)
    return default


def read_ranges(
    consumer: Consumer, ranges: Iterable[PartitionRange], *, idle_timeout_s: float = 30.0
) -> Iterator[Message]:
    """Every message of the ranges (per partition in offset order). Compacted or transactional
    topics may have holes, so a partition is done when its position reaches the range's end.
    UserError if nothing arrives for ``idle_timeout_s`` while messages are still missing."""
    pending = {(r.topic, r.partition): r for r in ranges if r.size > 0}
    if not pending:
        return
    consumer.assign([TopicPartition(r.topic, r.partition, r.start) for r in pending.values()])
    last_progress = time.monotonic()
    while pending:
        batch = consumer.consume(1000, timeout=0.5)
        for msg in batch:
            key = (msg.topic(), msg.partition())
            target = pending.get(key)
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise UserError(f"cannot read {key[0]}[{key[1]}]: {err.str()}")
                continue
            if target is None or msg.offset() >= target.end:
                continue
            yield msg
        _retire_finished(consumer, pending)
        if batch:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > idle_timeout_s:
            missing = ", ".join(f"{t}[{p}]" for t, p in sorted(pending))
            raise UserError(f"no messages for {idle_timeout_s:g}s; still missing from {missing}")


def _retire_finished(consumer: Consumer, pending: dict[tuple[str, int], PartitionRange]) -> None:
    positions = consumer.position([TopicPartition(t, p) for t, p in pending])
    for tp in positions:
        if tp.offset >= 0 and tp.offset >= pending[(tp.topic, tp.partition)].end:
            del pending[(tp.topic, tp.partition)]
