"""Delivery guarantees of the live step, without a broker: a change leaves only after the state
that records it is durable; after a crash only undelivered batches are sent again; an event from
the far future cannot poison a partition; lifecycle trails do not depend on the partition count.
(The same guarantees are checked from outside against the real broker in tests/integration.)"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from random import Random
from typing import Any

import orjson
import pytest

from stream_app.contracts.events import ClickEvent, ClickType, Component, MessageOrigin
from stream_app.core.models import SegmentModels
from stream_app.core.processor import MemoryStore, Processor
from stream_app.live.pipeline import LivePipeline, RawMessage
from stream_app.live.store import TableStore, partition_of
from stream_app.settings import SegmentationSettings, Settings
from stream_app.tools.replay import learning_epochs, replay_offline

T0 = datetime(2024, 3, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=800)  # the worker's wall clock: after every test event
CLICKS = "clickstream"
Trail = list[tuple[str, str, str]]  # (event time, previous stage, new stage)


class Sinks:
    """Records what reaches the broker; `deliver=False`: sends die with the process."""

    def __init__(self, deliver: bool = True) -> None:
        self.deliver = deliver
        self.changes: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.dead_letters: list[dict[str, Any]] = []

    async def change(self, customer_id: str, value: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.deliver:
            self.raw.append(value)
            self.changes.append(orjson.loads(value))
            fut.set_result(None)
        return fut

    async def membership(self, customer_id: str, value: bytes) -> None:
        return None

    async def dead_letter(self, key: bytes | None, value: bytes) -> None:
        self.dead_letters.append(orjson.loads(value))

    async def reroute(self, topic: str, key: bytes, value: bytes) -> None:
        raise AssertionError("the tests send every event to its customer's partition")


def click(customer: str, at: datetime, n: int, kind: str = "product_view") -> bytes:
    return orjson.dumps(
        {
            "event_id": f"{customer}-{n}",
            "customer_id": customer,
            "event_time": at.isoformat(),
            "event_type": kind,
        }
    )


def pipeline(
    tables: dict[int, dict[bytes, bytes]], sinks: Sinks, partitions: int = 1, **kw: Any
) -> LivePipeline:
    return LivePipeline(
        Settings(state_dir="/nonexistent", partitions=partitions),
        lambda p: TableStore(tables.setdefault(p, {}), p, partitions),
        sinks,
        clock=lambda: NOW,
        **kw,
    )


def raw(values: list[bytes], partitions: int = 1, start: int = 0) -> list[RawMessage]:
    """Messages on their customer's partition, with per-partition offsets from `start`."""
    offsets: dict[int, int] = defaultdict(lambda: start)
    out: list[RawMessage] = []
    for value in values:
        customer = orjson.loads(value)["customer_id"]
        p = 0 if partitions == 1 else partition_of(customer, partitions)
        offset = offsets[p]
        offsets[p] += 1
        out.append(
            (
                customer.encode(),
                value,
                MessageOrigin(topic=CLICKS, partition=p, offset=offset),
                offset,
            )
        )
    return out


def history(customers: int = 24, seed: int = 7) -> list[bytes]:
    """Clicks in time order with long silences, so customers go at risk, lapse and return."""
    rng = Random(seed)
    events: list[tuple[datetime, str, int]] = []
    for c in range(customers):
        at = T0 + timedelta(hours=rng.uniform(0, 48))
        for n in range(rng.randint(2, 8)):
            events.append((at, f"cust{c}", n))
            at += timedelta(days=rng.choice([0.5, 2, 12, 40, 100, 130]))
    events.sort()
    return [click(customer, at, n) for at, customer, n in events]


async def test_changes_wait_until_the_batchs_states_are_durable() -> None:
    durable = asyncio.Event()

    async def wait_for_changelog() -> None:
        await durable.wait()

    sinks = Sinks()
    p = pipeline({}, sinks, durable=wait_for_changelog)
    batch = asyncio.create_task(p.handle_batch(raw([click("a", T0, 0), click("b", T0, 0)])))
    await asyncio.sleep(0.05)
    assert not batch.done() and sinks.changes == []  # state written, not yet acknowledged
    durable.set()
    assert await batch == [0, 1]
    assert [c["customer_id"] for c in sinks.changes] == ["a", "b"]


async def test_after_a_crash_only_undelivered_batches_are_sent_again_as_the_same_bytes() -> None:
    values = history()
    reference = Sinks()
    ref = pipeline({}, reference)
    for start in range(0, len(values), 10):
        await ref.handle_batch(raw(values[start : start + 10], start=start))

    tables: dict[int, dict[bytes, bytes]] = {}
    first_sinks = Sinks()
    first = pipeline(tables, first_sinks)
    cut = 40
    for start in range(0, cut, 10):
        await first.handle_batch(raw(values[start : start + 10], start=start))
        await asyncio.sleep(0)  # the broker's acknowledgements arrive between batches
    first.sinks = dying = Sinks(deliver=False)  # the states of the next batch are durable,
    await first.handle_batch(raw(values[cut : cut + 10], start=cut))  # its sends die (SIGKILL)
    assert dying.changes == []

    second_sinks = Sinks()
    # The models as the first process left them (keeping them across a crash is issue 14's).
    second = pipeline(tables, second_sinks, models=first.models)
    for start in range(cut, len(values), 10):  # re-delivered from the last committed offset
        await second.handle_batch(raw(values[start : start + 10], start=start))

    by_id: dict[str, bytes] = {}
    for value in reference.raw:
        by_id[orjson.loads(value)["change_id"]] = value
    received = first_sinks.raw + second_sinks.raw
    for value in received:  # one change_id, one content: the reference's bytes
        assert value == by_id[orjson.loads(value)["change_id"]]
    assert {orjson.loads(v)["change_id"] for v in received} == set(by_id)
    # The restart sent the cut batch's changes, and no customer's older (delivered) changes.
    assert len(received) == len(by_id)
    assert second.metrics.resent_changes._value.get() > 0


async def test_a_far_future_event_is_dead_lettered_and_the_partition_goes_on() -> None:
    sinks = Sinks()
    p = pipeline({}, sinks)
    values = [click("a", T0, 0), click("b", T0 + timedelta(hours=1), 0)]
    values.append(click("poison", datetime(2099, 12, 31, tzinfo=UTC), 0))
    values += [click("a", T0 + timedelta(hours=2), 1), click("c", T0 + timedelta(hours=3), 0)]
    await p.handle_batch(raw(values))
    assert [(d["reason"], d["source_offset"]) for d in sinks.dead_letters] == [("future_event", 2)]
    assert [c["component"] for c in sinks.changes] == ["entry", "entry", "entry"]
    assert [c["customer_id"] for c in sinks.changes] == ["a", "b", "c"]
    assert p.processors[0].max_event_time == (T0 + timedelta(hours=3)).timestamp()


@pytest.mark.parametrize("learning", ["in_process", "shared"])
def test_offline_a_far_future_event_is_refused_against_the_streams_own_progress(
    learning: str,
) -> None:
    """Shared learning moves the stream's clock to an event before scoring it (its version
    must be final): a far-future event must be refused first, or its time becomes the clock."""
    s = SegmentationSettings()
    epochs = learning_epochs(Settings(learning=learning))
    events = [
        ClickEvent(
            event_id=f"e{n}",
            customer_id=f"c{n}",
            event_time=at,
            event_type=ClickType.PRODUCT_VIEW,
        )
        for n, at in enumerate([T0, datetime(2099, 12, 31, tzinfo=UTC), T0 + timedelta(days=200)])
    ]
    result, processor, _ = replay_offline(events, s, epochs=epochs)
    assert result.invalid == {"future_event": 1}
    assert processor.max_event_time == (T0 + timedelta(days=200)).timestamp()


def test_a_customers_own_due_work_fires_before_their_next_event() -> None:
    """Alone on a partition, nothing else moves the watermark: her own event at day 100 must
    first fire what fell due since day 0 (active, at risk, lapsed), then reactivate her."""
    s = SegmentationSettings()
    processor = Processor(s, SegmentModels(s), MemoryStore())
    changes = []
    for n, day in enumerate([0, 100]):
        event = ClickEvent(
            event_id=f"a{n}",
            customer_id="alice",
            event_time=T0 + timedelta(days=day),
            event_type=ClickType.PRODUCT_VIEW,
        )
        changes += processor.process(event).changes
    trail = [
        (c.event_time, c.previous.lifecycle.value, c.current.lifecycle.value)
        for c in changes
        if c.component is Component.LIFECYCLE and c.previous is not None
    ]
    assert trail == [
        (T0 + timedelta(days=30), "new", "at_risk"),
        (T0 + timedelta(days=90), "at_risk", "lapsed"),
        (T0 + timedelta(days=100), "lapsed", "reactivated"),
    ]


def trails(changes: list[dict[str, Any]], until: float) -> dict[str, Trail]:
    out: dict[str, Trail] = defaultdict(list)
    for c in changes:
        at = datetime.fromisoformat(c["event_time"]).timestamp()
        if c["component"] == "lifecycle" and at <= until:
            out[c["customer_id"]].append(
                (c["event_time"], c["previous"]["lifecycle"], c["current"]["lifecycle"])
            )
    return dict(out)


async def test_lifecycle_trails_are_the_same_on_one_and_four_partitions() -> None:
    """Four partitions consumed one after the other (as a backlog is fetched in chunks) give
    every customer the trail one partition gives, up to the event time every partition has
    reached (later due work fires when their partition's stream gets there)."""
    values = history()
    one_sinks, four_sinks = Sinks(), Sinks()
    one = pipeline({}, one_sinks)
    await one.handle_batch(raw(values))
    four = pipeline({}, four_sinks, partitions=4)
    messages = raw(values, partitions=4)
    for p in range(4):
        await four.handle_batch([m for m in messages if m[2].partition == p])
    assert sorted(four.processors) == [0, 1, 2, 3]
    assert not four_sinks.dead_letters
    horizon = min(proc.watermark for proc in four.processors.values())
    expected = trails(one_sinks.changes, horizon)
    assert sum(len(t) for t in expected.values()) > 30  # the history does move people around
    assert trails(four_sinks.changes, horizon) == expected


async def no_outputs_pending() -> None:
    """The test sinks acknowledge at once: nothing to flush."""


async def test_after_a_graceful_stop_the_next_owner_resends_nothing() -> None:
    values = history()
    for seal in (False, True):
        tables: dict[int, dict[bytes, bytes]] = {}
        first = pipeline(tables, Sinks())
        await first.handle_batch(raw(values[:30]))
        if seal:
            assert await first.seal(no_outputs_pending) == 1  # every change acknowledged
        second = pipeline(tables, Sinks(), models=first.models)
        await second.handle_batch(raw(values[30:40], start=30))
        resent = second.metrics.resent_changes._value.get()
        assert (resent == 0) is seal, (seal, resent)


async def test_a_huge_key_does_not_make_its_dead_letter_unpublishable() -> None:
    sinks = Sinks()
    keys: list[bytes | None] = []

    async def dead_letter(key: bytes | None, value: bytes) -> None:
        keys.append(key)

    sinks.dead_letter = dead_letter  # type: ignore[method-assign]
    p = pipeline({}, sinks)
    huge = b"k" * 900_000
    await p.handle(huge, b"{not json", MessageOrigin(topic=CLICKS, partition=0, offset=0))
    await p.handle(b"small", b"{not json", MessageOrigin(topic=CLICKS, partition=0, offset=1))
    assert keys == [hashlib.sha256(huge).hexdigest().encode(), b"small"]


async def test_every_membership_record_is_a_valid_segment_membership() -> None:
    """The compacted topic's value is built without re-validation: it must still be exactly the
    published contract (pydantic model and schemas/segment_membership.v1.json)."""
    import json
    from pathlib import Path

    from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

    from stream_app.contracts.events import SegmentChange, SegmentMembership
    from stream_app.live.pipeline import membership_record

    schema = json.loads(
        (Path(__file__).parents[2] / "schemas" / "segment_membership.v1.json").read_text()
    )
    check = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    sinks = Sinks()
    await pipeline({}, sinks).handle_batch(raw(history()))
    assert len(sinks.changes) > 50
    for change in sinks.changes:
        record = orjson.loads(membership_record(SegmentChange.model_validate(change)))
        check.validate(record)
        member = SegmentMembership.model_validate(record)
        assert member.segment.model_dump(mode="json") == change["current"]
        assert (member.sequence, member.change_id) == (change["sequence"], change["change_id"])
