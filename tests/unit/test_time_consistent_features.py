"""Time-consistent features (issue 13, item 1): every input means the same at an event and at a
silent, time-driven moment, computed as of that moment with the triggering event counted.

Table-driven, exact values: a customer buys at T0 and again 10 days later (then refunds once), and
the recency inputs are read at events and at the silent moments the processor re-scores.
"""

from __future__ import annotations

import base64
import itertools
import math
import struct
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from stream_app.contracts.events import ClickEvent, ClickType, TransactionEvent, TransactionType
from stream_app.core.features import (
    DAY,
    FEATURES,
    Behaviour,
    apply_click,
    apply_transaction,
    feature_vector,
)
from stream_app.core.learning import unpack_label as _unpack
from stream_app.core.processor import _pack

T0 = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
_ids = itertools.count()


def click(at: float) -> ClickEvent:
    return ClickEvent(
        event_id=f"c{next(_ids)}",
        customer_id="cust-1",
        event_time=datetime.fromtimestamp(at, UTC),
        event_type=ClickType.PAGE_VIEW,
    )


def transaction(
    amount: str, at: float, kind: TransactionType = TransactionType.PURCHASE
) -> TransactionEvent:
    return TransactionEvent(
        event_id=f"t{next(_ids)}",
        customer_id="cust-1",
        event_time=datetime.fromtimestamp(at, UTC),
        event_type=kind,
        order_id=f"o{next(_ids)}",
        amount=Decimal(amount),
        currency="EUR",
    )


def refund(amount: str, at: float) -> TransactionEvent:
    return transaction(amount, at, TransactionType.REFUND)


def apply(b: Behaviour, event: ClickEvent | TransactionEvent) -> None:
    at = event.event_time.timestamp()
    if isinstance(event, ClickEvent):
        apply_click(b, event, at, session_gap=1800, category_limit=5)
    else:
        apply_transaction(b, event, at, session_gap=1800, category_limit=5)


# (moment, seconds after T0, days_since_last_event, days_between_last_events, days_since_last_order)
RECENCY: list[tuple[str, float, float, float, float]] = [
    ("at the second purchase (event)", 10 * DAY, 0.0, math.log1p(10), 0.0),
    ("7 idle days later (checkpoint)", 17 * DAY, math.log1p(7), math.log1p(10), math.log1p(7)),
    ("30 idle days later (checkpoint)", 40 * DAY, math.log1p(30), math.log1p(10), math.log1p(30)),
    ("90 idle days later (lapsed)", 100 * DAY, math.log1p(90), math.log1p(10), math.log1p(90)),
]


def two_purchases() -> Behaviour:
    b = Behaviour.first(T0)
    apply(b, transaction("20.00", at=T0))
    apply(b, transaction("30.00", at=T0 + 10 * DAY))
    return b


@pytest.mark.parametrize(
    ("moment", "after", "since_event", "between", "since_order"),
    RECENCY,
    ids=[row[0] for row in RECENCY],
)
def test_recency_inputs_mean_the_same_at_events_and_silent_moments(
    moment: str, after: float, since_event: float, between: float, since_order: float
) -> None:
    x = feature_vector(two_purchases(), T0 + after)
    got = (
        x["days_since_last_event"],
        x["days_between_last_events"],
        x["days_since_last_order"],
    )
    assert got == (since_event, between, since_order), moment


def test_the_triggering_event_is_counted_like_any_earlier_one() -> None:
    """At the event, its own purchase is in every input (activity, spend, counts); the inputs of
    a silent moment an hour later differ only by the decays aged to that hour."""
    b = two_purchases()
    at_event = feature_vector(b, T0 + 10 * DAY)
    assert at_event["order_count"] == math.log1p(2)
    assert at_event["total_spend"] == math.log1p(50)
    assert at_event["activity_last_hour"] == math.log1p(1 + 0.5**240)
    an_hour_later = feature_vector(b, T0 + 10 * DAY + 3600)
    assert an_hour_later["activity_last_hour"] == math.log1p((1 + 0.5**240) * 0.5)
    assert an_hour_later["days_since_last_event"] == math.log1p(1 / 24)
    assert an_hour_later["days_between_last_events"] == at_event["days_between_last_events"]


def test_an_event_moment_and_a_silent_moment_at_the_same_time_agree() -> None:
    """Score where you learn: the features are a function of the state and the time only, so the
    moment an event is scored and a time-driven re-scoring at that instant see one vector."""
    b = two_purchases()
    at = T0 + 10 * DAY
    assert feature_vector(b, at) == feature_vector(Behaviour.from_record(b.to_record()), at)


@pytest.mark.parametrize(
    ("events", "now", "since_event", "between"),
    [
        # one event: no gap has ended yet
        ([click(at=T0)], T0, 0.0, 0.0),
        # a refund is not activity: recency still counts from the purchase, no new gap
        (
            [transaction("20.00", at=T0), refund("20.00", at=T0 + 5 * DAY)],
            T0 + 5 * DAY,
            math.log1p(5),
            0.0,
        ),
        # two clicks an hour apart, read a day later
        ([click(at=T0), click(at=T0 + 3600)], T0 + 3600 + DAY, math.log1p(1), math.log1p(1 / 24)),
        # an event older than the latest one does not end a gap
        ([click(at=T0 + 3600), click(at=T0)], T0 + 3600, 0.0, 0.0),
    ],
    ids=["single-event", "refund", "clicks", "late-event"],
)
def test_gap_and_idle_time_exact(
    events: list[ClickEvent | TransactionEvent], now: float, since_event: float, between: float
) -> None:
    b = Behaviour.first(events[0].event_time.timestamp())
    for event in events:
        apply(b, event)
    x = feature_vector(b, now)
    assert (x["days_since_last_event"], x["days_between_last_events"]) == (since_event, between)


def test_snapshots_packed_before_the_gap_input_still_unpack() -> None:
    """A pending label snapshot stored by the previous version (17 inputs) is read with its old
    `days_since_last_event` (the gap an event ended) as `days_between_last_events`."""
    x = feature_vector(two_purchases(), T0 + 10 * DAY)
    assert _unpack(_pack(x)) == pytest.approx(x, rel=1e-6)
    old = [float(i) / 4 for i in range(len(FEATURES) - 1)]
    blob = base64.b64encode(struct.pack(f"<{len(old)}f", *old)).decode("ascii")
    restored = _unpack(blob)
    assert list(restored) == list(FEATURES)
    assert [restored[f] for f in FEATURES[:-1]] == old
    assert restored["days_between_last_events"] == old[FEATURES.index("days_since_last_event")]
