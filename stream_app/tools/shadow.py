"""Shadow runs: re-process a range of the live input topics in an application of its own.

``stream-app shadow NAME --from TIME [--until TIME]`` (or ``--from-offsets/--until-offsets``):

1. resolves the range on the live input topics (times are Kafka timestamps, i.e. when the events
   arrived, since the inputs use LogAppendTime), reading with ``assign()`` and never committing:
   the live worker's consumer group is not touched;
2. creates the shadow's own topics, ``shadow-NAME-clickstream`` ... ``shadow-NAME-dead-letters``,
   with the live inputs' partition count, and copies the range into them partition for partition
   (so every customer keeps its partition and its order), marking each event ``origin: replay``
   so nothing downstream mistakes the shadow for live traffic;
3. runs a worker with application id ``shadow-NAME`` (its own consumer group, RocksDB state,
   changelog and model snapshots) until it has committed the whole copy, then stops it.

The shadow worker takes every other setting from the environment, so a model change is shadow-
tested by running the command with the changed ``STREAM_APP_SEGMENTATION__*`` variables, then
comparing outputs with ``stream-app compare``.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from stream_app.errors import UserError
from stream_app.kafka.local import free_ports
from stream_app.kafka.ranges import (
    Bounds,
    PartitionRange,
    range_consumer,
    read_ranges,
    resolve,
    watermarks,
)
from stream_app.kafka.topics import CREATED, admin_client, create_topics
from stream_app.live.workerproc import TOOL_READY_TIMEOUT_S, worker_process
from stream_app.progress import Progress
from stream_app.settings import Settings
from stream_app.tools.publish import POLL_EVERY, make_producer, send

NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
SHADOW_PREFIX: Final = "shadow-"
COMMIT_POLL_S: Final = 0.5


def shadow_settings(live: Settings, name: str, partitions: int) -> Settings:
    """The live settings with everything that identifies an application replaced."""
    if not NAME.match(name):
        raise UserError(f"shadow name must be letters, digits, '.', '_' or '-', not {name!r}")
    prefix = f"{SHADOW_PREFIX}{name}"
    return live.renamed(
        prefix,
        partitions=partitions,
        web_port=free_ports(1)[0],
        state_dir=live.state_dir / prefix,
    )


def mark_replay(value: bytes | None) -> bytes | None:
    """The event with ``origin: replay``; anything that is not a JSON object is copied as it is
    (the shadow worker dead-letters it exactly as the live one did)."""
    if value is None:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    if not isinstance(doc, dict) or doc.get("origin") == "replay":
        return value
    doc["origin"] = "replay"
    return orjson.dumps(doc)


@dataclass
class CopySummary:
    copied: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0


def copy_range(
    live: Settings, shadow: Settings, ranges: list[PartitionRange], progress: Progress | None
) -> CopySummary:
    """Copy the ranges of the live inputs into the shadow's inputs, same partition numbers."""
    renamed = {
        live.clickstream_topic: shadow.clickstream_topic,
        live.transactions_topic: shadow.transactions_topic,
    }
    consumer = range_consumer(live, f"{shadow.app_id}-copier")
    producer = make_producer(shadow)
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    summary = CopySummary()
    started = time.monotonic()
    try:
        for count, msg in enumerate(read_ranges(consumer, ranges), start=1):
            target = renamed[msg.topic()]
            timestamp_ms = msg.timestamp()[1]
            value = mark_replay(msg.value())
            send(producer, target, msg.key(), value, delivered, timestamp_ms, msg.partition())
            summary.copied[target] += 1
            if count % POLL_EVERY == 0:
                producer.poll(0)
                if progress is not None:
                    progress.update(count)
    finally:
        consumer.close()
    _flush(producer, failures)
    summary.elapsed_s = time.monotonic() - started
    if progress is not None:
        progress.finish(sum(summary.copied.values()))
    return summary


def _flush(producer: Producer, failures: list[str]) -> None:
    if producer.flush(60) > 0:
        raise UserError("the broker did not acknowledge the copy within 60 s")
    if failures:
        raise UserError(f"{len(failures)} messages were not copied: {failures[0]}")


def wait_until_committed(
    shadow: Settings, proc_alive: Any, timeout_s: float, progress: Progress | None = None
) -> None:
    """Until the shadow worker's group has committed every copied message: then every output of
    those events is durable (the worker acknowledges an event only after its sends)."""
    probe = Consumer({"bootstrap.servers": shadow.bootstrap_servers, "group.id": shadow.app_id})
    try:
        ends = [
            TopicPartition(topic, partition, watermarks(probe, topic, partition)[1])
            for topic in shadow.input_topics
            for partition in range(shadow.partitions)
        ]
        total = sum(tp.offset for tp in ends)
        deadline = time.monotonic() + timeout_s
        while True:
            committed = probe.committed([TopicPartition(t.topic, t.partition) for t in ends], 10)
            positions = [max(c.offset, 0) for c in committed]  # nothing committed yet: 0
            if progress is not None:
                progress.update(sum(positions))
            if all(at >= end.offset for at, end in zip(positions, ends, strict=True)):
                return
            if not proc_alive():
                raise UserError("the shadow worker exited before finishing; see its log")
            if time.monotonic() > deadline:
                raise UserError(
                    f"the shadow worker committed {sum(positions):,} of {total:,} messages in "
                    f"{timeout_s:g}s"
                )
            time.sleep(COMMIT_POLL_S)
    finally:
        probe.close()


@dataclass(frozen=True)
class ShadowRequest:
    name: str
    bounds: Bounds
    run_worker: bool = True
    timeout_s: float = 1800.0
    show_progress: bool = True


def run_shadow(live: Settings, request: ShadowRequest) -> dict[str, Any]:
    """Copy the range and (unless told not to) process it; returns the summary."""
    resolver = range_consumer(live, f"{SHADOW_PREFIX}{request.name}-resolver")
    try:
        ranges = resolve(resolver, live.input_topics, request.bounds)
    finally:
        resolver.close()
    partitions = max(r.partition for r in ranges) + 1
    shadow = shadow_settings(live, request.name, partitions)
    outcomes = create_topics(shadow)
    if outcomes[shadow.clickstream_topic] != CREATED:
        raise UserError(
            f"shadow {request.name!r} exists already (topic {shadow.clickstream_topic}); "
            f"choose another name, or remove it with `stream-app shadow {request.name} --delete`"
        )
    total = sum(r.size for r in ranges)
    copy = copy_range(
        live, shadow, ranges, Progress(sys.stderr, enabled=request.show_progress, total=total)
    )
    summary: dict[str, Any] = {
        "shadow_app_id": shadow.app_id,
        "ranges": [
            {"topic": r.topic, "partition": r.partition, "from": r.start, "until": r.end}
            for r in sorted(ranges)
        ],
        "copied": dict(sorted(copy.copied.items())),
        "copy_s": round(copy.elapsed_s, 3),
        "segment_changes_topic": shadow.segment_changes_topic,
        "dead_letters_topic": shadow.dead_letters_topic,
    }
    if request.run_worker:
        summary.update(_process(shadow, request, total))
    summary["compare_with"] = (
        f"stream-app compare kafka:{live.segment_changes_topic} "
        f"kafka:{shadow.segment_changes_topic}"
    )
    return summary


def delete_shadow(live: Settings, name: str) -> list[str]:
    """Delete every topic of the shadow (ours and Faust's internal ones) and its local state."""
    shadow = shadow_settings(live, name, live.partitions)
    admin = admin_client(live.bootstrap_servers)
    prefix = f"{shadow.app_id}-"
    doomed = sorted(t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix))
    if not doomed:
        raise UserError(f"no topics named {prefix}* on {live.bootstrap_servers}")
    for topic, future in admin.delete_topics(doomed, operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            raise UserError(f"could not delete {topic}: {exc.args[0].str()}") from exc
    shutil.rmtree(shadow.state_dir, ignore_errors=True)
    return doomed


def _process(shadow: Settings, request: ShadowRequest, total: int) -> dict[str, Any]:
    log_path = shadow.state_dir / "worker.log"
    started = time.monotonic()
    progress = Progress(sys.stderr, enabled=request.show_progress, verb="processed", total=total)
    with worker_process(shadow, log_path, echo=lambda line: print(line, file=sys.stderr)) as worker:
        worker.wait_ready(TOOL_READY_TIMEOUT_S)
        wait_until_committed(shadow, worker.alive, request.timeout_s, progress)
    progress.finish(total)
    probe = range_consumer(shadow, f"{shadow.app_id}-summary")
    try:
        changes = sum(
            watermarks(probe, shadow.segment_changes_topic, p)[1] for p in range(shadow.partitions)
        )
    finally:
        probe.close()
    return {
        "process_s": round(time.monotonic() - started, 3),
        "segment_changes": changes,
        "worker_log": str(log_path),
    }
