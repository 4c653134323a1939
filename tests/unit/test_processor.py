"""The processor step: (state, event) -> (state, changes), plus the watermark step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from stream_app.contracts.events import (
    ClickEvent,
    ClickType,
    Component,
    Event,
    Lifecycle,
    Origin,
    SegmentChange,
    TransactionEvent,
    TransactionType,
)
from stream_app.core.models import SegmentModels
from stream_app.core.processor import MemoryStore, Processor, SerializedStore, Status
from stream_app.settings import SegmentationSettings

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SETTINGS = SegmentationSettings(
    new_customer_days=10, at_risk_after_days=30, lapsed_after_days=90, reactivated_days=20
)


def click(customer: str, day: float, n: int = 0, **extra: object) -> ClickEvent:
    return ClickEvent(
        event_id=f"{customer}-c-{day}-{n}",
        customer_id=customer,
        event_time=T0 + timedelta(days=day),
        event_type=extra.pop("event_type", ClickType.PRODUCT_VIEW),
        **extra,
    )


def purchase(customer: str, day: float, amount: str = "20.00") -> TransactionEvent:
    return TransactionEvent(
        event_id=f"{customer}-p-{day}",
        customer_id=customer,
        event_time=T0 + timedelta(days=day),
        event_type=TransactionType.PURCHASE,
        order_id=f"o-{customer}-{day}",
        amount=Decimal(amount),
        currency="GBP",
    )


def processor_factory(
    settings: SegmentationSettings = SETTINGS, store: object | None = None
) -> Processor:
    return Processor(settings, SegmentModels(settings), store or MemoryStore())  # type: ignore[arg-type]


def run(p: Processor, events: list[Event]) -> list[SegmentChange]:
    changes: list[SegmentChange] = []
    for event in events:
        changes.extend(p.process(event).changes)
    return changes


def of(changes: list[SegmentChange], customer: str) -> list[SegmentChange]:
    return [c for c in changes if c.customer_id == customer]


def test_first_event_enters_customer_as_new_with_sequence_one() -> None:
    p = processor_factory()
    changes = run(p, [click("alice", 0)])
    assert len(changes) == 1
    entry = changes[0]
    assert entry.component is Component.ENTRY
    assert entry.previous is None
    assert entry.sequence == 1
    assert entry.current.lifecycle is Lifecycle.NEW
    assert entry.reason.trigger_event_id == "alice-c-0-0"
    assert entry.reason.trigger_event_type == "product_view"
    assert entry.event_time == T0
    assert entry.origin is Origin.LIVE


def test_silent_customer_moves_through_lifecycle_at_exact_event_times() -> None:
    """Time-driven moves fire from other customers' traffic, at the due event time."""
    p = processor_factory()
    background = [click("bob", d) for d in (5, 11, 31, 95)]
    changes = run(p, [click("alice", 0), *background])
    moves = [
        (c.previous.lifecycle, c.current.lifecycle, c.event_time, c.reason.trigger_event_type)
        for c in of(changes, "alice")
        if c.component is Component.LIFECYCLE and c.previous is not None
    ]
    assert moves == [
        (Lifecycle.NEW, Lifecycle.ACTIVE, T0 + timedelta(days=10), "time_passed"),
        (Lifecycle.ACTIVE, Lifecycle.AT_RISK, T0 + timedelta(days=30), "time_passed"),
        (Lifecycle.AT_RISK, Lifecycle.LAPSED, T0 + timedelta(days=90), "time_passed"),
    ]


def test_time_driven_change_waits_for_the_watermark() -> None:
    """A due move fires only once the watermark (max event time - lateness) passes it."""
    p = processor_factory()
    run(p, [click("alice", 0)])
    lateness_days = SETTINGS.allowed_lateness_seconds / 86400
    early = run(p, [click("bob", 10 + lateness_days / 2)])
    assert of(early, "alice") == []
    later = run(p, [click("bob", 10 + 2 * lateness_days)])
    assert [c.current.lifecycle for c in of(later, "alice")] == [Lifecycle.ACTIVE]


def test_lapsed_customer_who_returns_is_reactivated_then_active() -> None:
    p = processor_factory()
    events: list[Event] = [click("alice", 0), click("bob", 95), click("alice", 100)]
    events += [click("bob", 121)]
    changes = of(run(p, events), "alice")
    stages = [c.current.lifecycle for c in changes if c.component is Component.LIFECYCLE]
    assert stages == [
        Lifecycle.ACTIVE,
        Lifecycle.AT_RISK,
        Lifecycle.LAPSED,
        Lifecycle.REACTIVATED,
        Lifecycle.ACTIVE,
    ]
    back = next(c for c in changes if c.current.lifecycle is Lifecycle.REACTIVATED)
    assert back.reason.trigger_event_id == "alice-c-100-0"
    assert back.event_time == T0 + timedelta(days=100)
    returned = next(c for c in changes if c.event_time == T0 + timedelta(days=120))
    assert returned.current.lifecycle is Lifecycle.ACTIVE


def test_duplicate_event_id_is_ignored() -> None:
    p = processor_factory()
    first = p.process(click("alice", 0))
    state_before = p.store.get("alice")
    assert state_before is not None
    snapshot = state_before.to_bytes()
    again = p.process(click("alice", 0))
    assert first.status is Status.APPLIED
    assert again.status is Status.DUPLICATE
    assert again.changes == []
    after = p.store.get("alice")
    assert after is not None
    assert after.to_bytes() == snapshot


def test_event_before_watermark_is_late_and_not_applied() -> None:
    p = processor_factory()
    run(p, [click("alice", 0), click("alice", 1)])
    outcome = p.process(click("carol", 0.5))
    assert outcome.status is Status.LATE
    assert p.store.get("carol") is None


def test_an_applied_event_sent_again_after_the_watermark_passed_it_is_a_duplicate() -> None:
    """Not a late event: a history published twice into a worker that kept its clock must not
    dead-letter every event of the second copy."""
    p = processor_factory()
    run(p, [click("alice", 0), click("bob", 1)])
    assert p.process(click("alice", 0)).status is Status.DUPLICATE
    assert p.process(click("alice", 0, n=1)).status is Status.LATE  # a new event: late


def test_out_of_order_event_within_lateness_is_applied() -> None:
    p = processor_factory()
    run(p, [click("alice", 1)])
    minute = 60 / 86400
    outcome = p.process(click("alice", 1 - minute))
    assert outcome.status is Status.APPLIED
    state = p.store.get("alice")
    assert state is not None
    assert state.behaviour.last_event_at == (T0 + timedelta(days=1)).timestamp()
    assert state.behaviour.session_events == 2


def test_sequences_are_contiguous_and_change_ids_unique() -> None:
    p = processor_factory()
    events: list[Event] = []
    for day in range(0, 200, 3):
        events.append(click("alice", day))
        if day % 9 == 0:
            events.append(purchase("alice", day + 0.01))
        events.append(click("bob", day + 0.5))
    changes = run(p, events)
    for customer in ("alice", "bob"):
        sequences = [c.sequence for c in of(changes, customer)]
        assert sequences == list(range(1, len(sequences) + 1))
    ids = [c.change_id for c in changes]
    assert len(ids) == len(set(ids))


def test_same_events_give_identical_changes_and_bytes_store_matches_memory() -> None:
    """Offline (objects in memory) and live (bytes in a table) give byte-identical output."""
    events: list[Event] = []
    for i, day in enumerate(range(0, 120, 2)):
        events.append(click(f"c{i % 7}", day, event_type=ClickType.CART_ADD, category="toys"))
        if i % 3 == 0:
            events.append(purchase(f"c{i % 7}", day + 0.1, amount=f"{10 + i}.50"))
    memory = run(processor_factory(), events)
    again = run(processor_factory(), events)
    as_bytes = run(processor_factory(store=SerializedStore()), events)
    assert [c.model_dump_json() for c in memory] == [c.model_dump_json() for c in again]
    assert [c.model_dump_json() for c in memory] == [c.model_dump_json() for c in as_bytes]


def test_replayed_events_produce_replay_changes_including_time_driven_ones() -> None:
    p = processor_factory()
    replayed = click("alice", 0).model_copy(update={"origin": Origin.REPLAY})
    changes = run(p, [replayed, click("bob", 40)])
    alice = of(changes, "alice")
    assert len(alice) >= 2
    assert {c.origin for c in alice} == {Origin.REPLAY}


def test_erased_customer_gets_no_further_segment_events() -> None:
    p = processor_factory()
    run(p, [click("alice", 0), click("bob", 1)])
    assert p.forget("alice") is True
    assert p.store.get("alice") is None
    later = run(p, [click("bob", 200)])
    assert of(later, "alice") == []
    assert p.forget("alice") is False


def test_purchase_labels_are_revealed_when_the_horizon_passes() -> None:
    """Every label is revealed at snapshot time + horizon (30 days), positive or negative. The
    model learns where it scores: at events and at the time-driven moments it re-scores (churn
    checkpoints at 7 idle days, new -> active at 10 days)."""
    p = processor_factory()
    run(p, [click("alice", 0), click("bob", 0), purchase("alice", 5)])
    assert p.counts == {"applied": 3}
    assert p.models.purchase.quality()["labels"] == 0  # a purchase alone reveals nothing yet
    run(p, [click("bob", 45)])
    quality = p.models.purchase.quality()
    # Matured by day 45: alice at day 0 (purchase on day 5: positive), 5 (event), 10 (new ->
    # active) and 12 (7 idle days), all negative; bob at day 0 (event), 7 (7 idle days) and 10
    # (new -> active), all negative. Bob's day-45 snapshot and later ones are still pending.
    assert quality["labels"] == 7
    assert quality["positive_rate"] == pytest.approx(1 / 7, abs=1e-4)


def test_pending_snapshots_per_customer_are_bounded() -> None:
    settings = SETTINGS.model_copy(update={"max_pending_snapshots": 3})
    p = processor_factory(settings)
    run(p, [click("alice", d) for d in range(10)])
    state = p.store.get("alice")
    assert state is not None
    assert len(state.purchase_pending) == 3


# Named fields (state version 2) cost bytes: this worst case is 2,390 bytes, 1,693 as the
# positional version 1 list (measured 2026-12-01). Bounding memory is issue 16's.
STATE_BUDGET_BYTES = 2560


def test_heavy_customer_state_stays_under_budget() -> None:
    """Worst case: many categories, long ids, full snapshot queues, full dedupe ring."""
    p = processor_factory()
    events: list[Event] = []
    for i in range(400):
        day = i * 0.6
        events.append(
            click(
                "customer-with-a-rather-long-identifier-0000000001",
                day,
                i,
                category=f"category-{i % 50:02d}-with-a-long-name",
                session_id=f"session-{i // 4}",
            )
        )
        if i % 5 == 0:
            events.append(purchase("customer-with-a-rather-long-identifier-0000000001", day + 0.01))
    run(p, events)
    store = p.store
    assert isinstance(store, MemoryStore)
    assert max(store.sizes()) < STATE_BUDGET_BYTES


@pytest.mark.parametrize("stage_days", [(0, 45)])
def test_churn_risk_is_rescored_for_silent_customers(stage_days: tuple[int, int]) -> None:
    """Churn checkpoints (7 and 30 idle days) snapshot a silent customer for the churn model,
    and so does the churn risk emitted with her lifecycle move (new -> active at day 10)."""
    start, end = stage_days
    p = processor_factory()
    run(p, [click("alice", start), click("bob", end)])
    alice = p.store.get("alice")
    assert alice is not None
    assert [round((s[0] - T0.timestamp()) / 86400) for s in alice.churn_pending] == [7, 10, 30]
    assert alice.churn_checkpoint == 2
