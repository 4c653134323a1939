"""A refund or cancellation is not engagement (issue 13): it never moves recency, never
reactivates or re-activates anyone, never resets churn checkpoints, never counts as "active
again" for a churn label, and can only lower the purchase propensity."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_app.contracts.events import (
    ClickEvent,
    ClickType,
    Component,
    Event,
    SegmentChange,
    TransactionEvent,
    TransactionType,
)
from stream_app.core.features import DAY, Behaviour, apply_transaction
from stream_app.core.models import SegmentModels
from stream_app.core.processor import MemoryStore, Processor
from stream_app.settings import SegmentationSettings
from stream_app.tools.datasets import read_dataset
from stream_app.tools.replay import replay_offline

T0 = datetime(2011, 1, 3, tzinfo=UTC)
S = SegmentationSettings()


def tx(kind: TransactionType, day: float, amount: str = "42.50", n: int = 0) -> TransactionEvent:
    return TransactionEvent(
        event_id=f"{kind.value}-{day}-{n}",
        customer_id="ann",
        event_time=T0 + timedelta(days=day),
        event_type=kind,
        order_id=f"o-{day}-{n}",
        amount=Decimal(amount),
        currency="GBP",
    )


def view(day: float, customer: str = "bob") -> ClickEvent:
    return ClickEvent(
        event_id=f"v-{customer}-{day}",
        customer_id=customer,
        event_time=T0 + timedelta(days=day),
        event_type=ClickType.PRODUCT_VIEW,
    )


def run(events: list[Event]) -> tuple[Processor, list[SegmentChange]]:
    p = Processor(S, SegmentModels(S), MemoryStore())
    changes: list[SegmentChange] = []
    for event in events:
        changes += p.process(event).changes
    return p, changes


def lifecycle_moves(changes: list[SegmentChange]) -> list[tuple[float, str, str, str]]:
    return [
        (
            (c.event_time - T0).total_seconds() / DAY,
            c.previous.lifecycle.value,
            c.current.lifecycle.value,
            c.reason.trigger_event_type,
        )
        for c in changes
        if c.customer_id == "ann" and c.component is Component.LIFECYCLE and c.previous
    ]


REFUND, PURCHASE = TransactionType.REFUND, TransactionType.PURCHASE


@pytest.mark.parametrize(
    ("second_day", "kind", "expected"),
    [
        # A refund 259 days after the last order: the customer stays lapsed.
        (
            259,
            REFUND,
            [(30, "new", "at_risk", "time_passed"), (90, "at_risk", "lapsed", "time_passed")],
        ),
        # A purchase then is a real return.
        (
            259,
            PURCHASE,
            [
                (30, "new", "at_risk", "time_passed"),
                (90, "at_risk", "lapsed", "time_passed"),
                (259, "lapsed", "reactivated", "purchase"),
            ],
        ),
        # A refund 40 idle days in: still at risk, not active again.
        (40, REFUND, [(30, "new", "at_risk", "time_passed")]),
        (
            40,
            PURCHASE,
            [(30, "new", "at_risk", "time_passed"), (40, "at_risk", "active", "purchase")],
        ),
    ],
)
def test_a_refund_never_brings_a_customer_back(
    second_day: float, kind: TransactionType, expected: list[tuple[float, str, str, str]]
) -> None:
    _, changes = run(
        [tx(PURCHASE, 0), tx(kind, second_day, "830.00" if kind is REFUND else "42.50")]
    )
    assert lifecycle_moves(changes) == expected


def test_a_refund_moves_no_recency_and_no_activity_but_is_counted() -> None:
    b = Behaviour.first(0.0)
    apply_transaction(b, tx(PURCHASE, 0), 0.0, session_gap=1800, category_limit=5)
    before = (b.last_event_at, b.last_gap, list(b.activity), b.order_count)
    apply_transaction(b, tx(REFUND, 10, "42.50"), 10 * DAY, session_gap=1800, category_limit=5)
    assert (b.last_event_at, b.last_gap, b.order_count) == (before[0], before[1], before[3])
    assert b.activity[2] < before[2][2]  # only decayed, never bumped
    assert (b.refund_count, b.refund_amount) == (1, 42.5)


def test_a_refund_only_ever_lowers_the_purchase_propensity() -> None:
    p, _ = run([tx(PURCHASE, 0), tx(PURCHASE, 3)])
    state = p.store.get("ann")
    assert state is not None
    before = state.purchase_propensity
    p.process(tx(REFUND, 4, "12.00"))
    assert state.purchase_propensity <= before


def test_a_refund_resets_no_churn_checkpoint_and_is_no_sign_of_life() -> None:
    """Churn is scored at 7 and 30 idle days; a refund at day 10 must not restart that clock,
    and the churn snapshot taken at day 7 must not be labelled "came back" by it."""
    p, _ = run([tx(PURCHASE, 0), view(7.5), tx(REFUND, 10, "5.00"), view(12)])
    state = p.store.get("ann")
    assert state is not None
    assert state.churn_checkpoint == 1  # the 7-day checkpoint fired; the refund did not reset it
    assert [snap[3] for snap in state.churn_pending] == [False]


RETAIL = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "online_retail"
TIER_RANK = {"unscored": 0, "low": 1, "medium": 2, "high": 3}


@pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)")
def test_on_online_retail_no_refund_brings_anyone_back_or_raises_a_tier() -> None:
    """Measured before the rule: 309 comebacks (lapsed -> reactivated, at risk -> active) and
    1,739 tier rises triggered by a cancellation invoice in one replay."""
    events = read_dataset(RETAIL / "online_retail.csv.gz", "online-retail")
    out = Lines()
    _, processor, _ = replay_offline(events, S, out)  # type: ignore[arg-type]
    by_refund = [c for c in out.changes if c["reason"]["trigger_event_type"] == "refund"]
    assert len(by_refund) > 50  # refunds do still move people: down
    comebacks = [
        c
        for c in by_refund
        if c["component"] == "lifecycle"
        and c["previous"]["lifecycle"] in ("at_risk", "lapsed")
        and c["current"]["lifecycle"] in ("active", "reactivated")
    ]
    rises = [
        c
        for c in by_refund
        if c["component"] == "propensity"
        and TIER_RANK[c["current"]["propensity_tier"]] > TIER_RANK[c["previous"]["propensity_tier"]]
    ]
    assert (len(comebacks), len(rises)) == (0, 0)
    assert processor.counts["applied"] == 22190


class Lines:
    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []

    def write(self, line: bytes) -> int:
        self.changes.append(orjson.loads(line))
        return len(line)
