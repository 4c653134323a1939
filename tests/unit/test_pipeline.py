"""The live step without Faust: decode -> processor -> outputs, dead letters, crash recovery."""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime, timedelta
from random import Random
from typing import Any

import orjson
import pytest
from conftest import assert_one_history
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.contracts.events import DeadLetterReason, MessageOrigin
from stream_app.live.pipeline import LivePipeline, OrderedMerge, RawMessage
from stream_app.live.store import DELIVERY_KEY_PREFIX, TableStore, decode_record, partition_of
from stream_app.settings import SegmentationSettings, Settings

T0 = datetime(2024, 3, 1, tzinfo=UTC)
CLICKS = "clickstream"


class ListSinks:
    """Records outputs; `deliver=False` simulates sends that die with the process (SIGKILL)."""

    def __init__(self, deliver: bool = True) -> None:
        self.deliver = deliver
        self.changes: list[dict[str, Any]] = []
        self.memberships: list[dict[str, Any]] = []
        self.dead_letters: list[dict[str, Any]] = []
        self.rerouted: list[tuple[str, bytes, bytes]] = []

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

    async def reroute(self, topic: str, key: bytes, value: bytes) -> None:
        self.rerouted.append((topic, key, value))


def message(customer: str, minute: int, event_type: str = "product_view") -> bytes:
    return orjson.dumps(
        {
            "event_id": f"{customer}-{minute}",
            "customer_id": customer,
            "event_time": (T0 + timedelta(minutes=minute)).isoformat(),
            "event_type": event_type,
        }
    )


def pipeline_factory(data: dict[bytes, bytes], sinks: ListSinks) -> LivePipeline:
    return LivePipeline(
        Settings(state_dir="/nonexistent", partitions=1),
        lambda partition: TableStore(data, partition, 1, cache_size=0),
        sinks,
        clock=lambda: T0 + timedelta(days=365),
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

    data: dict[bytes, bytes] = {}
    delivered = ListSinks()
    first = pipeline_factory(data, delivered)
    await feed(first, items[:25])
    first.sinks = ListSinks(deliver=False)  # the process dies before these reach the broker
    await feed(first, items[25:])

    restarted = ListSinks()
    second = pipeline_factory(data, restarted)
    await feed(second, items[20:])  # at-least-once: from the last committed offset

    unique = assert_one_history(delivered.changes + restarted.changes)
    assert sorted(unique) == sorted(c["change_id"] for c in reference.changes)
    assert second.metrics.resent_changes._value.get() > 0
    # Nothing was applied twice: the restarted process saw every re-delivered message as known.
    assert second.processors[0].counts == {"duplicate": len(items[20:])}


# --- ordered merge of the two input topics ----------------------------------------------------


def test_merge_holds_until_every_topic_has_an_event_or_is_caught_up() -> None:
    more = {"clicks": True, "tx": True}
    merge = OrderedMerge(("clicks", "tx"), 0, lambda t, p: more[t], max_wait_s=60)
    merge.push("clicks", (2.0, "c2"), "c2", now=0)
    merge.push("clicks", (5.0, "c5"), "c5", now=0)
    assert merge.pop_ready(now=1) == []  # tx has unread messages: c2 might not be first
    merge.push("tx", (3.0, "t3"), "t3", now=1)
    assert merge.pop_ready(now=1) == ["c2", "t3"]  # then tx is empty again and still has more
    more["tx"] = False  # caught up: nothing can arrive before c5 right now
    assert merge.pop_ready(now=1) == ["c5"]


def test_merge_releases_after_the_wait_bound_when_a_fetch_stalls() -> None:
    merge = OrderedMerge(("clicks", "tx"), 0, lambda t, p: True, max_wait_s=0.5)
    merge.push("clicks", (1.0, "a"), "a", now=10.0)
    assert merge.pop_ready(now=10.4) == []
    assert merge.pop_ready(now=10.6) == ["a"]


def test_merge_breaks_time_ties_by_event_id() -> None:
    merge = OrderedMerge(("clicks", "tx"), 0, lambda t, p: False, max_wait_s=1)
    merge.push("tx", (1.0, "b"), "b", now=0)
    merge.push("clicks", (1.0, "a"), "a", now=0)
    assert merge.pop_ready(now=0) == ["a", "b"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 50), st.booleans()), min_size=1, max_size=40), st.randoms()
)
def test_any_interleaving_of_sorted_topics_comes_out_in_offline_order(
    raw: list[tuple[int, bool]], rng: Random
) -> None:
    events = sorted({(t, f"{'t' if tx else 'c'}{t}-{i}", tx) for i, (t, tx) in enumerate(raw)})
    streams = {"c": [e for e in events if not e[2]], "t": [e for e in events if e[2]]}
    merge = OrderedMerge(("c", "t"), 0, lambda topic, p: bool(streams[topic]), max_wait_s=1e9)
    out: list[str] = []
    while streams["c"] or streams["t"]:
        topic = rng.choice([name for name, rest in streams.items() if rest])
        t, event_id, _ = streams[topic].pop(0)
        merge.push(topic, (float(t), event_id), event_id, now=0)
        out.extend(merge.pop_ready(now=0))
    assert out == [event_id for _, event_id, _ in events]


def transaction_message(customer: str, minute: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"{customer}-tx-{minute}",
            "customer_id": customer,
            "event_time": (T0 + timedelta(minutes=minute)).isoformat(),
            "event_type": "purchase",
            "order_id": f"o-{customer}-{minute}",
            "amount": "12.50",
            "currency": "GBP",
        }
    )


async def test_scrambled_topic_arrival_gives_the_same_changes_as_sorted_order() -> None:
    day = 24 * 60
    clicks = [(i, message(f"c{i % 5}", i * 2 * day + i, "cart_add")) for i in range(30)]
    txs = [(i, transaction_message(f"c{i % 3}", i * 3 * day + 7)) for i in range(20)]

    def ordered(items: list[tuple[str, int, bytes]]) -> list[tuple[str, int, bytes]]:
        return sorted(items, key=lambda it: orjson.loads(it[2])["event_time"])

    tagged = [("clickstream", o, v) for o, v in clicks] + [("transactions", o, v) for o, v in txs]

    async def run(arrival: list[tuple[str, int, bytes]]) -> list[str]:
        sinks = ListSinks()
        remaining = {"clickstream": len(clicks), "transactions": len(txs)}
        p = LivePipeline(
            Settings(partitions=1, segmentation=SegmentationSettings(cluster_warmup=20)),
            lambda partition: TableStore({}, partition, 1),
            sinks,
            clock=lambda: T0 + timedelta(days=365),
            has_more=lambda topic, partition: remaining[topic] > 0,
        )
        for topic, offset, value in arrival:
            remaining[topic] -= 1
            await p.handle(b"k", value, MessageOrigin(topic=topic, partition=0, offset=offset))
        return [orjson.dumps(c).decode() for c in sinks.changes]

    reference = await run(ordered(tagged))
    scrambled = [*clicks[:10], *txs[:15], *clicks[10:], *txs[15:]]
    arrival = [("clickstream", o, v) for o, v in scrambled[:10]]
    arrival += [("transactions", o, v) for o, v in scrambled[10:25]]
    arrival += [("clickstream", o, v) for o, v in scrambled[25:45]]
    arrival += [("transactions", o, v) for o, v in scrambled[45:]]
    components = {orjson.loads(c)["component"] for c in reference}
    assert {"entry", "lifecycle", "cluster"} <= components
    assert await run(arrival) == reference


def test_a_held_event_waits_while_the_other_topic_keeps_delivering_older_ones() -> None:
    """Regression: the wait bound is about a stalled topic, not about how long an event is held."""
    merge = OrderedMerge(("clicks", "tx"), 0, lambda t, p: True, max_wait_s=1.0)
    merge.push("tx", (100.0, "t"), "t", now=0.0)
    released: list[str] = []
    for i in range(50):  # clicks keep arriving for 5 s, all older than the transaction
        now = i * 0.1
        merge.push("clicks", (float(i), f"c{i:02d}"), f"c{i:02d}", now=now)
        released.extend(merge.pop_ready(now=now))
    assert released == [f"c{i:02d}" for i in range(50)]
    assert merge.pop_ready(now=5.5) == []  # clicks quiet for 0.6 s: still waiting for them
    assert merge.pop_ready(now=6.0) == ["t"]  # quiet for 1.1 s: stalled, release


async def test_event_on_another_customers_partition_is_re_keyed_not_processed() -> None:
    """Keyed by something else (say a session id), an event lands where its customer's state is
    not: it is sent again keyed by the customer id (murmur2 -> the owning partition)."""
    sinks = ListSinks()
    p = LivePipeline(Settings(partitions=4), lambda partition: TableStore({}, partition, 4), sinks)
    owner = partition_of("alice", 4)
    elsewhere = (owner + 1) % 4
    value = message("alice", 0)
    done = await p.handle(
        b"session-9", value, MessageOrigin(topic=CLICKS, partition=elsewhere, offset=7)
    )
    assert done == [None]  # handled: acked on this partition
    assert sinks.rerouted == [(CLICKS, b"alice", value)]
    assert sinks.changes == [] and p.counts.events == {} and p.counts.rerouted == 1
    await p.handle(b"alice", value, MessageOrigin(topic=CLICKS, partition=owner, offset=3))
    assert [c["customer_id"] for c in sinks.changes] == ["alice"]


# --- batches: one state write per customer per batch, same outputs -----------------------------


class CountingTable(dict[bytes, bytes]):
    """A raw table that counts writes (each is a RocksDB put and a changelog record live)."""

    writes = 0

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.writes += 1
        super().__setitem__(key, value)


def customers(table: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The table's customer states, without the partitions' delivery markers."""
    return {k: v for k, v in table.items() if not k.startswith(DELIVERY_KEY_PREFIX)}


def batched_pipeline(table: CountingTable, sinks: ListSinks, cache_size: int = 100) -> LivePipeline:
    return LivePipeline(
        Settings(state_dir="/nonexistent", partitions=1),
        lambda partition: TableStore(table, partition, 1, cache_size),
        sinks,
        clock=lambda: T0 + timedelta(days=365),
    )


def raw(items: list[tuple[int, bytes]]) -> list[RawMessage]:
    return [
        (b"k", value, MessageOrigin(topic=CLICKS, partition=0, offset=offset), offset)
        for offset, value in items
    ]


@pytest.mark.parametrize("cache_size", [0, 2, 100])
async def test_batches_give_the_per_event_outputs_with_one_write_per_customer(
    cache_size: int,
) -> None:
    items = _stream()  # 40 events over 4 customers
    reference = ListSinks()
    await feed(pipeline_factory({}, reference), items)

    table = CountingTable()
    sinks = ListSinks()
    p = batched_pipeline(table, sinks, cache_size)
    done: list[Any] = []
    for start in range(0, len(items), 10):
        done.extend(await p.handle_batch(raw(items[start : start + 10])))
    assert done == [offset for offset, _ in items]  # every message acked, in order
    assert sinks.changes == reference.changes
    assert sinks.memberships == reference.memberships
    # 4 batches x 4 customers, not 40, plus the partition's delivery marker once per batch.
    assert table.writes == 4 * 4 + 4
    # The table holds what the per-event path stores (the outbox aside: acks arrive per batch).
    for customer, stored in customers(table).items():
        _, envelope = decode_record(stored)
        assert envelope.offsets == {
            CLICKS: max(o for o, v in items if f'"{customer.decode()}-' in v.decode())
        }


async def test_a_batchs_changes_are_sent_only_after_its_states_are_written() -> None:
    table = CountingTable()
    seen_writes: list[int] = []

    class Watching(ListSinks):
        async def change(self, customer_id: str, value: bytes) -> asyncio.Future[None]:
            seen_writes.append(table.writes)
            return await super().change(customer_id, value)

    p = batched_pipeline(table, Watching())
    await p.handle_batch(raw([(0, message("a", 0)), (1, message("b", 1))]))
    # Both entry changes went out after both state writes and the partition's delivery marker.
    assert seen_writes == [3, 3]


async def test_a_failed_update_does_not_leave_a_half_updated_state_in_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = CountingTable()
    sinks = ListSinks()
    p = batched_pipeline(table, sinks)
    await p.handle_batch(raw([(0, message("a", 0))]))
    before = table[b"a"]
    boom = {"on": True}
    original = p.models.clusters.learn_assign

    def explode(x: Any, at: float) -> int:
        if boom["on"]:
            raise RuntimeError("disk on fire")
        return original(x, at)

    monkeypatch.setattr(p.models.clusters, "learn_assign", explode)
    await p.handle_batch(raw([(1, message("a", 1))]))
    assert [d["reason"] for d in sinks.dead_letters] == ["processing_error"]
    assert table[b"a"] == before
    store = p.processors[0].store
    assert isinstance(store, TableStore)
    state = store.get("a")
    # Not the half-updated object: the state last written.
    assert state is not None and state == decode_record(before)[0]


async def test_the_merge_clock_is_when_a_message_was_read_not_when_its_batch_ran() -> None:
    """Regression: a batch processed long after it was read made the other topic look stalled
    (nothing pushed for > merge_max_wait_s of wall clock) and released a later transaction
    first, so the clicks read with it became late events."""
    ends = {"clickstream": 2, "transactions": 1}  # highwaters: a backlog of three messages
    sinks = ListSinks()

    def has_more(topic: str, partition: int) -> bool:
        return p.last_offsets.get((topic, partition), -1) + 1 < ends[topic]

    p = LivePipeline(
        Settings(partitions=1, segmentation=SegmentationSettings(allowed_lateness_seconds=0)),
        lambda partition: TableStore({}, partition, 1),
        sinks,
        clock=lambda: T0 + timedelta(days=365),
        has_more=has_more,
        merge_max_wait_s=1.0,
    )

    def msg(topic: str, offset: int, value: bytes) -> RawMessage:
        return (b"k", value, MessageOrigin(topic=topic, partition=0, offset=offset), offset)

    read_at = time.monotonic() - 30  # the batch waited 30 s behind a slow one
    await p.handle_batch(
        [
            msg("clickstream", 0, message("a", 0)),
            msg("transactions", 0, transaction_message("a", 600)),
            msg("clickstream", 1, message("b", 1)),
        ],
        arrived=[read_at, read_at + 0.01, read_at + 0.02],
    )
    assert sinks.dead_letters == []
    assert [c["reason"]["trigger_event_id"] for c in sinks.changes][:2] == ["a-0", "b-1"]


async def test_time_spent_processing_is_not_silence_of_the_other_topic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: after a slow batch, the merge timer took the clicks topic for stalled (no
    click read for longer than merge_max_wait_s of wall clock, all of it spent processing),
    released a later transaction, and the clicks read next were late events."""
    ends = {"clickstream": 3, "transactions": 1}
    sinks = ListSinks()

    def has_more(topic: str, partition: int) -> bool:
        return p.last_offsets.get((topic, partition), -1) + 1 < ends[topic]

    p = LivePipeline(
        Settings(partitions=1, segmentation=SegmentationSettings(allowed_lateness_seconds=0)),
        lambda partition: TableStore({}, partition, 1),
        sinks,
        clock=lambda: T0 + timedelta(days=365),
        has_more=has_more,
        merge_max_wait_s=0.2,
    )
    learn = p.models.clusters.learn_assign

    def slow(x: Any, at: float) -> int:
        time.sleep(0.3)  # a long batch
        return learn(x, at)

    monkeypatch.setattr(p.models.clusters, "learn_assign", slow)

    def msg(topic: str, offset: int, value: bytes) -> RawMessage:
        return (b"k", value, MessageOrigin(topic=topic, partition=0, offset=offset), offset)

    first = [
        msg("clickstream", 0, message("a", 0)),
        msg("transactions", 0, transaction_message("a", 600)),
    ]
    await p.handle_batch(first, arrived=[p.input_clock()] * 2)
    assert await p.flush_idle() == []  # the transaction stays held: clicks were not silent
    now = p.input_clock()
    await p.handle_batch(
        [msg("clickstream", 1, message("b", 1)), msg("clickstream", 2, message("c", 2))],
        arrived=[now, now],
    )
    assert sinks.dead_letters == []
    triggers = [c["reason"]["trigger_event_id"] for c in sinks.changes]
    assert triggers[:3] == ["a-0", "b-1", "c-2"]


async def test_revocation_waits_for_the_batch_in_progress() -> None:
    """A batch's changes are sent after its states are written; a revocation arriving while
    it sends must not drop the partition's store in between."""
    table = CountingTable()
    release = asyncio.Event()

    class Slow(ListSinks):
        async def change(self, customer_id: str, value: bytes) -> asyncio.Future[None]:
            await release.wait()
            return await super().change(customer_id, value)

    sinks = Slow()
    p = batched_pipeline(table, sinks)
    batch = asyncio.create_task(p.handle_batch(raw([(0, message("a", 0)), (1, message("b", 1))])))
    await asyncio.sleep(0.01)
    revoke = asyncio.create_task(p.revoke({0}))
    await asyncio.sleep(0.01)
    assert not revoke.done() and 0 in p.processors
    release.set()
    assert await batch == [0, 1]
    await revoke
    assert p.processors == {} and p.merges == {}
    assert sorted(customers(table)) == [b"a", b"b"] and len(sinks.changes) == 2


async def test_messages_read_before_a_rebalance_are_left_to_the_next_owner() -> None:
    """Faust's generation changes only when the rebalance assigns: a batch the agent collected
    before it still passes the generation check. Its messages of a revoked partition are not
    processed (nor acked: the next owner reads them again), or this worker would be a second
    owner of the partition; once the partition is assigned back, they are processed again."""
    table = CountingTable()
    sinks = ListSinks()
    p = batched_pipeline(table, sinks)
    assert await p.handle_batch(raw([(0, message("a", 0))])) == [0]
    await p.revoke({0})
    assert await p.handle_batch(raw([(1, message("b", 1)), (2, message("c", 2))])) == []
    assert p.processors == {} and sorted(customers(table)) == [b"a"]
    p.assign({0})
    assert await p.handle_batch(raw([(1, message("b", 1))])) == [1]
    assert sorted(customers(table)) == [b"a", b"b"]


async def test_a_dead_letter_is_acked_only_after_the_held_message_read_before_it() -> None:
    """Faust commits past a single unacked offset (`Consumer._new_offset`: it only refuses a
    gap of two or more, and checks nothing while the committed offset is 0). A transaction
    held by the ordered merge (clicks still unread) followed by a poison transaction: acking
    the poison at once would let the commit pass the held one, lost after a crash."""
    unread_clicks = {"n": 1}
    sinks = ListSinks()
    p = LivePipeline(
        Settings(partitions=1),
        lambda partition: TableStore({}, partition, 1),
        sinks,
        clock=lambda: T0 + timedelta(days=365),
        has_more=lambda topic, partition: topic == CLICKS and unread_clicks["n"] > 0,
        merge_max_wait_s=3600.0,
    )

    def msg(topic: str, offset: int, value: bytes) -> RawMessage:
        origin = MessageOrigin(topic=topic, partition=0, offset=offset)
        return (b"k", value, origin, (topic, offset))

    held = await p.handle_batch(
        [
            msg("transactions", 0, transaction_message("a", 5)),
            msg("transactions", 1, b"{not json"),
        ]
    )
    assert len(sinks.dead_letters) == 1 and p.held() == 1
    assert held == []  # the dead letter's ack waits for offset 0, still held
    unread_clicks["n"] = 0
    done = await p.handle_batch([msg(CLICKS, 0, message("a", 1))])
    assert done == [(CLICKS, 0), ("transactions", 0), ("transactions", 1)]


def test_acks_come_back_in_offset_order_per_partition_whatever_the_finishing_order() -> None:
    """Property: whatever order messages finish in, each partition's tokens come back in offset
    order, each once, and only up to the first unfinished one."""
    from hypothesis import given
    from hypothesis import strategies as st

    from stream_app.live.pipeline import OffsetOrderAcks

    @given(st.lists(st.sampled_from([0, 1]), min_size=1, max_size=30), st.randoms())
    def check(partitions: list[int], rng: Any) -> None:
        acks = OffsetOrderAcks()
        offsets: dict[int, int] = {0: 10, 1: 0}  # where each partition's reading began
        tickets = []
        for i, part in enumerate(partitions):
            tickets.append(acks.admit("t", part, offsets[part], (part, i)))
            offsets[part] += 1
        order = list(range(len(tickets)))
        rng.shuffle(order)
        finished: set[int] = set()
        done: list[tuple[int, int]] = []
        for i in order:
            acks.finish(tickets[i], done)
            finished.add(i)
            for part in (0, 1):
                mine = [j for j, q in enumerate(partitions) if q == part]
                prefix = []
                for j in mine:
                    if j not in finished:
                        break
                    prefix.append((part, j))
                assert [d for d in done if d[0] == part] == prefix
        assert sorted(done) == sorted((q, j) for j, q in enumerate(partitions))
        assert acks.held_back() == 0

    check()


def test_offsets_read_from_the_log_with_nothing_there_never_hold_an_ack_back() -> None:
    """Property: after a stretch is read from the log (some offsets hold messages, the rest
    nothing), the present ones' tokens come back in offset order, each once, up to the first
    unfinished one, whatever order they finish in; the empty offsets never hold one back."""
    from stream_app.live.pipeline import OffsetOrderAcks

    @given(st.lists(st.booleans(), min_size=1, max_size=40), st.randoms(), st.integers(0, 5))
    @settings(max_examples=200, deadline=None)
    def check(present: list[bool], rng: Any, start: int) -> None:
        acks = OffsetOrderAcks()
        acks.begin("t", 0, start)
        offsets = [start + i for i, here in enumerate(present) if here]
        tickets = {o: acks.admit("t", 0, o, o) for o in offsets}
        done: list[int] = []
        acks.absent("t", 0, start, start + len(present), done)
        order = list(offsets)
        rng.shuffle(order)
        finished: set[int] = set()
        for o in order:
            acks.finish(tickets[o], done)
            finished.add(o)
            expected = []
            for q in offsets:
                if q not in finished:
                    break
                expected.append(q)
            assert done == expected
        assert done == offsets and acks.held_back() == 0
        # What follows the stretch is handed back at once.
        later: list[int] = []
        acks.finish(acks.admit("t", 0, start + len(present), -1), later)
        assert later == [-1]

    check()


class LogReader:
    """Stands in for the worker's own reader of the log (``SkippedReader``): serves offsets of
    `log` (offset -> customer; a missing offset holds no message), and records what it read."""

    def __init__(self, log: dict[int, str], fail: bool = False) -> None:
        self.log = log
        self.fail = fail
        self.reads: list[tuple[int, int]] = []

    async def __call__(
        self, topic: str, partition: int, start: int, end: int
    ) -> tuple[list[RawMessage], int]:
        if self.fail:
            raise ConnectionError("broker gone")
        stop = min(end, max(self.log) + 1)
        self.reads.append((start, stop))
        found = [
            gap_msg(offset, self.log[offset], token=("log", offset))
            for offset in range(start, stop)
            if offset in self.log
        ]
        return found, stop


def gap_msg(offset: int, customer: str, token: Any = None) -> RawMessage:
    origin = MessageOrigin(topic=CLICKS, partition=0, offset=offset)
    return (b"k", message(customer, offset), origin, offset if token is None else token)


def gap_pipeline(
    sinks: ListSinks,
    reader: LogReader | None,
    committed: int | None = None,
    has_more: Any = None,
) -> LivePipeline:
    return LivePipeline(
        Settings(state_dir="/nonexistent", partitions=1),
        lambda partition: TableStore({}, partition, 1, cache_size=0),
        sinks,
        clock=lambda: T0 + timedelta(days=365),
        committed_offset=lambda topic, partition: committed,
        read_skipped=reader,
        has_more=has_more,
    )


async def test_offsets_never_handed_over_are_read_from_the_log_before_what_follows() -> None:
    """Faust sometimes skips messages (seen after a takeover) and would commit past them. The
    pipeline reads the stretch from the log itself and processes it in offset order, before the
    message after it; every token (Faust's and the reader's) comes back in offset order."""
    sinks = ListSinks()
    reader = LogReader({0: "a", 1: "b", 2: "c", 3: "d", 4: "e"})
    p = gap_pipeline(sinks, reader)
    done = await p.handle_batch([gap_msg(0, "a"), gap_msg(1, "b"), gap_msg(4, "e")])
    assert done == [0, 1, ("log", 2), ("log", 3), 4]
    assert reader.reads == [(2, 4)]
    assert [c["customer_id"] for c in sinks.changes] == ["a", "b", "c", "d", "e"]
    assert (p.counts.input_gaps, p.counts.input_gap_messages) == (1, 2)
    # Faust handing the skipped ones over after all: copies, acked, not processed again.
    assert await p.handle_batch([gap_msg(2, "c"), gap_msg(3, "d"), gap_msg(5, "f")]) == [2, 3, 5]
    assert [c["customer_id"] for c in sinks.changes] == ["a", "b", "c", "d", "e", "f"]
    assert p.metrics.duplicates._value.get() == 0


async def test_a_first_message_above_the_committed_offset_is_a_hole_too() -> None:
    """After a takeover Faust's first message may already be past the committed offset (what
    lay between was never handed over, and Faust would commit past it); with no committed
    offset reading begins at the partition's start (0)."""
    for committed, first in ((3, 3), (0, 0)):
        sinks = ListSinks()
        reader = LogReader({i: f"c{i}" for i in range(7)})
        p = gap_pipeline(sinks, reader, committed=committed)
        assert await p.handle_batch([gap_msg(5, "c5"), gap_msg(6, "c6")]) == [
            *[("log", i) for i in range(first, 5)],
            5,
            6,
        ]
        assert reader.reads == [(first, 5)]
        assert [c["customer_id"] for c in sinks.changes] == [f"c{i}" for i in range(first, 7)]


async def test_offsets_that_hold_no_message_do_not_hold_the_acks() -> None:
    """Offsets removed by retention, or taken by transaction markers, hold no message: once the
    log says so, nothing waits for them."""
    sinks = ListSinks()
    reader = LogReader({3: "d", 6: "g", 9: "j"})  # 0-2 gone, 4-5 and 7-8 markers
    p = gap_pipeline(sinks, reader, committed=0)
    assert await p.handle_batch([gap_msg(9, "j")]) == [("log", 3), ("log", 6), 9]
    assert [c["customer_id"] for c in sinks.changes] == ["d", "g", "j"]


async def test_a_stretch_that_cannot_be_read_holds_the_acks_after_it() -> None:
    """Without a reader, or when the read fails, what follows is processed, but its acks wait:
    the next rebalance or restart reads the stretch from the committed offset."""
    for reader in (None, LogReader({}, fail=True)):
        sinks = ListSinks()
        p = gap_pipeline(sinks, reader)
        assert await p.handle_batch([gap_msg(0, "a"), gap_msg(1, "b"), gap_msg(4, "e")]) == [0, 1]
        assert p.counts.input_gaps == 1
        assert p.counts.input_gaps_unread == (0 if reader is None else 1)
        assert [c["customer_id"] for c in sinks.changes] == ["a", "b", "e"]


async def test_a_partition_that_stops_delivering_unread_messages_is_read_from_the_log() -> None:
    """Faust may also stop handing a partition over with messages still unread (and nothing
    after them to show the jump): after INPUT_STALL_S without one, the pipeline reads on from
    the log, a chunk at a time."""
    from stream_app.live.pipeline import INPUT_STALL_S

    sinks = ListSinks()
    reader = LogReader({0: "a", 1: "b", 2: "c"})
    unread = {"n": 2}
    p = gap_pipeline(
        sinks, reader, has_more=lambda topic, partition: topic == CLICKS and unread["n"] > 0
    )
    now = p.input_clock()
    assert await p.handle_batch([gap_msg(0, "a")], arrived=[now]) == [0]
    assert await p.flush_idle() == [] and reader.reads == []  # not yet stalled
    assert await p.handle_batch([gap_msg(0, "a")], arrived=[now - INPUT_STALL_S]) == [0]
    assert await p.flush_idle() == [("log", 1), ("log", 2)]
    assert reader.reads == [(1, 3)]
    unread["n"] = 0
    assert await p.flush_idle() == []
    assert [c["customer_id"] for c in sinks.changes] == ["a", "b", "c"]


async def test_an_assigned_partition_never_handed_over_is_read_from_its_committed_offset() -> None:
    """Faust may also never begin handing a partition over (seen with a partition's only
    message): INPUT_STALL_S after reading began, the pipeline reads it from the committed
    offset itself; before that, and for a partition with nothing unread, it reads nothing."""
    from stream_app.live.pipeline import INPUT_STALL_S

    sinks = ListSinks()
    reader = LogReader({0: "a", 1: "b", 2: "c"})
    unread = {"n": 1}
    p = gap_pipeline(
        sinks,
        reader,
        committed=2,
        has_more=lambda topic, partition: topic == CLICKS and unread["n"] > 0,
    )
    p.assign({0})
    assert await p.flush_idle() == [] and reader.reads == []  # Faust has not resumed reading
    p.reading_began()
    assert await p.flush_idle() == [] and reader.reads == []  # not yet stalled
    p.reading_began(at=p.input_clock() - INPUT_STALL_S)
    assert await p.flush_idle() == [("log", 2)]
    assert reader.reads == [(2, 3)]
    assert p.last_offsets[(CLICKS, 0)] == 2
    unread["n"] = 0
    assert await p.flush_idle() == []
    assert [c["customer_id"] for c in sinks.changes] == ["c"]
    # Faust handing it over after all: a copy, acked, not processed again.
    assert await p.handle_batch([gap_msg(2, "c")]) == [2]
    assert [c["customer_id"] for c in sinks.changes] == ["c"]
