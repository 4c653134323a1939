"""Each Faust internal the worker relies on (``stream_app.live.faust_internals``) still exists and
still behaves as the worker needs, checked against a real ``faust.App`` (``memory://`` tables, no
broker). faust-streaming is pinned in pyproject.toml for these tests: when an upgrade moves one of
the internals, the test of that internal fails here.

No broker means no producer or consumer started. Where a test needs the step a broker would take
(the producer's ``send`` accepting a record, aiokafka's consumer holding an assignment), it puts
in the smallest stand-in for that step and leaves everything above it to Faust.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import aiokafka
import aiokafka.consumer.fetcher
import faust
import faust.streams as faust_streams
import pytest
from aiokafka.consumer.fetcher import OffsetResetStrategy
from aiokafka.structs import ConsumerRecord
from faust.events import Event
from faust.types import TP, Message
from faust.types.tuples import RecordMetadata

from stream_app.live import faust_internals


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Any]:
    app = faust.App(
        f"internals-{uuid.uuid4().hex[:8]}",
        store="memory://",
        datadir=str(tmp_path),
        web_enabled=False,
    )
    yield app
    if app.producer.buffer.state == "running":
        with contextlib.suppress(RuntimeError):  # records a failed test left unsent
            await app.producer.buffer.stop()


def raw_topic(app: Any, name: str | None = None) -> Any:
    name = name or f"in-{uuid.uuid4().hex[:8]}"
    return app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )


def message(
    app: Any, topic: str, offset: int, partition: int = 0, generation: int | None = None
) -> Message:
    """A message as the consumer hands it to the conductor."""
    return Message(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=time.time(),
        timestamp_type=0,
        headers=None,
        key=b"k",
        value=b"v",
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=1,
        generation_id=app.consumer_generation_id if generation is None else generation,
    )


def event(app: Any, msg: Message) -> Event:
    return Event(app, msg.key, msg.value, {}, msg)


class Broker:
    """Stands in for aiokafka below Faust's producer: ``Producer.send`` accepts a record once
    `accepting` is set and returns the record's delivery future, which the test resolves."""

    def __init__(self, app: Any) -> None:
        self.accepting = asyncio.Event()
        self.accepting.set()
        self.records: list[tuple[str, bytes | None, bytes | None, asyncio.Future[Any]]] = []
        app.producer.send = self.send

        async def started_producer() -> Any:  # the producer would connect to a broker
            return app.producer

        app.maybe_start_producer = started_producer

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, *args: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        await self.accepting.wait()
        delivery: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.records.append((topic, key, value, delivery))
        return delivery

    def acknowledge(self) -> None:
        for n, (topic, _, _, delivery) in enumerate(self.records):
            if not delivery.done():
                delivery.set_result(RecordMetadata(topic, 0, TP(topic, 0), n))


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("not there in time")
        await asyncio.sleep(0.001)


async def test_the_current_event_is_what_table_writes_take_their_partition_from(app: Any) -> None:
    """``faust.streams._current_event``: the contextvar Faust's stream iteration sets and
    ``current_event()`` reads; a table write outside stream iteration needs it set."""
    assert isinstance(faust_streams._current_event, ContextVar)
    table = app.Table("t", key_type=bytes, value_type=bytes, partitions=4)
    changelog: list[Any] = []
    app.producer.send_soon = changelog.append
    outer = event(app, message(app, "in", 7, partition=3))
    inner = event(app, message(app, "in", 8, partition=1))

    assert faust_streams.current_event() is None
    with pytest.raises(TypeError, match="outside of stream iteration"):
        table[b"a"] = b"1"
    with faust_internals.as_current_event(outer):
        assert faust_streams.current_event() is outer
        table[b"a"] = b"1"
        with faust_internals.as_current_event(inner):
            assert faust_streams.current_event() is inner
            table[b"b"] = b"2"
        assert faust_streams.current_event() is outer
    assert faust_streams.current_event() is None
    assert [(f.message.key, f.message.partition) for f in changelog] == [(b"a", 3), (b"b", 1)]

    # Faust's own stream iteration sets the same contextvar for every event it yields.
    seen: list[bool] = []

    async def agent(stream: Any) -> None:
        async for ev in stream.noack().events():
            reference = faust_streams._current_event.get(None)
            seen.append(reference is not None and reference() is ev)

    worker = app.agent(raw_topic(app), name="current")(agent)
    async with worker.test_context() as test:
        await test.stream().channel.put(event(app, message(app, "in", 0)))
        await until(lambda: bool(seen))
    assert seen == [True]


async def test_the_producer_buffer_limit_is_what_stalls_streams(app: Any) -> None:
    """``ProducerBuffer.max_messages``: the conductor delivers no fetched message while more
    records than that wait in the producer buffer (until it has sent that many, or 0.1 s)."""
    assert type(app.producer.buffer).max_messages == 100  # Faust's default, no setting for it
    broker = Broker(app)
    broker.accepting.clear()  # the producer takes one record and waits for the broker
    table = app.Table("t", key_type=bytes, value_type=bytes, partitions=1)
    topic = raw_topic(app)
    stream = topic.stream()
    app.flow_control.resume()
    deliver = app.topics._build_handler(TP(topic.get_topic_name(), 0), {stream.channel})
    queue: Any = faust_internals.stream_queue(stream)  # an asyncio queue: counted here
    await app.producer.buffer.start()
    with faust_internals.as_current_event(event(app, message(app, "in", 0))):
        for n in range(4):
            table[b"k%d" % n] = b"v"
    await until(lambda: app.producer.buffer.size == 3)  # one record is with the producer

    faust_internals.set_producer_buffer_limit(app, 3)
    assert app.producer.buffer.max_messages == 3
    await asyncio.wait_for(deliver(message(app, topic.get_topic_name(), 0)), 0.05)
    assert queue.qsize() == 1  # at the limit: delivered at once

    faust_internals.set_producer_buffer_limit(app, 2)
    delivering = asyncio.ensure_future(deliver(message(app, topic.get_topic_name(), 1)))
    await asyncio.sleep(0.03)
    assert not delivering.done() and queue.qsize() == 1  # above it: the stream waits
    broker.accepting.set()
    await asyncio.wait_for(delivering, 1.0)
    assert queue.qsize() == 2
    assert app.producer.buffer.size <= 2


async def test_highwater_is_the_next_offset_from_the_last_fetch_or_none(app: Any) -> None:
    """``Consumer.highwater``/``assignment``: answered in memory by aiokafka's consumer, None
    for an assigned partition before its first fetch response."""
    tp = aiokafka.TopicPartition("in", 0)
    kafka_consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers="localhost:1")
    kafka_consumer.assign([tp])  # what the consumer thread holds after a rebalance
    app.consumer._thread._consumer = kafka_consumer
    try:
        assert faust_internals.assigned_partitions(app) == {TP("in", 0)}
        assert faust_internals.highwater(app, "in", 0) is None
        # A fetch response records the partition's highwater (aiokafka's fetcher does this).
        kafka_consumer._subscription.subscription.assignment.state_value(tp).highwater = 42
        assert faust_internals.highwater(app, "in", 0) == 42
        with pytest.raises(AssertionError, match="not assigned"):
            faust_internals.highwater(app, "in", 1)
    finally:
        app.consumer._thread._consumer = None
        await kafka_consumer.stop()


class FetcherWithoutBroker:
    """aiokafka's ``Fetcher`` positioning methods, without its background fetch routine (which
    needs a broker): what ``seek_to_committed`` and ``seek_to_beginning`` call."""

    seek_to = aiokafka.consumer.fetcher.Fetcher.seek_to
    request_offset_reset = aiokafka.consumer.fetcher.Fetcher.request_offset_reset
    _notify = aiokafka.consumer.fetcher.Fetcher._notify

    def __init__(self, subscriptions: Any) -> None:
        self._subscriptions = subscriptions
        self._records: dict[Any, Any] = {}
        self._wait_consume_future = None

    async def close(self) -> None:
        """Nothing runs in the background."""


async def test_a_seek_to_committed_offsets_rewinds_uncommitted_input_partitions(app: Any) -> None:
    """``Consumer.perform_seek`` (run by Faust after every recovery, before streams resume)
    seeks through ``Consumer.seek_to_committed`` to aiokafka's, which moves a partition only
    when its committed offset is above 0: one whose records Faust dropped stayed past them.
    With the rewind installed, an input partition with no committed offset (or 0) is reset to
    its beginning, one with a committed offset goes there, and other topics are left alone."""
    from aiokafka.consumer.subscription_state import PartitionStatus
    from aiokafka.structs import TopicPartition

    fresh, zero, done = TopicPartition("in", 0), TopicPartition("in", 1), TopicPartition("in", 2)
    other = TopicPartition("other", 0)
    committed: dict[TopicPartition, int | None] = {fresh: None, zero: 0, done: 5, other: None}
    kafka_consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers="localhost:1", group_id="g")
    kafka_consumer.assign(list(committed))
    kafka_consumer._fetcher = FetcherWithoutBroker(kafka_consumer._subscription)
    kafka_consumer._coordinator = types.SimpleNamespace(check_errors=lambda: None)  # no errors
    state = kafka_consumer._subscription.subscription.assignment.state_value
    for tp in committed:
        state(tp).seek(100)  # where the fetcher was: past records Faust dropped

    async def committed_offset(tp: TopicPartition) -> int | None:  # the broker's answer
        return committed[tp]

    async def in_this_loop(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await method(*args, **kwargs)  # what the consumer thread would run

    kafka_consumer.committed = committed_offset
    thread = app.consumer._thread
    thread._consumer, thread.call_thread = kafka_consumer, in_this_loop
    try:
        faust_internals.rewind_uncommitted_partitions(app, ["in"])
        seek = asyncio.ensure_future(app.consumer.perform_seek())
        await asyncio.sleep(0.05)  # aiokafka waits for its fetcher's reset (ListOffsets)
        assert state(done)._position == 5 and state(other)._position == 100
        for tp in (fresh, zero):
            assert state(tp)._status is PartitionStatus.AWAITING_RESET
            assert state(tp)._reset_strategy == OffsetResetStrategy.EARLIEST
            state(tp).reset_to(0)  # the broker's earliest offset, as the fetcher would set it
        await asyncio.wait_for(seek, 5)
        assert not faust_internals.fetch_state(app, TP("in", 0))["committed"]
    finally:
        thread._consumer, kafka_consumer._coordinator = None, None
        await kafka_consumer.stop()


async def test_messages_carry_the_generation_they_were_fetched_in(app: Any) -> None:
    """``Message.generation_id`` / ``app.consumer_generation_id``: the consumer stamps each
    fetched message with the app's generation, and Faust's stream skips a message of an older
    one, as the agent's batch does."""
    app.consumer_generation_id = 5
    record = ConsumerRecord("in", 0, 3, 1_000, 0, b"k", b"v", None, 1, 1, ())
    fetched = app.consumer._to_message(TP("in", 0), record)
    assert faust_internals.generation_of(fetched) == 5 == faust_internals.consumer_generation(app)
    app.consumer_generation_id = 6  # a rebalance assigned partitions again
    assert faust_internals.generation_of(fetched) != faust_internals.consumer_generation(app)

    seen: list[int] = []

    async def agent(stream: Any) -> None:
        async for ev in stream.noack().events():
            seen.append(ev.message.offset)

    worker = app.agent(raw_topic(app), name="generations")(agent)
    async with worker.test_context() as test:
        channel = test.stream().channel
        await channel.put(event(app, message(app, "in", 0, generation=5)))
        await channel.put(event(app, message(app, "in", 1, generation=6)))
        await until(lambda: bool(seen))
        await asyncio.sleep(0.01)
    assert seen == [1]


async def test_the_stream_queue_is_where_fetched_messages_wait_for_the_stream(app: Any) -> None:
    """``stream.channel.queue``: the conductor puts a fetched message there and the stream takes
    it from there, so an empty queue means nothing fetched is waiting."""
    topic = raw_topic(app)
    stream = topic.stream()
    app.flow_control.resume()
    queue = faust_internals.stream_queue(stream)
    assert queue.empty()
    deliver = app.topics._build_handler(TP(topic.get_topic_name(), 0), {stream.channel})
    await deliver(message(app, topic.get_topic_name(), 0))
    assert not queue.empty()

    async def first() -> Any:
        async for ev in stream.events():
            return ev
        return None

    try:
        taken = await asyncio.wait_for(first(), 1.0)
    finally:
        await stream.stop()
    assert taken.message.offset == 0
    assert queue.empty()


async def test_a_changelog_future_resolves_when_the_broker_acknowledges(app: Any) -> None:
    """``Collection.send_changelog``: called by every table write and delete, it returns the
    record's future, which resolves once the producer's delivery future does."""
    broker = Broker(app)
    table = app.Table("t", key_type=bytes, value_type=bytes, partitions=1)
    kept: list[asyncio.Future[Any]] = []
    faust_internals.on_changelog_record(table, kept.append)
    await app.producer.buffer.start()
    with faust_internals.as_current_event(event(app, message(app, "in", 0))):
        table[b"a"] = b"1"
        del table[b"a"]
    assert len(kept) == 2
    await until(lambda: len(broker.records) == 2)  # the buffer handed both to the producer
    changelog = table.changelog_topic.get_topic_name()
    assert [(t, k, v) for t, k, v, _ in broker.records] == [
        (changelog, b"a", b"1"),
        (changelog, b"a", None),
    ]
    await asyncio.sleep(0.01)
    assert not any(fut.done() for fut in kept)  # sent, not yet acknowledged
    broker.acknowledge()
    await asyncio.wait_for(asyncio.gather(*kept), 1.0)
    assert [fut.result().offset for fut in kept] == [0, 1]


async def test_recovery_completed_is_set_when_recovery_is_done(app: Any) -> None:
    """``app.tables.recovery.completed``: an asyncio.Event, unset until the table recovery of
    the assignment has completed; Faust's worker waits for the same one."""
    recovery = app.tables.recovery
    assert isinstance(recovery.completed, asyncio.Event)
    assert "self.recovery.completed" in inspect.getsource(
        type(app.tables).wait_until_recovery_completed
    )
    assert not faust_internals.tables_recovered(app)
    app.consumer.assignment = set  # recovered with nothing assigned: no broker involved

    async def fetcher_started() -> None:
        return None

    app._fetcher.maybe_start = fetcher_started
    await recovery.on_recovery_completed(app.consumer_generation_id)
    assert faust_internals.tables_recovered(app)


async def test_a_raw_send_goes_straight_to_aiokafka_and_is_flushed_before_a_commit(
    app: Any,
) -> None:
    """``Producer.send``: the record goes to aiokafka's ``send`` as is (no FutureMessage, no
    buffer) and the result is aiokafka's delivery future; Faust flushes that producer before
    it commits offsets."""
    order: list[str] = []

    class KafkaProducer:  # aiokafka's AIOKafkaProducer as far as Faust's producer uses it
        def __init__(self) -> None:
            self.sent: list[tuple[Any, ...]] = []
            self.delivery: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def send(self, topic: str, value: Any, **kwargs: Any) -> asyncio.Future[Any]:
            self.sent.append((topic, value, kwargs))
            return self.delivery

        async def flush(self) -> None:
            order.append("flush")

    kafka_producer = KafkaProducer()
    app.producer._producer = kafka_producer
    delivery = await faust_internals.send_raw(app, "out", b"k", b"v")
    assert delivery is kafka_producer.delivery
    assert kafka_producer.sent == [
        ("out", b"v", {"key": b"k", "partition": None, "timestamp_ms": None, "headers": None})
    ]
    assert app.producer.buffer.size == 0

    async def commit(offsets: Any) -> bool:
        order.append("commit")
        return True

    app.consumer.assignment = lambda: {TP("in", 0)}
    app.consumer._commit = commit
    assert await app.consumer._commit_offsets({TP("in", 0): 5})
    assert order == ["flush", "commit"]


async def test_the_committed_offset_is_where_reading_of_a_partition_began(app: Any) -> None:
    """``Consumer._committed_offset``: filled by ``perform_seek`` at every assignment (0 and
    absent both mean the partition's start: offset 0)."""
    offsets = app.consumer._committed_offset
    offsets[TP("in", 0)] = 7
    offsets[TP("in", 1)] = 0
    assert faust_internals.committed_offset(app, "in", 0) == 7
    assert faust_internals.committed_offset(app, "in", 1) == 0
    assert faust_internals.committed_offset(app, "in", 2) == 0
    assert "_committed_offset" in inspect.getsource(type(app.consumer).perform_seek)


async def test_an_event_for_a_record_read_elsewhere_acks_and_writes_like_a_fetched_one(
    app: Any,
) -> None:
    """``ConsumerMessage`` + ``App.create_event``: an event made for a record the worker read
    itself goes through Faust's own ack (its offset joins those Faust commits from, unless below
    the committed offset), and table writes under it go to its partition."""
    app.topics.add(raw_topic(app, "in"))
    await app.topics._update_indices()  # what a subscription does (the conductor's indices)
    assert app.topics.acks_enabled_for("in")
    app.consumer_generation_id = 4
    made = faust_internals.event_for_record(app, "in", 2, 41, b"k", b"v", 1_700_000_000.0)
    assert (made.key, made.value, made.message.offset, made.message.tp) == (
        b"k",
        b"v",
        41,
        TP("in", 2),
    )
    assert faust_internals.generation_of(made.message) == 4

    table = app.Table("t", key_type=bytes, value_type=bytes, partitions=4)
    changelog: list[Any] = []
    app.producer.send_soon = changelog.append
    with faust_internals.as_current_event(made):
        table[b"a"] = b"1"
    assert [f.message.partition for f in changelog] == [2]

    consumer = app.consumer
    consumer._committed_offset[TP("in", 2)] = 40
    assert made.ack() is True and made.ack() is False  # once
    assert list(consumer._acked[TP("in", 2)]) == [41]
    below = faust_internals.event_for_record(app, "in", 2, 39, b"k", b"v", 0.0)
    assert below.ack() is False  # below the committed offset: Faust ignores it
    assert consumer._new_offset(TP("in", 2)) == 42  # what Faust commits next
