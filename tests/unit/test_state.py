"""The stored customer record: named, versioned, tolerant of added fields; version 1 (positional
lists) is migrated, anything else refused with a clear error, never misread."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from stream_app.contracts.events import ClickEvent, ClickType, TransactionEvent, TransactionType
from stream_app.core.models import SegmentModels
from stream_app.core.processor import MemoryStore, Processor
from stream_app.core.state import CustomerState, StateRecordError, read_record
from stream_app.live.store import Delivery, decode_record, encode_record
from stream_app.settings import SegmentationSettings

T0 = datetime(2024, 3, 1, tzinfo=UTC)


def lived_state() -> CustomerState:
    """A customer with membership, pending labels and categories: every field filled."""
    s = SegmentationSettings()
    p = Processor(s, SegmentModels(s), MemoryStore())
    for day in range(0, 40, 3):
        at = T0 + timedelta(days=day)
        p.process(
            ClickEvent(
                event_id=f"c{day}",
                customer_id="ann",
                event_time=at,
                event_type=ClickType.PRODUCT_VIEW,
                category=f"cat-{day % 4}",
                session_id=f"s{day}",
            )
        )
        if day % 9 == 0:
            p.process(
                TransactionEvent(
                    event_id=f"t{day}",
                    customer_id="ann",
                    event_time=at + timedelta(minutes=5),
                    event_type=TransactionType.PURCHASE,
                    order_id=f"o{day}",
                    amount="12.50",
                    currency="EUR",
                )
            )
    state = p.store.get("ann")
    assert state is not None and state.membership is not None and state.purchase_pending
    return state


def v1_bytes(state: CustomerState, delivery: Delivery) -> bytes:
    """Exactly what version 1 stored: one positional list."""
    assert state.membership is not None
    return orjson.dumps(
        [
            1,
            state.customer_id,
            list(state.behaviour.to_record().values()),
            state.membership.to_list(),
            state.sequence,
            state.recent_ids,
            state.purchase_pending,
            state.churn_pending,
            state.churn_checkpoint,
            state.purchase_propensity,
            state.churn_risk,
            state.due_at,
            state.origin.value,
            delivery.offsets,
            delivery.outbox,
            delivery.written_batch,
        ]
    )


def test_the_record_names_every_field_and_round_trips() -> None:
    state = lived_state()
    record = orjson.loads(state.to_bytes())
    assert record["format"] == "stream_app.customer_state" and record["version"] == 2
    assert record["behaviour"]["order_count"] == state.behaviour.order_count
    assert record["membership"]["stage"] == state.membership.stage.value  # type: ignore[union-attr]
    assert CustomerState.from_bytes(state.to_bytes()) == state


def test_the_live_envelope_keeps_delivery_beside_the_domain_state() -> None:
    state = lived_state()
    delivery = Delivery(offsets={"clickstream": 41}, outbox=['{"sequence":3}'], written_batch=7)
    raw = encode_record(state, delivery)
    assert decode_record(raw) == (state, delivery)
    assert CustomerState.from_bytes(raw) == state  # the domain reads its part by name
    assert "offsets" not in orjson.loads(state.to_bytes())


def test_a_version_1_record_is_migrated_field_for_field() -> None:
    state = lived_state()
    delivery = Delivery(offsets={"transactions": 5}, outbox=['{"sequence":1}'], written_batch=2)
    first = decode_record(v1_bytes(state, delivery))
    assert state.membership is not None
    state.membership.tier_since = None  # version 1 had no tier dwell: not recorded
    state.membership.cluster_name = None  # nor the cluster name the customer was told
    assert first == (state, delivery)
    without_batch = orjson.loads(v1_bytes(state, delivery))[:-1]  # before delivery markers
    migrated, envelope = decode_record(orjson.dumps(without_batch))
    assert migrated == state and envelope.written_batch == 0


def test_fields_a_newer_version_added_are_ignored_and_missing_ones_defaulted() -> None:
    state = lived_state()
    record = orjson.loads(state.to_bytes())
    record["lifetime_value"] = {"expected": 120.0}
    record["behaviour"]["favourite_colour"] = "teal"
    del record["churn_risk"]
    restored = CustomerState.from_bytes(orjson.dumps(record))
    assert restored.behaviour == state.behaviour
    assert restored.churn_risk is None  # not scored: absent, not zero


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"format": "stream_app.customer_state", "version": 3}, "version 3 is not 2"),
        ({"format": "something else", "version": 2}, "not a stream_app customer state"),
        ([2, "ann"], "version 2 is not readable"),
        ([1, "ann", []], "version 1 is not readable"),
        ({"format": "stream_app.customer_state", "version": 2}, "incomplete"),
    ],
)
def test_an_unreadable_record_is_refused_with_a_clear_error(value: object, message: str) -> None:
    with pytest.raises(StateRecordError, match=message):
        read_record(value)
