"""What stream_app keeps about one customer, as the domain sees it, and its stored record.

The record is a versioned JSON object with named fields (``{"format": ..., "version": 2,
"state": {...}}``), readable by name and tolerant of added fields: a name this version does not
know is ignored, a name a record lacks takes its default. Version 1 was a positional list, where
inserting a field silently shifted every stored value after it; it is migrated on read (its
layout is fixed below), and any other version is refused with a clear error, never misread.

Delivery bookkeeping (applied offsets, the outbox) is not the domain's: the live layer keeps it in
an envelope around this record (``stream_app.live.records``).

Measured (``load_tests/bench_state.py``, Online Retail states): see docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from stream_app.contracts.events import Origin
from stream_app.core.features import Behaviour
from stream_app.core.segmentation import Membership

STATE_FORMAT: Final = "stream_app.customer_state"
STATE_VERSION: Final = 2
V1_FIELDS: Final = 16  # version 1 list: version, the 12 domain fields, offsets, outbox, batch
Snapshot = list[Any]  # [event time, prediction made then, packed float32 features, outcome seen]


class StateRecordError(ValueError):
    """A stored customer record this version cannot read (unknown format or version)."""


@dataclass(slots=True)
class CustomerState:
    """What the customer did and what segment they are in."""

    customer_id: str
    behaviour: Behaviour
    membership: Membership | None = None
    sequence: int = 0
    recent_ids: list[str] = field(default_factory=list)
    # Pending label snapshots: [time, prediction then, packed float32 features, outcome seen].
    purchase_pending: list[Snapshot] = field(default_factory=list)
    churn_pending: list[Snapshot] = field(default_factory=list)
    churn_checkpoint: int = 0
    purchase_propensity: float = 0.0
    churn_risk: float | None = None  # None: not scored yet for this customer
    due_at: float | None = None
    origin: Origin = Origin.LIVE

    def to_record(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "behaviour": self.behaviour.to_record(),
            "membership": None if self.membership is None else self.membership.to_record(),
            "sequence": self.sequence,
            "recent_ids": self.recent_ids,
            "purchase_pending": self.purchase_pending,
            "churn_pending": self.churn_pending,
            "churn_checkpoint": self.churn_checkpoint,
            "purchase_propensity": self.purchase_propensity,
            "churn_risk": self.churn_risk,
            "due_at": self.due_at,
            "origin": self.origin.value,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> CustomerState:
        try:
            membership = r.get("membership")
            return cls(
                customer_id=r["customer_id"],
                behaviour=Behaviour.from_record(r["behaviour"]),
                membership=None if membership is None else Membership.from_record(membership),
                sequence=int(r.get("sequence", 0)),
                recent_ids=list(r.get("recent_ids", [])),
                purchase_pending=list(r.get("purchase_pending", [])),
                churn_pending=list(r.get("churn_pending", [])),
                churn_checkpoint=int(r.get("churn_checkpoint", 0)),
                purchase_propensity=float(r.get("purchase_propensity", 0.0)),
                churn_risk=_optional_float(r.get("churn_risk")),
                due_at=r.get("due_at"),
                origin=Origin(r.get("origin", Origin.LIVE.value)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateRecordError(f"customer state record is incomplete or wrong: {exc}") from exc

    def to_bytes(self) -> bytes:
        return orjson.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, **self.to_record()})

    @classmethod
    def from_bytes(cls, data: bytes) -> CustomerState:
        return read_record(orjson.loads(data))[0]


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def read_record(value: Any) -> tuple[CustomerState, dict[str, Any]]:
    """A stored record -> the state and the rest of the record (the live layer's envelope keys).
    Version 1 lists are migrated: their delivery fields come back as ``offsets``, ``outbox``
    and ``written_batch``."""
    if isinstance(value, list):
        return _from_v1(value)
    if not isinstance(value, dict) or value.get("format") != STATE_FORMAT:
        raise StateRecordError("not a stream_app customer state record")
    if value.get("version") != STATE_VERSION:
        raise StateRecordError(
            f"customer state version {value.get('version')!r} is not {STATE_VERSION}: "
            "written by another stream_app version"
        )
    return CustomerState.from_record(value), value


def _from_v1(v: list[Any]) -> tuple[CustomerState, dict[str, Any]]:
    if not v or v[0] != 1 or len(v) not in (V1_FIELDS - 1, V1_FIELDS):
        raise StateRecordError(f"customer state version {v[0] if v else None!r} is not readable")
    state = CustomerState(
        customer_id=v[1],
        behaviour=Behaviour.from_list(v[2]),
        membership=None if v[3] is None else Membership.from_list(v[3]),
        sequence=v[4],
        recent_ids=v[5],
        purchase_pending=v[6],
        churn_pending=v[7],
        churn_checkpoint=v[8],
        purchase_propensity=v[9],
        churn_risk=v[10],
        due_at=v[11],
        origin=Origin(v[12]),
    )
    delivery = {"offsets": v[13], "outbox": v[14], "written_batch": v[15] if len(v) > 15 else 0}
    return state, delivery
