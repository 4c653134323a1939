"""The Faust agent itself, driven by Faust's test context (``agent.test_context()``): no broker.

What a broker would add is delivery, and the integration tests cover that. Here the agent gets
messages through the test context's channel, with the table on Faust's ``memory://`` store (the
worker's RocksDB store is the same Table API). The producer is not started in a test context, so
its ``send`` is replaced by a recorder that acknowledges at once, as Faust's testing guide does
for topic sends. The consumer's highwater is set to what was put so far: caught up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from faust.events import Event
from faust.types import TP, Message

from stream_app.core.state import CustomerState
from stream_app.live.app import CUSTOMERS_TABLE, create_app
from stream_app.live.store import decode_record
from stream_app.settings import Settings

T0 = "2024-03-01T12:00:00+00:00"


def click(customer: str, event_id: str, minute: int, event_type: str = "product_view") -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "customer_id": customer,
            "event_time": f"2024-03-01T12:{minute:02d}:00+00:00",
            "event_type": event_type,
        }
    )


class Harness:
    """Puts raw messages into the agent's test channel as the fetcher would hand them over."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        name = f"unit-{uuid.uuid4().hex[:8]}"
        # Learning in process: no trainer runs here (it reads the examples topic from a broker);
        # shared learning through the pipeline is test_epoch_learning's, on Kafka the
        # integration tests'.
        self.settings = Settings(state_dir=tmp_path, partitions=1, learning="in_process").renamed(
            name, **overrides
        )
        self.app = create_app(self.settings, store="memory://")
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.offsets: dict[str, int] = {}
        self.messages: list[Message] = []
        self.app.producer.send = self._send  # not started in a test context
        self.app.producer.send_soon = self._send_soon  # table changelog records
        self.changelog: list[tuple[bytes | None, bytes | None]] = []
        self.app.consumer.highwater = lambda tp: self.offsets.get(tp.topic, 0)  # caught up

    @property
    def acked(self) -> list[tuple[str, int]]:
        return [(m.topic, m.offset) for m in self.messages if m.acked]

    async def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
    ) -> asyncio.Future[None]:
        self.sent.append((topic, key, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def _send_soon(self, fut: Any) -> None:
        """The broker acknowledges a changelog record at once (the worker waits for that)."""
        self.changelog.append((fut.message.key, fut.message.value))
        fut.set_result(None)

    @property
    def agent(self) -> Any:
        return self.app.agents[next(name for name in self.app.agents if "segment" in name)]

    async def put(self, channel: Any, topic: str, key: bytes, value: bytes) -> None:
        offset = self.offsets.get(topic, 0)
        self.offsets[topic] = offset + 1
        message = Message(
            topic=topic,
            partition=0,
            offset=offset,
            timestamp=time.time(),
            timestamp_type=0,
            headers=None,
            key=key,
            value=value,
            checksum=None,
            serialized_key_size=len(key),
            serialized_value_size=len(value),
            generation_id=self.app.consumer_generation_id,
        )
        self.messages.append(message)
        await channel.put(Event(self.app, key, value, {}, message))

    def changes(self) -> list[dict[str, Any]]:
        topic = self.settings.segment_changes_topic
        return [orjson.loads(value) for t, _, value in self.sent if t == topic and value]

    def state(self, customer: str) -> CustomerState:
        return decode_record(self.app.tables[CUSTOMERS_TABLE][customer.encode()])[0]

    def applied_offsets(self, customer: str) -> dict[str, int]:
        return decode_record(self.app.tables[CUSTOMERS_TABLE][customer.encode()])[1].offsets


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("the agent did not get there in time")
        await asyncio.sleep(0.01)


async def test_agent_applies_events_to_the_table_sends_changes_and_acks(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    clicks = h.settings.clickstream_topic
    async with h.agent.test_context() as agent:
        channel = agent.stream().channel
        for i in range(6):
            customer = f"c{i % 2}"
            await h.put(channel, clicks, customer.encode(), click(customer, f"e{i}", i))
        await h.put(channel, clicks, b"x", b"{not json")
        await until(lambda: len(h.acked) == 7)

    pipeline = h.app.pipeline
    assert pipeline.counts.snapshot()["events"] == {"product_view": 6}
    assert pipeline.counts.snapshot()["dead_letters"] == {"invalid_json": 1}
    # Table state: every event applied once, with the offset it came from.
    for customer, last in (("c0", 4), ("c1", 5)):
        state = h.state(customer)
        assert len(state.recent_ids) == 3  # one id per applied event
        assert h.applied_offsets(customer) == {clicks: last}
        assert state.sequence == 1
    # Outputs: one entry change per customer (and its membership record), one dead letter.
    changes = h.changes()
    assert sorted((c["customer_id"], c["component"], c["sequence"]) for c in changes) == [
        ("c0", "entry", 1),
        ("c1", "entry", 1),
    ]
    membership = [v for t, _, v in h.sent if t == h.settings.segment_membership_topic]
    assert len(membership) == 2
    letters = [orjson.loads(v or b"") for t, _, v in h.sent if t == h.settings.dead_letters_topic]
    assert [(d["reason"], d["source_offset"]) for d in letters] == [("invalid_json", 6)]
    assert sorted(h.acked) == [(clicks, offset) for offset in range(7)]


async def test_a_redelivered_message_is_not_applied_twice(tmp_path: Path) -> None:
    """At-least-once: after a crash or a rebalance the consumer re-reads from the last
    committed offset, and the state recognises what it applied already. Within one assignment
    a copy of an offset read already is not even processed again."""
    h = Harness(tmp_path)
    clicks = h.settings.clickstream_topic
    pipeline = h.app.pipeline
    async with h.agent.test_context() as agent:
        channel = agent.stream().channel
        await h.put(channel, clicks, b"c0", click("c0", "e0", 0))
        await h.put(channel, clicks, b"c0", click("c0", "e1", 1))
        await until(lambda: len(h.acked) == 2)
        before = h.state("c0").to_bytes()
        h.offsets[clicks] = 1  # offset 1 again within the assignment
        await h.put(channel, clicks, b"c0", click("c0", "e1", 1))
        await until(lambda: len(h.acked) == 3)
        assert pipeline.metrics.duplicates._value.get() == 0  # dropped by its offset
        # A rebalance that hands partition 0 back, committed at offset 1 (e1 was not).
        await pipeline.revoke({0})
        pipeline.assign({0})
        h.app.consumer._committed_offset[TP(clicks, 0)] = 1
        h.offsets[clicks] = 1
        await h.put(channel, clicks, b"c0", click("c0", "e1", 1))
        await until(lambda: len(h.acked) == 4)

    assert h.state("c0").to_bytes() == before
    assert pipeline.metrics.duplicates._value.get() == 1  # the state knew it
    assert len(h.changes()) == 1


async def test_events_of_both_topics_reach_the_table_in_event_time_order(tmp_path: Path) -> None:
    """The agent's ordered merge over the two inputs, through Faust: a transaction read before
    older clicks is applied after them (the clicks are not late events)."""
    h = Harness(tmp_path, segmentation={"allowed_lateness_seconds": 0})
    clicks, txs = h.settings.clickstream_topic, h.settings.transactions_topic
    purchase = orjson.dumps(
        {
            "event_id": "p1",
            "customer_id": "c0",
            "event_time": "2024-03-01T12:30:00+00:00",
            "event_type": "purchase",
            "order_id": "o1",
            "amount": "10.00",
            "currency": "EUR",
        }
    )
    h.offsets[clicks] = 0
    async with h.agent.test_context() as agent:
        channel = agent.stream().channel
        # The clicks topic still has two unread messages when the transaction arrives.
        h.app.consumer.highwater = lambda tp: {clicks: 2, txs: 1}[tp.topic]
        await h.put(channel, txs, b"c0", purchase)
        await h.put(channel, clicks, b"c0", click("c0", "k1", 1))
        await h.put(channel, clicks, b"c0", click("c0", "k2", 2))
        await until(lambda: len(h.acked) == 3)

    assert h.app.pipeline.counts.snapshot()["dead_letters"] == {}
    state = h.state("c0")
    assert len(state.recent_ids) == 3  # one id per applied event
    assert h.applied_offsets("c0") == {clicks: 1, txs: 0}


async def test_a_change_leaves_only_after_the_broker_acknowledged_its_state(
    tmp_path: Path,
) -> None:
    """Faust's producer buffer would send the changelog record some time later; the worker
    keeps each record's future and sends the batch's changes only once all are resolved."""
    h = Harness(tmp_path)
    held: list[Any] = []
    h.app.producer.send_soon = held.append  # the broker has not acknowledged them yet
    clicks = h.settings.clickstream_topic
    async with h.agent.test_context() as agent:
        channel = agent.stream().channel
        await h.put(channel, clicks, b"c0", click("c0", "e0", 0))
        await until(lambda: len(held) >= 1)
        await asyncio.sleep(0.2)
        assert h.changes() == [] and h.acked == []
        for fut in held:
            fut.set_result(None)
        await until(lambda: len(h.acked) == 1)
        # And every batch after the first (the waiter once kept a stale list and waited for
        # nothing from the second batch on).
        first = len(held)
        await h.put(channel, clicks, b"c1", click("c1", "e1", 1))
        await until(lambda: len(held) >= first + 1)
        await asyncio.sleep(0.2)
        assert [c["customer_id"] for c in h.changes()] == ["c0"] and len(h.acked) == 1
        for fut in held[first:]:
            fut.set_result(None)
        await until(lambda: len(h.acked) == 2)
    assert [c["customer_id"] for c in h.changes()] == ["c0", "c1"]
    # Each batch's states, its marker and its example records (for restarts, under their own
    # keys; the acknowledged ones deleted).
    for customer, futs in ((b"c0", held[:first]), (b"c1", held[first:])):
        keys = {fut.message.key for fut in futs}
        assert {customer, b"\x00delivery:0"} <= keys
        assert all(
            k.startswith(b"\x00delivery:0/examples/") for k in keys - {customer, b"\x00delivery:0"}
        )
