"""`stream-app rewind`: move the live worker's committed input offsets back, deliberately.

Safe by construction:
- a dry run unless ``--execute``: it prints, per partition, the committed offset and the new one;
- it refuses while the group has members (Kafka itself only lets an empty group's offsets be
  altered): stop every worker first;
- it only moves offsets backwards (``--to`` a time or ``--to-earliest``); it never skips data.

What a rewind does to the outputs: each customer's state remembers the last offset applied per
input topic, so re-delivered events that were already applied are skipped (no double counting,
no new segment changes, no sequence gaps). Only events the worker never applied (for example
ones that failed with ``processing_error`` before a fix) take effect. To recompute segments
from scratch, use a shadow run instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition

from stream_app.errors import UserError
from stream_app.kafka.ranges import offset_at, partitions_of, range_consumer, watermarks
from stream_app.kafka.topics import admin_client, wait_for_broker
from stream_app.settings import Settings

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Move:
    topic: str
    partition: int
    committed: int | None  # None: the group has no committed offset there
    target: int

    @property
    def rewinds(self) -> bool:
        return self.committed is None or self.target < self.committed


def plan(settings: Settings, group: str, to: datetime | None) -> list[Move]:
    """Where each input partition would go: the first offset at or after ``to`` (a Kafka
    timestamp) or the earliest offset; never forward of what is committed."""
    consumer = range_consumer(settings, group)
    try:
        wanted = [
            (topic, partition)
            for topic in settings.input_topics
            for partition in partitions_of(consumer, topic)
        ]
        committed = consumer.committed([TopicPartition(t, p) for t, p in wanted], TIMEOUT_S)
        moves = []
        for (topic, partition), current in zip(wanted, committed, strict=True):
            target = (
                offset_at(consumer, topic, partition, to)
                if to is not None
                else watermarks(consumer, topic, partition)[0]
            )
            now = int(current.offset) if current.offset >= 0 else None
            moves.append(Move(topic, partition, now, target if now is None else min(target, now)))
        return moves
    finally:
        consumer.close()


def active_members(settings: Settings, group: str) -> int:
    """How many members the consumer group has now (0 for a group the broker does not know)."""
    admin = admin_client(settings.bootstrap_servers)
    future = admin.describe_consumer_groups([group], request_timeout=TIMEOUT_S)[group]
    try:
        description = future.result()
    except KafkaException:
        return 0  # an unknown group has no members
    return len(description.members)


def run_rewind(
    settings: Settings, group: str, to: datetime | None, execute: bool
) -> dict[str, Any]:
    wait_for_broker(settings.bootstrap_servers, TIMEOUT_S)
    members = active_members(settings, group)
    if members:
        raise UserError(
            f"consumer group {group!r} has {members} active member(s): stop its workers first"
        )
    moves = plan(settings, group, to)
    report: dict[str, Any] = {
        "group": group,
        "executed": execute,
        "partitions": [
            {
                "topic": m.topic,
                "partition": m.partition,
                "committed": m.committed,
                "new": m.target,
                "messages_to_reprocess": None if m.committed is None else m.committed - m.target,
            }
            for m in moves
        ],
    }
    if execute:
        _alter(settings, group, [m for m in moves if m.rewinds])
    return report


def _alter(settings: Settings, group: str, moves: list[Move]) -> None:
    if not moves:
        return
    admin = admin_client(settings.bootstrap_servers)
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(m.topic, m.partition, m.target) for m in moves]
    )
    future = admin.alter_consumer_group_offsets([request], request_timeout=TIMEOUT_S)[group]
    try:
        future.result()
    except KafkaException as exc:
        raise UserError(f"could not rewind group {group!r}: {exc.args[0].str()}") from exc
