"""Every Faust internal the worker relies on, and nothing else.

Faust has no public API for what these do (or its public one costs too much per message), so the
worker reaches into faust-streaming's implementation. Each access is one function here, whose
docstring names the Faust source it relies on (paths under ``site-packages/faust/``, lines of
faust-streaming 0.15.3) and why the worker needs it. ``tests/unit/test_faust_internals.py``
checks each against a real ``faust.App``, and ``pyproject.toml`` pins faust-streaming to the
version they were checked on, so an upgrade that moves one fails in CI, not in production.

Faust's public API (``app.topic``, ``app.Table``, ``app.agent``, ``event.ack()``,
``app.producer.flush()``, the app's signals) is used directly where it is needed.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import faust.streams as faust_streams
from faust.types import TP
from faust.types.tuples import ConsumerMessage


@contextmanager
def as_current_event(event: Any) -> Iterator[None]:
    """Make `event` Faust's current event inside the block.

    Relies on: ``faust/streams.py:77``, the contextvar ``_current_event`` (a weak reference to
    the event) that ``current_event()`` (``streams.py:80``) reads and that Faust's own stream
    iteration sets for each event (``streams.py:1312``; the Cython iterator through
    ``Stream._set_current_event``, ``streams.py:1203``).

    Why: a table write takes its changelog partition from the current event
    (``Collection.partition_for_key``, ``tables/base.py:305``; it raises ``TypeError`` without
    one) and the RocksDB store its database (``stores/rocksdb.py:475``). The pipeline writes a
    batch's states after the loop that yielded its events, and releases events held by the
    ordered merge later or from a timer, so it sets the event itself. The caller keeps `event`
    alive (the contextvar holds a weak reference)."""
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


def set_producer_buffer_limit(app: Any, max_messages: int) -> None:
    """Let up to `max_messages` records wait in the producer buffer before streams stall.

    Relies on: ``ProducerBuffer.max_messages`` (``faust/transport/producer.py:30``, a class
    attribute, 100, no setting), read by ``ProducerBuffer.wait_until_ebb``
    (``producer.py:99``), which the conductor awaits before it delivers every fetched message
    (``transport/conductor.py:111``; the compiled handler Faust uses when it is built,
    ``transport/_cython/conductor.pyx:67``): above the limit it flushes up to that many
    records (``flush_atmost``), at most 0.1 s without a send, before the message reaches a
    stream.

    Why: every table write puts its changelog record in this buffer (``Topic.send_soon``). A
    batch writes up to ``batch_max_events`` states, so the default 100 stalled every stream for
    ~70 ms again and again (faust-streaming issue 173)."""
    app.producer.buffer.max_messages = max_messages


def highwater(app: Any, topic: str, partition: int) -> int | None:
    """The offset the next message produced to the partition gets, or None if not known yet.

    Relies on: ``Consumer.highwater`` (``faust/transport/consumer.py:1460``), which the aiokafka
    driver (``transport/drivers/aiokafka.py:1035``) answers from aiokafka's
    ``AIOKafkaConsumer.highwater``: the last fetch response's highwater, ``None`` before the
    first one, and an ``AssertionError`` for a partition not assigned. Not in Faust's documented
    API (``ConsumerT`` declares it, ``types/transports.py:343``).

    Why: the ordered merge waits for a quiet input partition only while it has unread messages
    (``has_more``), and ``/ready`` and the lag gauge count them. A synchronous, in-memory answer
    per call: ``highwaters()`` is a request to the broker."""
    consumer = app.consumer
    if consumer is None:
        return None
    end = consumer.highwater(TP(topic, partition))
    return None if end is None else int(end)


def assigned_partitions(app: Any) -> set[Any]:
    """The topic partitions (``TP``) assigned to this worker now.

    Relies on: ``Consumer.assignment`` (``faust/transport/consumer.py:1456``; aiokafka driver
    ``transport/drivers/aiokafka.py:1031``), which raises ``ConsumerNotStarted`` before the
    consumer thread runs.

    Why: ``/ready`` needs an assignment, and the lag is counted over the assigned input
    partitions (with :func:`highwater`)."""
    consumer = app.consumer
    if consumer is None:
        return set()
    return set(consumer.assignment())


def consumer_generation(app: Any) -> int:
    """The consumer group generation of this worker's current assignment.

    Relies on: ``app.consumer_generation_id`` (``faust/types/app.py:180``), set on every
    assignment by the aiokafka driver (``transport/drivers/aiokafka.py:217``) and stamped on each
    fetched message (``aiokafka.py:290``, see :func:`generation_of`).

    Why: see :func:`generation_of`."""
    return int(app.consumer_generation_id)


def generation_of(message: Any) -> int | None:
    """The consumer generation in which `message` (a ``faust.types.Message``) was fetched.

    Relies on: ``Message.generation_id`` (``faust/types/tuples.py:220``). Faust's own stream
    iteration skips a message whose generation is not the app's (``streams.py:1287``; the Cython
    iterator at ``_cython/streams.pyx:183``).

    Why: the agent collects a batch over several iterations, so a rebalance can happen between
    reading an event and processing it. Its partition may belong to another worker by then, and
    the event is read again by the owner from the committed offset: the batch drops such events
    as Faust would have (compare with :func:`consumer_generation`)."""
    generation: int | None = message.generation_id
    return generation


class DeliveryQueue(Protocol):
    """What the agent uses of the queue between Faust's fetcher and a stream."""

    def empty(self) -> bool: ...


def stream_queue(stream: Any) -> DeliveryQueue:
    """The queue the conductor fills with the messages fetched for `stream`.

    Relies on: ``Channel.queue`` (``faust/channels.py:134``) of the stream's channel (the
    agent's topic, cloned as the stream's iterator, ``app/base.py:1247``); the conductor puts
    each fetched event into it (``transport/conductor.py:140``, compiled
    ``transport/_cython/conductor.pyx:155``) and the stream takes from it (``streams.py:1223``).

    Why: a batch is what the fetcher has already delivered. The agent keeps collecting events
    while this queue is not empty and processes the batch when it is, so it never waits for
    events that are not there."""
    queue: DeliveryQueue = stream.channel.queue
    return queue


def on_changelog_record(table: Any, keep: Callable[[asyncio.Future[Any]], object]) -> None:
    """Call `keep` with the future of each changelog record `table` sends from now on.

    Relies on: ``Collection.send_changelog`` (``faust/tables/base.py:266``), which every table
    write and delete calls (``Table.on_key_set``/``on_key_del``, ``tables/table.py:85`` and
    ``:95``) and which returns the record's ``FutureMessage`` from ``Topic.send_soon``
    (``topics.py:202``); it resolves when the producer's delivery future does
    (``Topic._on_published``, ``topics.py:463``), i.e. when the broker acknowledged the record.
    The method is replaced on the instance, so the wrapper must return the future (``on_key_set``
    reads its partition).

    Why: nothing else tells the writer that its state is durable. The producer buffer's
    ``flush`` gives up after 0.1 s without a send (``transport/producer.py:78``), so the worker
    awaits these futures before a batch's changes leave (``ChangelogAcks`` in ``app.py``)."""
    send = table.send_changelog

    def send_and_keep(*args: Any, **kwargs: Any) -> Any:
        fut = send(*args, **kwargs)
        keep(fut)
        return fut

    table.send_changelog = send_and_keep


def tables_recovered(app: Any) -> bool:
    """True once table recovery has completed (since the worker started).

    Relies on: ``Recovery.completed`` (``faust/tables/recovery.py:182``, an ``asyncio.Event``
    reached as ``app.tables.recovery``, ``tables/manager.py:119``), set when recovery of the
    assigned partitions is done and streams resume (``recovery.py:325`` and ``:657``) and never
    cleared; Faust's worker waits for it the same way (``TableManager.
    wait_until_recovery_completed``, ``tables/manager.py:209``).

    Why: ``/ready`` is 503 until the customer table holds its partitions' state."""
    return bool(app.tables.recovery.completed.is_set())


async def send_raw(
    app: Any, topic: str, key: bytes | None, value: bytes | None
) -> asyncio.Future[Any]:
    """Hand a record to the app's Kafka producer; returns its delivery future.

    Relies on: the aiokafka driver's ``Producer.send(topic, key, value, partition, timestamp,
    headers)`` (``faust/transport/drivers/aiokafka.py:1401``, abstract in
    ``transport/producer.py:198``), which passes the record straight to
    ``AIOKafkaProducer.send`` (default partitioner, murmur2 of the key) and returns aiokafka's
    future for the broker's acknowledgement. Faust flushes this producer before it commits
    offsets (``transport/consumer.py:1073``, ``Producer.flush`` at ``aiokafka.py:1487``).

    Why: ``Topic.send`` wraps every record in a ``FutureMessage`` with callbacks and sensors, a
    measurable cost per output; this skips it while keeping "outputs flushed before offsets
    are committed"."""
    delivery: asyncio.Future[Any] = await app.producer.send(topic, key, value, None, None, None)
    return delivery


def fetch_state(app: Any, tp: Any) -> dict[str, Any]:
    """How Faust's consumer treats one assigned topic partition right now (for a warning when a
    partition with unread messages makes no progress).

    Relies on: ``Consumer._active_partitions``, ``_paused_partitions`` and
    ``_buffered_partitions`` (``faust/transport/consumer.py:442``): the fetcher asks aiokafka
    only for active partitions (``_wait_next_records``, ``consumer.py:795``); a partition leaves
    the active set while paused (recovery, ``pause_partitions``, ``:622``) or while the stream's
    queue is under pressure (``on_buffer_full``, ``:547``, until ``on_buffer_drop``); and
    ``Consumer._read_offset``/``_committed_offset`` (``:414``), what Faust has read and
    committed. ``flow_active`` (``:446``) is False while a rebalance stops the flow.

    Why: an operator (and a test) must be able to tell "Faust stopped fetching this partition"
    from "the pipeline holds its events"."""
    consumer = app.consumer
    if consumer is None:
        return {}
    active = consumer._active_partitions
    return {
        "active": None if active is None else tp in active,
        "paused": tp in consumer._paused_partitions,
        "buffered": tp in consumer._buffered_partitions,
        "read_offset": consumer._read_offset.get(tp),
        "committed": consumer._committed_offset.get(tp),
        "flow_active": bool(consumer.flow_active),
        "in_recovery": bool(getattr(app, "in_recovery", False)),
        "callback": tp in getattr(app.topics, "_tp_to_callback", {}),
        **_aiokafka_state(consumer, tp),
    }


def _aiokafka_state(consumer: Any, tp: Any) -> dict[str, Any]:
    """aiokafka's own view of the partition, best effort (it lives in Faust's consumer thread:
    ``drivers/aiokafka.py``, ``Consumer._thread._consumer``; aiokafka 0.14's
    ``SubscriptionState`` and ``Fetcher._records``)."""
    try:
        kafka = consumer._thread._consumer
        state = kafka._subscription.subscription.assignment.state_value(tp)
        buffered = kafka._fetcher._records.get(tp)
        records = getattr(buffered, "_partition_records", None)
        return {
            "kafka_position": state._position,
            "kafka_status": str(state._status),
            "kafka_paused": state.paused,
            "kafka_highwater": state.highwater,
            "kafka_buffered": type(buffered).__name__ if buffered is not None else None,
            "kafka_buffered_next": getattr(records, "next_fetch_offset", None),
        }
    except Exception as exc:  # diagnostics only: never fail the caller
        return {"kafka_state": f"unavailable: {type(exc).__name__}: {exc}"}


def rewind_uncommitted_partitions(app: Any, topics: Collection[str]) -> None:
    """Make every seek "to the committed offsets" also rewind the partitions of `topics` that
    have none (or 0) to their beginning, as ``auto_offset_reset="earliest"`` promises.

    Relies on: ``Consumer.seek_to_committed`` (``faust/transport/consumer.py:1441``, the
    thread-delegating consumer the aiokafka driver uses), which ``Consumer.perform_seek``
    (``consumer.py:565``) awaits after every recovery, before streams resume
    (``tables/recovery.py:306``, ``_resume_streams``), and which ends in aiokafka's
    ``AIOKafkaConsumer.seek_to_committed`` (``aiokafka/consumer/consumer.py:864``): it seeks only
    ``if offset and offset > 0``, and Faust keeps no read offset for those
    (``perform_seek``: ``offset if offset else None``). The driver's
    ``AIOKafkaConsumerThread.seek_to_beginning`` (``drivers/aiokafka.py:1003``) runs aiokafka's
    in the consumer thread.

    Why: Faust drops records aiokafka already returned (and moved its position past) when a
    rebalance starts while they are handed over (``Consumer.getmany``, ``consumer.py:740``:
    the generation changed, or the partition is not active), trusting that seek to rewind.
    For a partition taken over from a worker that was killed before its first commit, the
    seek did nothing: the new owner never read those messages (the stall and loss noted on
    issue 14, reproduced with a diagnostic: aiokafka's position at the highwater, nothing
    read)."""
    consumer = app.consumer
    seek_to_committed = consumer.seek_to_committed
    wanted = set(topics)

    async def seek_to_committed_or_beginning() -> Any:
        committed = await seek_to_committed()
        fresh = [tp for tp, offset in committed.items() if not offset and tp.topic in wanted]
        if fresh:
            await consumer._thread.seek_to_beginning(*fresh)
        return committed

    consumer.seek_to_committed = seek_to_committed_or_beginning


def event_for_record(
    app: Any,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    timestamp_s: float,
) -> Any:
    """A Faust event for a record read from the log by another consumer (one Faust never
    handed over): acking it acks its offset in Faust's consumer like any event's, and table
    writes under it go to its partition.

    Relies on: ``ConsumerMessage`` (``faust/types/tuples.py:270``), whose final ack calls
    ``Consumer.ack`` (``transport/consumer.py:825``: the offset joins the acked offsets Faust
    commits from, if not below the committed one); ``App.create_event``
    (``app/base.py:1543``), the constructor Faust's channels use for every event; table writes
    read ``event.message.partition`` (``tables/base.py:305``, ``stores/rocksdb.py:475``). The
    message carries the app's consumer generation, as the fetcher stamps it
    (``drivers/aiokafka.py:290``).

    Why: Faust sometimes never hands some messages of a partition to the stream (seen after a
    takeover) and would commit past them; the worker reads them itself, processes them where
    they belong and acks them through Faust (``SkippedReader`` in ``app.py``)."""
    message = ConsumerMessage(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=timestamp_s,
        timestamp_type=0,
        headers=None,
        key=key,
        value=value,
        checksum=None,
        generation_id=app.consumer_generation_id,
    )
    return app.create_event(key, value, None, message)


def committed_offset(app: Any, topic: str, partition: int) -> int:
    """The offset Faust's consumer began reading an assigned partition from: its committed
    offset, or 0 if it has none (reading then begins at the partition's start; an offset below
    the log's start is simply not there).

    Relies on: ``Consumer._committed_offset`` (``faust/transport/consumer.py:417``, a
    ``defaultdict`` of None), which ``perform_seek`` (``:565``) fills from the broker at every
    assignment, before streams resume (0 and "none" both stored as None), and every commit
    updates.

    Why: a first message above it means Faust skipped the messages between (seen after a
    takeover, and then committed past); the pipeline reads them itself before going on."""
    consumer = app.consumer
    offset = consumer._committed_offset.get(TP(topic, partition))
    return int(offset) if offset else 0
