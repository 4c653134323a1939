"""Event contracts (pydantic v2) and the single decoding function used everywhere.

Every topic value is JSON. Timestamps are RFC 3339 with a zone; money is a decimal string plus an
ISO 4217 currency code, so no cent is ever lost to a float.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

SCHEMA_VERSION: Final = 1
MAX_AMOUNT: Final = Decimal("10000000")  # an order above ten million is absurd, not a sale
EARLIEST: Final = datetime(1990, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(2100, 1, 1, tzinfo=UTC)
MONEY_PATTERN: Final = r"^-?[0-9]{1,12}(\.[0-9]{1,4})?$"
_MONEY_RE: Final = re.compile(MONEY_PATTERN)


def _money_from_json(value: object) -> Decimal:
    """Exactly what the published schema allows: a decimal string, at most 12 integer digits and
    4 decimals. No floats (they lose cents), no exponents (``0E-70000`` would re-encode as 70,000
    zeros), no JSON numbers."""
    if isinstance(value, Decimal):
        return value
    if not isinstance(value, str) or _MONEY_RE.fullmatch(value) is None:
        raise ValueError('money must be a decimal string such as "12.50" (up to 4 decimals)')
    return Decimal(value)


def _money_to_json(value: Decimal) -> str:
    return format(value, "f")


Money = Annotated[
    Decimal,
    BeforeValidator(_money_from_json),
    Field(max_digits=16, decimal_places=4),
    PlainSerializer(_money_to_json, return_type=str),
    WithJsonSchema({"type": "string", "pattern": MONEY_PATTERN}),
]
Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s\x00-\x1f]+$")]
ShortText = Annotated[str, Field(min_length=1, max_length=256)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
PropertyValue = Annotated[str, Field(max_length=256)] | int | float | bool
Properties = Annotated[
    dict[Annotated[str, Field(max_length=64)], PropertyValue], Field(max_length=32)
]


class ClickType(StrEnum):
    PAGE_VIEW = "page_view"
    PRODUCT_VIEW = "product_view"
    SEARCH = "search"
    CART_ADD = "cart_add"
    CHECKOUT = "checkout"
    EMAIL_OPEN = "email_open"
    PUSH_OPEN = "push_open"
    LOGIN = "login"


class TransactionType(StrEnum):
    PURCHASE = "purchase"
    REFUND = "refund"


class Origin(StrEnum):
    """Where an event came from, so a live campaign never fires on backfill."""

    LIVE = "live"
    REPLAY = "replay"


class _Contract(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


class _Event(_Contract):
    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Identifier
    customer_id: Identifier
    event_time: AwareDatetime
    origin: Origin = Origin.LIVE
    properties: Properties = Field(default_factory=dict)

    @field_validator("event_time")
    @classmethod
    def _plausible_time(cls, value: datetime) -> datetime:
        if not EARLIEST <= value < LATEST:
            raise ValueError("event_time must be between 1990 and 2100")
        return value


class ClickEvent(_Event):
    """A behavioural event from the `clickstream` topic, keyed by customer (or anonymous) id."""

    event_type: ClickType
    session_id: Identifier | None = None
    anonymous_id: Identifier | None = None
    product_id: Identifier | None = None
    category: ShortText | None = None
    price: Money | None = Field(default=None, ge=0, le=MAX_AMOUNT)
    currency: Currency | None = None
    search_query: ShortText | None = None


class TransactionEvent(_Event):
    """A purchase or refund from the `transactions` topic, keyed by customer id."""

    event_type: TransactionType
    order_id: Identifier
    amount: Money = Field(ge=0, le=MAX_AMOUNT)
    currency: Currency
    item_count: int = Field(1, ge=0, le=100_000)
    categories: Annotated[list[ShortText], Field(max_length=32)] = Field(default_factory=list)


Event = ClickEvent | TransactionEvent


class Component(StrEnum):
    """Which part of a customer's segment changed."""

    ENTRY = "entry"
    CLUSTER = "cluster"
    PROPENSITY = "propensity"
    LIFECYCLE = "lifecycle"


class PropensityTier(StrEnum):
    """`unscored` until the propensity model has learned from enough matured labels."""

    UNSCORED = "unscored"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Lifecycle(StrEnum):
    NEW = "new"
    ACTIVE = "active"
    AT_RISK = "at_risk"
    LAPSED = "lapsed"
    REACTIVATED = "reactivated"


class Segment(_Contract):
    cluster: int = Field(ge=0)
    cluster_profile: ShortText
    propensity_tier: PropensityTier
    lifecycle: Lifecycle

    @property
    def name(self) -> str:
        return f"c{self.cluster}/{self.propensity_tier.value}/{self.lifecycle.value}"


class Scores(_Contract):
    purchase_propensity: float = Field(ge=0, le=1)
    churn_risk: float = Field(ge=0, le=1)


class Contribution(_Contract):
    feature: ShortText
    value: float
    contribution: float


class Reason(_Contract):
    trigger_event_id: ShortText
    trigger_event_type: ShortText
    summary: Annotated[str, Field(max_length=1024)]
    top_contributions: Annotated[list[Contribution], Field(max_length=10)]


class SegmentChange(_Contract):
    """Emitted on `segment-changes` (keyed by customer id) whenever a segment really changes.

    ``change_id`` is deterministic and ``sequence`` counts 1, 2, 3... per customer, so a consumer
    drops a redelivered change by its id and detects a gap by its sequence number.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    change_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    customer_id: Identifier
    sequence: int = Field(ge=1)
    component: Component
    previous: Segment | None
    current: Segment
    scores: Scores
    reason: Reason
    model_version: ShortText
    segment_definition_version: ShortText
    event_time: AwareDatetime
    processed_at: AwareDatetime
    origin: Origin


class DeadLetterReason(StrEnum):
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    OVERSIZED = "oversized"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    LATE_EVENT = "late_event"
    FUTURE_EVENT = "future_event"
    PROCESSING_ERROR = "processing_error"


class DeadLetter(_Contract):
    """An input that could not be processed, with the original bytes and where it came from."""

    schema_version: Literal[1] = SCHEMA_VERSION
    reason: DeadLetterReason
    detail: Annotated[str, Field(max_length=2048)]
    source_topic: Annotated[str, Field(min_length=1, max_length=249)]
    source_partition: int = Field(ge=-1)
    source_offset: int = Field(ge=-1)
    key_b64: str | None = None
    payload_b64: str
    failed_at: AwareDatetime


CONTRACTS: Final[dict[str, type[BaseModel]]] = {
    "click_event": ClickEvent,
    "transaction_event": TransactionEvent,
    "segment_change": SegmentChange,
    "dead_letter": DeadLetter,
}

EventKind = Literal["click", "transaction"]
_MODELS: Final[dict[str, type[ClickEvent] | type[TransactionEvent]]] = {
    "click": ClickEvent,
    "transaction": TransactionEvent,
}
_TYPES: Final[dict[str, frozenset[str]]] = {
    "click": frozenset(t.value for t in ClickType),
    "transaction": frozenset(t.value for t in TransactionType),
}


class MessageOrigin(BaseModel):
    """Where a raw message was read from (topic, partition, offset)."""

    model_config = ConfigDict(frozen=True)
    topic: str
    partition: int = -1
    offset: int = -1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in item["loc"]) or "(root)"
        parts.append(f"{loc}: {item['msg']}")
    return "; ".join(parts)


def dead_letter(
    payload: bytes,
    reason: DeadLetterReason,
    detail: str,
    source: MessageOrigin,
    key: bytes | None = None,
    failed_at: datetime | None = None,
) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        detail=detail[:2048],
        source_topic=source.topic,
        source_partition=source.partition,
        source_offset=source.offset,
        key_b64=None if key is None else _b64(key),
        payload_b64=_b64(payload),
        failed_at=failed_at or datetime.now(UTC),
    )


def decode_event(
    payload: bytes,
    kind: EventKind,
    source: MessageOrigin,
    *,
    key: bytes | None = None,
    max_bytes: int = 65536,
    failed_at: datetime | None = None,
) -> Event | DeadLetter:
    """Decode one raw message into its contract, or into a DeadLetter saying precisely why not.

    Never raises on bad input.
    """

    def reject(reason: DeadLetterReason, detail: str) -> DeadLetter:
        return dead_letter(payload, reason, detail, source, key, failed_at)

    if len(payload) > max_bytes:
        return reject(DeadLetterReason.OVERSIZED, f"{len(payload)} bytes exceeds {max_bytes}")
    try:
        raw: Any = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return reject(DeadLetterReason.INVALID_JSON, str(exc))
    if not isinstance(raw, dict):
        return reject(
            DeadLetterReason.NOT_AN_OBJECT, f"expected a JSON object, got {type(raw).__name__}"
        )
    event_type = raw.get("event_type")
    if isinstance(event_type, str) and event_type not in _TYPES[kind]:
        expected = ", ".join(sorted(_TYPES[kind]))
        return reject(
            DeadLetterReason.UNKNOWN_TYPE,
            f"event_type {event_type[:64]!r} is not a {kind} type ({expected})",
        )
    try:
        return _MODELS[kind].model_validate(raw)
    except ValidationError as exc:
        return reject(DeadLetterReason.INVALID_FIELD, _describe(exc))


def encode(model: BaseModel) -> bytes:
    """The one JSON encoding of every contract: compact JSON straight from pydantic's serializer.

    Byte for byte what ``orjson.dumps(model.model_dump(mode="json"))`` gives (same key order,
    shortest round-trip floats, the same string escapes; a unit test holds them equal) without
    the intermediate dict.
    """
    return model.__pydantic_serializer__.to_json(model)
