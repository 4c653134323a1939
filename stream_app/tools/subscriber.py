"""A reference subscriber for email/push systems: read `segment-changes` as your own group.

What a downstream system must do, and this does:
* validate each value against the SegmentChange contract (schemas/segment_change.v2.json);
* drop a change whose ``change_id`` it has already seen (delivery is at-least-once);
* per customer, expect ``sequence`` to grow by one; a jump means an earlier change is still on
  its way or was lost, a lower number is a re-delivery;
* ignore ``origin == "replay"`` for campaigns (backfill must never fire a live campaign).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from confluent_kafka import Consumer
from pydantic import ValidationError

from stream_app.contracts.events import Origin, SegmentChange
from stream_app.settings import Settings

SEEN_IDS_LIMIT: Final = 1_000_000


@dataclass
class SubscriberState:
    seen: dict[str, None] = field(default_factory=dict)  # insertion-ordered set of change ids
    last_sequence: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    gaps: int = 0
    invalid: int = 0


@dataclass(frozen=True)
class Interest:
    """Which changes trigger an action: entries into these lifecycle stages / tiers / clusters."""

    lifecycle: frozenset[str] = frozenset()
    propensity_tiers: frozenset[str] = frozenset()
    clusters: frozenset[int] = frozenset()
    include_replay: bool = False

    def matches(self, change: SegmentChange) -> bool:
        if change.origin is Origin.REPLAY and not self.include_replay:
            return False
        cur, prev = change.current, change.previous
        entered_stage = cur.lifecycle.value in self.lifecycle and (
            prev is None or prev.lifecycle is not cur.lifecycle
        )
        entered_tier = cur.propensity_tier.value in self.propensity_tiers and (
            prev is None or prev.propensity_tier is not cur.propensity_tier
        )
        entered_cluster = cur.cluster in self.clusters and (
            prev is None or prev.cluster != cur.cluster
        )
        no_filter = not (self.lifecycle or self.propensity_tiers or self.clusters)
        return no_filter or entered_stage or entered_tier or entered_cluster


def accept(state: SubscriberState, raw: bytes) -> SegmentChange | None:
    """Decode one value; None for a duplicate or an invalid value (counted)."""
    try:
        change = SegmentChange.model_validate_json(raw)
    except ValidationError:
        state.invalid += 1
        return None
    if change.change_id in state.seen:
        state.duplicates += 1
        return None
    state.seen[change.change_id] = None
    if len(state.seen) > SEEN_IDS_LIMIT:
        del state.seen[next(iter(state.seen))]
    last = state.last_sequence.get(change.customer_id, 0)
    if change.sequence > last + 1 and last:
        state.gaps += 1
    state.last_sequence[change.customer_id] = max(last, change.sequence)
    return change


def consume(
    settings: Settings,
    group: str,
    *,
    idle_timeout_s: float = 10.0,
    max_messages: int | None = None,
    from_beginning: bool = True,
) -> Iterator[bytes]:
    """Values from `segment-changes` until nothing arrives for `idle_timeout_s`."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "enable.auto.commit": True,
        }
    )
    consumer.subscribe([settings.segment_changes_topic])
    count = 0
    try:
        while max_messages is None or count < max_messages:
            msg = consumer.poll(idle_timeout_s)
            if msg is None:
                return
            if msg.error() is not None:
                continue
            count += 1
            yield msg.value()
    finally:
        consumer.close()


def run_subscriber(
    settings: Settings,
    group: str,
    interest: Interest,
    act: Callable[[SegmentChange], None],
    **options: Any,
) -> SubscriberState:
    state = SubscriberState()
    for raw in consume(settings, group, **options):
        change = accept(state, raw)
        if change is not None and interest.matches(change):
            act(change)
    return state


def describe(change: SegmentChange) -> str:
    before = change.previous.name if change.previous else "-"
    return (
        f"{change.event_time:%Y-%m-%d %H:%M} {change.customer_id} #{change.sequence} "
        f"{change.component.value}: {before} -> {change.current.name} "
        f"[{change.origin.value}] {change.reason.summary}"
    )
