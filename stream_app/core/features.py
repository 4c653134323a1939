"""Per-customer behavioural state and its pure update, in event time.

Memory per customer is constant: counts and sums, exponentially decayed activity and spend (one
reference time for all of them), session aggregates as running means, and a bounded category map.
Times are POSIX seconds (float) of *event* time, passed in; nothing here reads a clock.

Decayed sums are order-insensitive: an event older than the state's reference time is added with
its own decay instead of decaying the state backwards, so a late event (within the processor's
lateness bound) lands where it would have landed in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

from stream_app.contracts.events import ClickEvent, ClickType, TransactionEvent, TransactionType

HOUR: Final = 3600.0
DAY: Final = 86400.0
ACTIVITY_HALF_LIVES: Final = (HOUR, 7 * DAY, 30 * DAY)
SPEND_HALF_LIFE: Final = 30 * DAY
ENGAGEMENT_HALF_LIFE: Final = 30 * DAY
BROWSING_HALF_LIFE: Final = HOUR
CATEGORY_HALF_LIFE: Final = 30 * DAY
SESSION_MEAN_WEIGHT: Final = 0.2  # running mean weight of the newest session
DAYS_CAP: Final = 365.0

FEATURES: Final = (
    "days_since_last_event",
    "days_since_last_order",
    "order_count",
    "total_spend",
    "average_order_value",
    "refund_rate",
    "activity_last_hour",
    "activity_last_week",
    "activity_last_month",
    "spend_last_month",
    "session_count",
    "average_session_depth",
    "browsing_velocity",
    "cart_abandonment_rate",
    "engagement_last_month",
    "tenure_days",
    "top_category_share",
    "days_between_last_events",
)
"""Model inputs, named for what they mean to a marketer. Counts, money and days are log1p'd.

Time-consistent: every input means the same at an event and at a silent (time-driven) moment,
computed as of that moment with the triggering event counted (it is in the state) and every decay
aged to that time. `days_since_last_event` is the time since the latest event (0 at an event);
`days_between_last_events` is the gap that the latest event ended (the same at an event and at
every silent moment after it). One input used to mean both: the gap at an event, the idle time
at a silent moment, so a model learning at events misread silent customers and vice versa.
(Appended last, so a packed snapshot of the 17 older inputs is a prefix of this layout.)"""

_BROWSE: Final = frozenset({ClickType.PAGE_VIEW, ClickType.PRODUCT_VIEW, ClickType.SEARCH})
_ENGAGE: Final = frozenset({ClickType.EMAIL_OPEN, ClickType.PUSH_OPEN})


def _decay(elapsed: float, half_life: float) -> float:
    return 1.0 if elapsed <= 0 else 0.5 ** (elapsed / half_life)


@dataclass(slots=True)
class Behaviour:
    """What a customer has done, summarised so it stays a few hundred bytes."""

    first_seen: float
    last_event_at: float
    last_order_at: float | None = None
    order_count: int = 0
    total_spend: float = 0.0
    refund_count: int = 0
    refund_amount: float = 0.0
    decay_ref: float = 0.0
    activity: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    spend_recent: float = 0.0
    browsing: float = 0.0
    engagement: float = 0.0
    session_id: str | None = None
    session_start: float = 0.0
    last_click_at: float | None = None
    session_events: int = 0
    session_has_cart: bool = False
    session_purchased: bool = False
    session_count: int = 0
    session_depth_mean: float = 0.0
    session_gap_mean_days: float = 0.0
    cart_adds: int = 0
    cart_sessions: int = 0
    abandoned_sessions: int = 0
    categories: dict[str, float] = field(default_factory=dict)
    last_gap: float = 0.0  # seconds between the latest event and the one before it

    @classmethod
    def first(cls, at: float) -> Behaviour:
        return cls(first_seen=at, last_event_at=at, decay_ref=at)

    def to_record(self) -> dict[str, Any]:
        """Named fields, for the stored customer record (readable by name)."""
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Behaviour:
        """Tolerant of added fields: names this version does not know are ignored, and names a
        record lacks take their defaults (a missing first_seen/last_event_at is refused)."""
        return cls(**{name: record[name] for name in cls.__slots__ if name in record})

    @classmethod
    def from_list(cls, values: list[Any]) -> Behaviour:
        """The positional layout of state version 1 (only to migrate stored records)."""
        return cls(*values)


def _add_decayed(b: Behaviour, at: float) -> float:
    """Move the decay reference forward to `at` (returns weight 1) or weight a late event."""
    if at >= b.decay_ref:
        elapsed = at - b.decay_ref
        if elapsed > 0:
            for i, half_life in enumerate(ACTIVITY_HALF_LIVES):
                b.activity[i] *= _decay(elapsed, half_life)
            b.spend_recent *= _decay(elapsed, SPEND_HALF_LIFE)
            b.browsing *= _decay(elapsed, BROWSING_HALF_LIFE)
            b.engagement *= _decay(elapsed, ENGAGEMENT_HALF_LIFE)
            factor = _decay(elapsed, CATEGORY_HALF_LIFE)
            for key in b.categories:
                b.categories[key] *= factor
            b.decay_ref = at
        return 0.0
    return b.decay_ref - at


def _bump(b: Behaviour, age: float) -> None:
    for i, half_life in enumerate(ACTIVITY_HALF_LIVES):
        b.activity[i] += _decay(age, half_life)


def _touch_category(b: Behaviour, category: str, weight: float, limit: int) -> None:
    b.categories[category] = b.categories.get(category, 0.0) + weight
    if len(b.categories) > limit:
        weakest = min(b.categories.items(), key=lambda kv: (kv[1], kv[0]))[0]
        del b.categories[weakest]


def _close_session(b: Behaviour) -> None:
    if b.session_events == 0:
        return
    if b.session_has_cart and not b.session_purchased:
        b.abandoned_sessions += 1
    b.session_depth_mean += SESSION_MEAN_WEIGHT * (b.session_events - b.session_depth_mean)


def _open_session(b: Behaviour, session_id: str | None, at: float) -> None:
    if b.session_count > 0 and b.last_click_at is not None:
        gap_days = max(0.0, at - b.last_click_at) / DAY
        b.session_gap_mean_days += SESSION_MEAN_WEIGHT * (gap_days - b.session_gap_mean_days)
    b.session_count += 1
    b.session_id = session_id
    b.session_start = at
    b.session_events = 0
    b.session_has_cart = False
    b.session_purchased = False


def _track_session(b: Behaviour, event: ClickEvent, at: float, gap: float) -> None:
    new_id = event.session_id is not None and event.session_id != b.session_id
    timed_out = b.last_click_at is None or at - b.last_click_at > gap
    if new_id or (event.session_id is None and timed_out) or b.session_count == 0:
        _close_session(b)
        _open_session(b, event.session_id, at)
    b.session_events += 1
    if b.last_click_at is None or at > b.last_click_at:
        b.last_click_at = at


def apply_click(
    b: Behaviour, event: ClickEvent, at: float, *, session_gap: float, category_limit: int
) -> None:
    """Fold one click into the behaviour (in place)."""
    age = _add_decayed(b, at)
    _bump(b, age)
    _track_session(b, event, at, session_gap)
    kind = event.event_type
    if kind in _BROWSE:
        b.browsing += _decay(age, BROWSING_HALF_LIFE)
    elif kind in _ENGAGE:
        b.engagement += _decay(age, ENGAGEMENT_HALF_LIFE)
    elif kind is ClickType.CART_ADD:
        b.cart_adds += 1
        if not b.session_has_cart:
            b.session_has_cart = True
            b.cart_sessions += 1
    if event.category is not None:
        _touch_category(b, event.category, _decay(age, CATEGORY_HALF_LIFE), category_limit)
    _advance_last_event(b, at)


def _advance_last_event(b: Behaviour, at: float) -> None:
    if at > b.last_event_at:
        b.last_gap = at - b.last_event_at
        b.last_event_at = at


def apply_transaction(
    b: Behaviour, event: TransactionEvent, at: float, *, session_gap: float, category_limit: int
) -> None:
    """Fold one purchase or refund into the behaviour (in place). A refund is counted, but it is
    not activity: it moves neither recency nor the decayed activity (a cancellation after 259
    idle days used to make a lapsed customer "reactivated")."""
    age = _add_decayed(b, at)
    amount = float(event.amount)
    if event.event_type is not TransactionType.PURCHASE:
        b.refund_count += 1
        b.refund_amount += amount
        return
    _bump(b, age)
    b.order_count += 1
    b.total_spend += amount
    b.spend_recent += amount * _decay(age, SPEND_HALF_LIFE)
    b.last_order_at = at if b.last_order_at is None else max(b.last_order_at, at)
    if b.last_click_at is not None and at - b.last_click_at <= session_gap:
        b.session_purchased = True
    for category in event.categories:
        _touch_category(b, category, _decay(age, CATEGORY_HALF_LIFE), category_limit)
    _advance_last_event(b, at)


def _log_days(seconds: float) -> float:
    return math.log1p(min(max(seconds, 0.0) / DAY, DAYS_CAP))


def feature_vector(b: Behaviour, now: float) -> dict[str, float]:
    """The model inputs as of event time `now` (decayed values are aged to `now`)."""
    elapsed = max(0.0, now - b.decay_ref)
    orders = b.order_count
    last_order = b.last_order_at
    cart_sessions = b.cart_sessions  # includes the current session once it has a cart add
    open_abandon = 1 if (b.session_has_cart and not b.session_purchased) else 0
    top_share = 0.0
    if b.categories:
        total = sum(b.categories.values())
        top_share = max(b.categories.values()) / total if total > 0 else 0.0
    return {
        "days_since_last_event": _log_days(now - b.last_event_at),
        "days_since_last_order": _log_days(now - last_order)
        if last_order is not None
        else math.log1p(DAYS_CAP),
        "order_count": math.log1p(orders),
        "total_spend": math.log1p(b.total_spend),
        "average_order_value": math.log1p(b.total_spend / orders) if orders else 0.0,
        "refund_rate": b.refund_count / (orders + b.refund_count) if b.refund_count else 0.0,
        "activity_last_hour": math.log1p(b.activity[0] * _decay(elapsed, HOUR)),
        "activity_last_week": math.log1p(b.activity[1] * _decay(elapsed, 7 * DAY)),
        "activity_last_month": math.log1p(b.activity[2] * _decay(elapsed, 30 * DAY)),
        "spend_last_month": math.log1p(b.spend_recent * _decay(elapsed, SPEND_HALF_LIFE)),
        "session_count": math.log1p(b.session_count),
        "average_session_depth": math.log1p(b.session_depth_mean),
        "browsing_velocity": math.log1p(b.browsing * _decay(elapsed, BROWSING_HALF_LIFE)),
        "cart_abandonment_rate": (b.abandoned_sessions + open_abandon) / cart_sessions
        if cart_sessions
        else 0.0,
        "engagement_last_month": math.log1p(b.engagement * _decay(elapsed, ENGAGEMENT_HALF_LIFE)),
        "tenure_days": _log_days(now - b.first_seen),
        "top_category_share": top_share,
        "days_between_last_events": _log_days(b.last_gap),
    }
