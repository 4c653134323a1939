"""Tests for stream_app.core.features: the per-customer state and its pure update, in event time.

Expected values are computed by hand from the documented definitions (half-lives, log1p of counts,
money and days, running session means). Properties cover bounds, serialisation, independence
between customers, and the order-insensitivity the module docstring promises for decayed sums.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.contracts.events import (
    MAX_AMOUNT,
    ClickEvent,
    ClickType,
    TransactionEvent,
    TransactionType,
)
from stream_app.core.features import (
    DAY,
    DAYS_CAP,
    FEATURES,
    HOUR,
    Behaviour,
    apply_click,
    apply_transaction,
    feature_vector,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
MINUTE = 60.0
GAP = 30 * MINUTE  # default session_gap_minutes
LIMIT = 5  # default top_categories

Event = ClickEvent | TransactionEvent
_ids = itertools.count()


def click(
    kind: ClickType = ClickType.PAGE_VIEW,
    at: float = T0,
    session: str | None = None,
    category: str | None = None,
    customer: str = "cust-1",
) -> ClickEvent:
    return ClickEvent(
        event_id=f"c{next(_ids)}",
        customer_id=customer,
        event_time=datetime.fromtimestamp(at, UTC),
        event_type=kind,
        session_id=session,
        category=category,
    )


def transaction(
    amount: str,
    at: float = T0,
    kind: TransactionType = TransactionType.PURCHASE,
    categories: Sequence[str] = (),
    customer: str = "cust-1",
) -> TransactionEvent:
    return TransactionEvent(
        event_id=f"t{next(_ids)}",
        customer_id=customer,
        event_time=datetime.fromtimestamp(at, UTC),
        event_type=kind,
        order_id=f"o{next(_ids)}",
        amount=Decimal(amount),
        currency="EUR",
        categories=list(categories),
    )


def refund(amount: str, at: float = T0) -> TransactionEvent:
    return transaction(amount, at, TransactionType.REFUND)


def apply(b: Behaviour, event: Event, *, gap: float = GAP, limit: int = LIMIT) -> None:
    at = event.event_time.timestamp()
    if isinstance(event, ClickEvent):
        apply_click(b, event, at, session_gap=gap, category_limit=limit)
    else:
        apply_transaction(b, event, at, session_gap=gap, category_limit=limit)


BehaviourFactory = Callable[..., Behaviour]


@pytest.fixture
def behaviour_factory() -> BehaviourFactory:
    """A Behaviour built the way the processor builds it: first() at the first event, then folds."""

    def make(events: Iterable[Event], *, gap: float = GAP, limit: int = LIMIT) -> Behaviour:
        b: Behaviour | None = None
        for event in events:
            if b is None:
                b = Behaviour.first(event.event_time.timestamp())
            apply(b, event, gap=gap, limit=limit)
        assert b is not None
        return b

    return make


def features_of(b: Behaviour, now: float) -> dict[str, float]:
    x = feature_vector(b, now)
    assert tuple(x) == FEATURES
    return x


# --- exact values ---------------------------------------------------------------------------------


def test_one_page_view_gives_exact_features(behaviour_factory: BehaviourFactory) -> None:
    b = behaviour_factory([click(category="shoes", session="s1")])
    assert features_of(b, T0) == {
        "days_since_last_event": 0.0,
        "days_since_last_order": math.log1p(365),
        "order_count": 0.0,
        "total_spend": 0.0,
        "average_order_value": 0.0,
        "refund_rate": 0.0,
        "activity_last_hour": math.log1p(1),
        "activity_last_week": math.log1p(1),
        "activity_last_month": math.log1p(1),
        "spend_last_month": 0.0,
        "session_count": math.log1p(1),
        "average_session_depth": 0.0,  # no session has closed yet
        "browsing_velocity": math.log1p(1),
        "cart_abandonment_rate": 0.0,
        "engagement_last_month": 0.0,
        "tenure_days": 0.0,
        "top_category_share": 1.0,
        "days_between_last_events": 0.0,  # no gap ended yet
    }


HALF_LIVES: list[tuple[str, Callable[[], Event], float, float]] = [
    ("activity_last_hour", click, HOUR, 1.0),
    ("activity_last_week", click, 7 * DAY, 1.0),
    ("activity_last_month", click, 30 * DAY, 1.0),
    ("browsing_velocity", lambda: click(ClickType.SEARCH), HOUR, 1.0),
    ("engagement_last_month", lambda: click(ClickType.EMAIL_OPEN), 30 * DAY, 1.0),
    ("engagement_last_month", lambda: click(ClickType.PUSH_OPEN), 30 * DAY, 1.0),
    ("spend_last_month", lambda: transaction("100.00"), 30 * DAY, 100.0),
]


@pytest.mark.parametrize(
    ("feature", "make_event", "half_life", "initial"),
    HALF_LIVES,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(HALF_LIVES)],
)
def test_decayed_value_halves_every_half_life(
    behaviour_factory: BehaviourFactory,
    feature: str,
    make_event: Callable[[], Event],
    half_life: float,
    initial: float,
) -> None:
    b = behaviour_factory([make_event()])
    assert features_of(b, T0)[feature] == math.log1p(initial)
    assert features_of(b, T0 + half_life)[feature] == math.log1p(initial / 2)
    assert features_of(b, T0 + 2 * half_life)[feature] == math.log1p(initial / 4)


def test_decay_is_carried_through_later_events(behaviour_factory: BehaviourFactory) -> None:
    b = behaviour_factory([click(at=T0), click(ClickType.LOGIN, at=T0 + HOUR)])
    x = features_of(b, T0 + HOUR)
    assert x["activity_last_hour"] == math.log1p(1.5)
    assert x["browsing_velocity"] == math.log1p(0.5)  # the login is not browsing
    assert math.isclose(x["activity_last_week"], math.log1p(1 + 0.5 ** (1 / (7 * 24))))
    assert features_of(b, T0 + 2 * HOUR)["activity_last_hour"] == math.log1p(0.75)


@pytest.mark.parametrize(
    ("idle", "expected"),
    [
        (0.0, 0.0),
        (3 * DAY, math.log1p(3)),
        (3.5 * DAY, math.log1p(3.5)),
        (365 * DAY, math.log1p(365)),
        (400 * DAY, math.log1p(DAYS_CAP)),
        (-DAY, 0.0),  # `now` before the last event never goes negative
    ],
)
def test_days_since_last_event_is_log1p_of_days(
    behaviour_factory: BehaviourFactory, idle: float, expected: float
) -> None:
    b = behaviour_factory([click(at=T0)])
    assert features_of(b, T0 + idle)["days_since_last_event"] == expected


def test_order_recency_and_tenure(behaviour_factory: BehaviourFactory) -> None:
    b = behaviour_factory([click(at=T0), transaction("5.00", at=T0 + 2 * DAY)])
    x = features_of(b, T0 + 12 * DAY)
    assert x["days_since_last_order"] == math.log1p(10)
    assert x["days_since_last_event"] == math.log1p(10)
    assert x["tenure_days"] == math.log1p(12)


def test_order_value_features(behaviour_factory: BehaviourFactory) -> None:
    b = behaviour_factory([transaction("10.00"), transaction("30.00", at=T0 + 1)])
    x = features_of(b, T0 + 1)
    assert x["order_count"] == math.log1p(2)
    assert x["total_spend"] == math.log1p(40)
    assert x["average_order_value"] == math.log1p(20)
    assert x["refund_rate"] == 0.0


@pytest.mark.parametrize(
    ("purchases", "refunds", "rate"),
    [(3, 1, 0.25), (1, 1, 0.5), (0, 2, 1.0), (4, 0, 0.0)],
)
def test_refund_rate(
    behaviour_factory: BehaviourFactory, purchases: int, refunds: int, rate: float
) -> None:
    events: list[Event] = [transaction("10.00", at=T0 + i) for i in range(purchases)]
    events += [refund("10.00", at=T0 + 100 + i) for i in range(refunds)]
    b = behaviour_factory(events)
    x = features_of(b, T0 + 200)
    assert x["refund_rate"] == rate
    assert x["total_spend"] == math.log1p(10 * purchases)  # a refund does not undo spend


SESSIONS: list[tuple[str, list[tuple[float, str | None]], int, float]] = [
    ("one session id", [(0, "s1"), (MINUTE, "s1"), (2 * MINUTE, "s1")], 1, 0.0),
    ("session id change", [(0, "s1"), (MINUTE, "s1"), (2 * MINUTE, "s2")], 2, 0.2 * 2),
    ("same id across a long gap stays one session", [(0, "s1"), (2 * HOUR, "s1")], 1, 0.0),
    ("no id, 29 minutes apart", [(0, None), (29 * MINUTE, None)], 1, 0.0),
    ("no id, exactly the gap apart", [(0, None), (GAP, None)], 1, 0.0),
    ("no id, just over the gap", [(0, None), (GAP + 1, None)], 2, 0.2 * 1),
    (
        "no id, gap between 2nd and 3rd",
        [(0, None), (10 * MINUTE, None), (41 * MINUTE + 1, None), (45 * MINUTE, None)],
        2,
        0.2 * 2,
    ),
    (
        "three sessions: running mean of depth",
        [(0, "a"), (1, "a"), (2, "a"), (3, "b"), (4, "c")],
        3,
        # closed "a" (3 events): 0.6; closed "b" (1 event): 0.6 + 0.2 * (1 - 0.6)
        0.6 + 0.2 * (1 - 0.6),
    ),
]


@pytest.mark.parametrize(
    ("clicks", "sessions", "depth_mean"),
    [case[1:] for case in SESSIONS],
    ids=[case[0] for case in SESSIONS],
)
def test_session_counting(
    behaviour_factory: BehaviourFactory,
    clicks: list[tuple[float, str | None]],
    sessions: int,
    depth_mean: float,
) -> None:
    b = behaviour_factory([click(at=T0 + offset, session=sid) for offset, sid in clicks])
    assert b.session_count == sessions
    assert math.isclose(b.session_depth_mean, depth_mean)
    x = features_of(b, T0 + clicks[-1][0])
    assert x["session_count"] == math.log1p(sessions)
    assert math.isclose(x["average_session_depth"], math.log1p(depth_mean))


CART = ClickType.CART_ADD
VIEW = ClickType.PRODUCT_VIEW
CARTS: list[tuple[str, list[Event], float]] = [
    ("no cart", [click(VIEW, T0, "s1")], 0.0),
    ("cart add in the open session counts as abandoned", [click(CART, T0, "s1")], 1.0),
    (
        "cart add, then a new session without purchase",
        [click(CART, T0, "s1"), click(VIEW, T0 + MINUTE, "s2")],
        1.0,
    ),
    (
        "purchase within the session gap completes the cart",
        [click(CART, T0, "s1"), transaction("20.00", T0 + 10 * MINUTE)],
        0.0,
    ),
    (
        "completed session stays completed after it closes",
        [
            click(CART, T0, "s1"),
            transaction("20.00", T0 + 10 * MINUTE),
            click(VIEW, T0 + HOUR, "s2"),
        ],
        0.0,
    ),
    (
        "purchase after the session gap does not complete the cart",
        [click(CART, T0, "s1"), transaction("20.00", T0 + GAP + 1)],
        1.0,
    ),
    (
        "one abandoned and one completed cart session",
        [
            click(CART, T0, "s1"),
            click(CART, T0 + HOUR, "s2"),
            transaction("20.00", T0 + HOUR + MINUTE),
        ],
        0.5,
    ),
    (
        "two cart adds in one session are one cart session",
        [click(CART, T0, "s1"), click(CART, T0 + 1, "s1"), click(VIEW, T0 + 2, "s2")],
        1.0,
    ),
    (
        "sessions without a cart do not dilute the rate",
        [click(VIEW, T0, "s1"), click(CART, T0 + HOUR, "s2"), click(VIEW, T0 + 2 * HOUR, "s3")],
        1.0,
    ),
]


@pytest.mark.parametrize(
    ("events", "rate"), [case[1:] for case in CARTS], ids=[case[0] for case in CARTS]
)
def test_cart_abandonment_rate(
    behaviour_factory: BehaviourFactory, events: list[Event], rate: float
) -> None:
    b = behaviour_factory(events)
    last = max(e.event_time.timestamp() for e in events)
    assert features_of(b, last)["cart_abandonment_rate"] == rate


def test_cart_counters(behaviour_factory: BehaviourFactory) -> None:
    b = behaviour_factory(
        [click(CART, T0, "s1"), click(CART, T0 + 1, "s1"), click(CART, T0 + HOUR, "s2")]
    )
    assert (b.cart_adds, b.cart_sessions, b.abandoned_sessions) == (3, 2, 1)


def test_category_map_evicts_the_weakest(behaviour_factory: BehaviourFactory) -> None:
    events: list[Event] = [
        click(at=T0, category="a"),
        click(at=T0, category="a"),
        click(at=T0, category="b"),
        click(at=T0 + DAY, category="c"),  # "b" has decayed for a day: weaker than the newcomer
    ]
    b = behaviour_factory(events, limit=2)
    d = 0.5 ** (1 / 30)
    assert set(b.categories) == {"a", "c"}
    assert math.isclose(b.categories["a"], 2 * d)
    assert b.categories["c"] == 1.0
    assert math.isclose(features_of(b, T0 + DAY)["top_category_share"], 2 * d / (2 * d + 1))


def test_category_eviction_can_drop_the_newcomer(behaviour_factory: BehaviourFactory) -> None:
    events: list[Event] = [
        click(at=T0, category="a"),
        click(at=T0, category="a"),
        click(at=T0, category="b"),
        click(at=T0, category="b"),
        click(at=T0, category="c"),
    ]
    b = behaviour_factory(events, limit=2)
    assert b.categories == {"a": 2.0, "b": 2.0}


def test_category_ties_are_broken_by_name(behaviour_factory: BehaviourFactory) -> None:
    b = behaviour_factory([click(category=name) for name in ("b", "c", "a")], limit=2)
    assert b.categories == {"b": 1.0, "c": 1.0}


def test_purchase_categories_count_and_the_map_stays_bounded(
    behaviour_factory: BehaviourFactory,
) -> None:
    names = [f"cat{i}" for i in range(12)]
    b = behaviour_factory([transaction("1.00", categories=names)], limit=LIMIT)
    assert len(b.categories) == LIMIT
    assert features_of(b, T0)["top_category_share"] == 1 / LIMIT


# --- properties -----------------------------------------------------------------------------------

CLICK_TYPES = list(ClickType)
KINDS = [*CLICK_TYPES, TransactionType.PURCHASE, TransactionType.REFUND]


@st.composite
def event_lists(draw: st.DrawFn, customer: str = "cust-1", max_size: int = 25) -> list[Event]:
    """Events of one customer over 90 days, in arbitrary order."""
    size = draw(st.integers(1, max_size))
    out: list[Event] = []
    for _ in range(size):
        kind = draw(st.sampled_from(KINDS))
        at = T0 + draw(st.integers(0, 90 * 24 * 60)) * MINUTE + draw(st.sampled_from([0, 0.5]))
        category = draw(st.none() | st.sampled_from("abcdefgh"))
        if isinstance(kind, ClickType):
            session = draw(st.none() | st.sampled_from(["s1", "s2", "s3"]))
            out.append(click(kind, at, session, category, customer))
        else:
            assert isinstance(kind, TransactionType)
            amount = draw(st.sampled_from(["0", "0.01", "19.99", "250.00", str(MAX_AMOUNT)]))
            categories = [] if category is None else [category]
            out.append(transaction(amount, at, kind, categories, customer))
    return out


def last_time(events: Sequence[Event]) -> float:
    return max(e.event_time.timestamp() for e in events)


COUNT_LIKE = (
    "order_count",
    "session_count",
    "average_session_depth",
    "activity_last_hour",
    "activity_last_week",
    "activity_last_month",
    "browsing_velocity",
    "engagement_last_month",
)
RATES = ("refund_rate", "cart_abandonment_rate", "top_category_share")
DAYS = ("days_since_last_event", "days_since_last_order", "tenure_days", "days_between_last_events")


@settings(max_examples=120)
@given(event_lists(), st.integers(0, 400 * 24).map(lambda h: h * HOUR))
def test_every_feature_is_finite_and_bounded(events: list[Event], later: float) -> None:
    b = Behaviour.first(events[0].event_time.timestamp())
    for event in events:
        apply(b, event)
    x = feature_vector(b, last_time(events) + later)
    n = len(events)
    eps = 1e-9
    assert tuple(x) == FEATURES
    assert all(math.isfinite(v) and v >= 0 for v in x.values()), x
    for name in RATES:
        assert 0.0 <= x[name] <= 1.0, (name, x[name])
    for name in DAYS:
        assert x[name] <= math.log1p(DAYS_CAP), (name, x[name])
    for name in COUNT_LIKE:
        assert x[name] <= math.log1p(n) + eps, (name, x[name], n)
    assert x["total_spend"] <= math.log1p(n * float(MAX_AMOUNT))
    assert x["average_order_value"] <= math.log1p(float(MAX_AMOUNT)) + eps
    assert x["spend_last_month"] <= x["total_spend"] + eps


@settings(max_examples=80)
@given(event_lists(), event_lists())
def test_state_round_trips_through_its_named_record(events: list[Event], more: list[Event]) -> None:
    b = Behaviour.first(events[0].event_time.timestamp())
    for event in events:
        apply(b, event)
    restored = Behaviour.from_record(orjson.loads(orjson.dumps(b.to_record())))
    assert restored == b
    assert restored.to_record() == b.to_record()
    # Version 1 stored the same fields positionally, in slot order: still readable.
    assert Behaviour.from_list(orjson.loads(orjson.dumps(list(b.to_record().values())))) == b
    for event in more:  # and both evolve identically afterwards
        apply(b, event)
        apply(restored, event)
    assert restored == b
    now = max(last_time(events), last_time(more))
    assert feature_vector(restored, now) == feature_vector(b, now)


@settings(max_examples=60)
@given(
    st.lists(st.sampled_from(["ann", "bob", "cy"]), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.tuples(*(event_lists(customer=name, max_size=10) for name in names))
    ),
    st.randoms(use_true_random=False),
)
def test_a_customer_does_not_depend_on_other_customers_events(
    per_customer: tuple[list[Event], ...], rng: random.Random
) -> None:
    alone: dict[str, Behaviour] = {}
    for events in per_customer:
        b = Behaviour.first(events[0].event_time.timestamp())
        for event in events:
            apply(b, event)
        alone[events[0].customer_id] = b
    # interleave: keep each customer's own order, mix the customers arbitrarily
    queues = [list(events) for events in per_customer]
    mixed: dict[str, Behaviour] = {}
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        event = queue.pop(0)
        state = mixed.get(event.customer_id)
        if state is None:
            state = mixed[event.customer_id] = Behaviour.first(event.event_time.timestamp())
        apply(state, event)
    now = max(last_time(events) for events in per_customer)
    assert mixed == alone
    for name, b in alone.items():
        assert feature_vector(mixed[name], now) == feature_vector(b, now)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


DECAYED_FEATURES = (
    "activity_last_hour",
    "activity_last_week",
    "activity_last_month",
    "spend_last_month",
    "browsing_velocity",
    "engagement_last_month",
)


@settings(max_examples=120)
@given(event_lists(max_size=15).filter(lambda events: len(events) >= 2), st.data())
def test_decayed_sums_ignore_a_swapped_adjacent_pair(
    events: list[Event], data: st.DataObject
) -> None:
    ordered = sorted(events, key=lambda e: e.event_time.timestamp())
    i = data.draw(st.integers(0, len(ordered) - 2), label="swap at")
    swapped = [*ordered[:i], ordered[i + 1], ordered[i], *ordered[i + 2 :]]

    def build(sequence: list[Event]) -> Behaviour:
        b = Behaviour.first(sequence[0].event_time.timestamp())
        for event in sequence:
            apply(b, event)
        return b

    a, b = build(ordered), build(swapped)
    assert a.decay_ref == b.decay_ref == last_time(events)
    for left, right in zip(a.activity, b.activity, strict=True):
        assert close(left, right), (a.activity, b.activity)
    assert close(a.spend_recent, b.spend_recent)
    assert close(a.browsing, b.browsing)
    assert close(a.engagement, b.engagement)
    now = last_time(events) + data.draw(st.integers(0, 60), label="days later") * DAY
    xa, xb = feature_vector(a, now), feature_vector(b, now)
    for name in DECAYED_FEATURES:
        assert close(xa[name], xb[name]), name
