"""The live step without Faust: decode -> processor -> outputs, dead letters, crash recovery."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from stream_app.events import DeadLetterReason, MessageOrigin
from stream_app.pipeline import LivePipeline
from stream_app.processor import CustomerState
from stream_app.settings import Settings

T0 = datetime(2024, 3, 1, tzinfo=UTC)
CLICKS = "clickstream"


class BytesStore:
    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data

    def get(self, customer_id: str) -> CustomerState | None:
        raw = self.data.get(customer_id)
        return None if raw is None else CustomerState.from_bytes(raw)

    def put(self, state: CustomerState) -> None:
        self.data[state.customer_id] = state.to_bytes()

    def delete(self, customer_id: str) -> None:
        self.data.pop(customer_id, None)

    def __iter__(self) -> Iterator[CustomerState]:
        return iter([CustomerState.from_bytes(raw) for raw in self.data.values()])


class ListSinks:
    """Records outputs; `deliver=False` simulates sends that die with the process (SIGKILL)."""

    def __init__(self, deliver: bool = True) -> None:
        self.deliver = deliver
        self.changes: list[dict[str, Any]] = []
        self.memberships: list[dict[str, Any]] = []
        self.dead_letters: list[dict[str, Any]] = []

    async def change(self, customer_id: str, value: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.deliver:
            self.changes.append(orjson.loads(value))
            fut.set_result(None)
        return fut

    async def membership(self, customer_id: str, value: bytes) -> None:
        if self.deliver:
            self.memberships.append(orjson.loads(value))

    async def dead_letter(self, key: bytes | None, value: bytes) -> None:
        self.dead_letters.append(orjson.loads(value))


def message(customer: str, minute: int, event_type: str = "product_view") -> bytes:
    return orjson.dumps(
        {
            "event_id": f"{customer}-{minute}",
            "customer_id": customer,
            "event_time": (T0 + timedelta(minutes=minute)).isoformat(),
            "event_type": event_type,
        }
    )


def pipeline_factory(data: dict[str, bytes], sinks: ListSinks) -> LivePipeline:
    return LivePipeline(
        Settings(state_dir="/nonexistent"),  # type: ignore[arg-type]
        lambda partition: BytesStore(data),
        sinks,
        clock=lambda: T0 + timedelta(days=1),
    )


async def feed(p: LivePipeline, items: list[tuple[int, bytes]]) -> None:
    for offset, value in items:
        await p.handle(b"k", value, MessageOrigin(topic=CLICKS, partition=0, offset=offset))


async def test_malformed_messages_become_dead_letters_and_processing_continues() -> None:
    sinks = ListSinks()
    p = pipeline_factory({}, sinks)
    bad = [b"{nope", b'{"event_type": "teleport"}', orjson.dumps({"event_type": "search"})]
    await feed(
        p, [(0, message("a", 0)), (1, bad[0]), (2, bad[1]), (3, bad[2]), (4, message("b", 1))]
    )
    reasons = [d["reason"] for d in sinks.dead_letters]
    assert reasons == ["invalid_json", "unknown_type", "invalid_field"]
    assert [
        (d["source_topic"], d["source_partition"], d["source_offset"]) for d in sinks.dead_letters
    ] == [
        (CLICKS, 0, 1),
        (CLICKS, 0, 2),
        (CLICKS, 0, 3),
    ]
    assert base64.b64decode(sinks.dead_letters[0]["payload_b64"]) == b"{nope"
    assert base64.b64decode(sinks.dead_letters[0]["key_b64"]) == b"k"
    assert [c["customer_id"] for c in sinks.changes] == ["a", "b"]
    assert [m["change_id"] for m in sinks.memberships] == [c["change_id"] for c in sinks.changes]
    assert sinks.memberships[0]["segment_name"].endswith("/unscored/new")


async def test_late_event_is_dead_lettered_with_reason() -> None:
    sinks = ListSinks()
    p = pipeline_factory({}, sinks)
    await feed(p, [(0, message("a", 0)), (1, message("a", 60)), (2, message("b", 30))])
    assert [d["reason"] for d in sinks.dead_letters] == [DeadLetterReason.LATE_EVENT.value]
    assert "watermark" in sinks.dead_letters[0]["detail"]


async def test_processing_error_is_dead_lettered_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sinks = ListSinks()
    p = pipeline_factory({}, sinks)

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(p.models.clusters, "learn_assign", explode)
    await feed(p, [(0, message("a", 0))])
    assert [d["reason"] for d in sinks.dead_letters] == ["processing_error"]
    assert "RuntimeError: disk on fire" in sinks.dead_letters[0]["detail"]


def _stream() -> list[tuple[int, bytes]]:
    items = []
    for i in range(40):
        customer = f"c{i % 4}"
        kind = "cart_add" if i % 5 == 0 else "product_view"
        items.append((i, message(customer, i * 900, kind)))
    return items


async def test_crash_before_delivery_resends_with_same_ids_and_no_gaps() -> None:
    """Sends of events 25..39 die with the process; the state (RocksDB) kept their effects.
    After restart the messages are re-delivered from the last committed offset (20)."""
    items = _stream()
    reference = ListSinks()
    await feed(pipeline_factory({}, reference), items)

    data: dict[str, bytes] = {}
    delivered = ListSinks()
    first = pipeline_factory(data, delivered)
    await feed(first, items[:25])
    first.sinks = ListSinks(deliver=False)  # the process dies before these reach the broker
    await feed(first, items[25:])

    restarted = ListSinks()
    second = pipeline_factory(data, restarted)
    await feed(second, items[20:])  # at-least-once: from the last committed offset

    received = delivered.changes + restarted.changes
    unique = {c["change_id"]: c for c in received}
    assert sorted(unique) == sorted(c["change_id"] for c in reference.changes)
    for customer in {c["customer_id"] for c in reference.changes}:
        sequences = sorted(c["sequence"] for c in unique.values() if c["customer_id"] == customer)
        assert sequences == list(range(1, len(sequences) + 1))
    assert second.metrics.resent_changes._value.get() > 0
    # Nothing was applied twice: the restarted process saw every re-delivered message as known.
    assert second.processors[0].counts == {"duplicate": len(items[20:])}
