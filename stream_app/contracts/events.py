"""Event contracts (pydantic v2) and the single decoding function used everywhere.

Every topic value is JSON. Timestamps are RFC 3339 with a zone; money is a decimal string plus an
ISO 4217 currency code, so no cent is ever lost to a float.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, NamedTuple

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from stream_app.contracts.model_record import ModelParams, ModelRecord

SCHEMA_VERSION: Final = 1
SEGMENT_CHANGE_VERSION: Final = 2  # 2: scores may be null, with the reason
MAX_AMOUNT: Final = Decimal("10000000")  # an order above ten million is absurd, not a sale
EARLIEST: Final = datetime(1990, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(2100, 1, 1, tzinfo=UTC)
MAX_JSON_NUMBER: Final = sys.float_info.max  # orjson refuses a JSON number beyond a double
MAX_CARRIED_BYTES: Final = 65536  # of the original payload (and key) carried by a dead letter

# Every pattern below means the same in ECMA-262 (what JSON Schema specifies), in Rust's `regex`
# (what pydantic runs) and in Python's `re.fullmatch`: explicit code points, `[0-9]` rather than
# `\d`, no `\s`, no look-around. (Python's `re.search`, which the jsonschema package uses, also
# lets `$` match before a final newline.) Each is the decoder's own check, published as it is.

# C0 controls (NUL, BEL, newline...), DEL, C1 controls, and the bidi overrides and isolates that
# make text display in an order other than the stored one ("Trojan Source").
CONTROL_CHARACTERS: Final = r"\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
# Unicode White_Space that is not already a control character.
_SPACES: Final = r"\x20\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
TEXT_PATTERN: Final = rf"^[^{CONTROL_CHARACTERS}]*$"
IDENTIFIER_PATTERN: Final = rf"^[^{CONTROL_CHARACTERS}{_SPACES}]+$"

# 0 to MAX_AMOUNT, at most 12 integer digits (leading zeros allowed) and 4 decimals, no sign:
# up to 5 leading zeros and 7 digits is every value below ten million; then ten million itself.
MONEY_PATTERN: Final = r"^(?:0{0,5}[0-9]{1,7}(?:\.[0-9]{1,4})?|0{0,4}10000000(?:\.0{1,4})?)$"
_MONEY_RE: Final = re.compile(MONEY_PATTERN)
_DECIMAL_RE: Final = re.compile(r"-?[0-9]+(?:\.[0-9]{1,4})?")  # well formed, maybe out of range


def _event_time_pattern() -> str:
    """RFC 3339 with a zone, within [EARLIEST, LATEST) whatever the zone.

    Any zone is fine from 1990-01-02 to 2099-12-30. On 1990-01-01 only a zone at or west of UTC
    is surely not before 1990, and on 2099-12-31 only one at or east of UTC is surely before 2100,
    so the pattern refuses the other zones on those two days (the decoder compares exactly).
    The calendar (no 30 February) is the job of ``format: date-time``.
    """
    day = r"(?:0[1-9]|[12][0-9]|3[01])"
    month_day = rf"(?:0[1-9]|1[0-2])-{day}"
    clock = r"[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?"
    hours = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
    inner_dates = (
        rf"(?:(?:199[1-9]|20[0-8][0-9]|209[0-8])-{month_day}"
        rf"|1990-(?:01-(?:0[2-9]|[12][0-9]|3[01])|(?:0[2-9]|1[0-2])-{day})"
        rf"|2099-(?:(?:0[1-9]|1[01])-{day}|12-(?:0[1-9]|[12][0-9]|30)))"
    )
    return (
        rf"^(?:{inner_dates}{clock}(?:[Zz]|[+-]{hours})"
        rf"|1990-01-01{clock}(?:[Zz]|-{hours}|\+00:00)"
        rf"|2099-12-31{clock}(?:[Zz]|\+{hours}|-00:00))$"
    )


EVENT_TIME_PATTERN: Final = _event_time_pattern()
_EVENT_TIME_RULE: Final = (
    "RFC 3339 with a zone, from 1990-01-01T00:00:00Z (inclusive) to 2100-01-01T00:00:00Z "
    "(exclusive). The pattern refuses zones east of UTC on 1990-01-01 and west of UTC on "
    "2099-12-31, where the zone decides."
)


def _money_from_json(value: object) -> Decimal:
    """Exactly what the published schema allows: a decimal string from 0 to MAX_AMOUNT, at most
    12 integer digits and 4 decimals. No floats (they lose cents), no exponents (``0E-70000``
    would re-encode as 70,000 zeros), no JSON numbers, no sign (``-0`` is not a price either).

    A Decimal built in Python passes the same check on the text it will be encoded as, so every
    event that can be built can also be decoded.
    """
    text = format(value, "f") if isinstance(value, Decimal) else value
    if isinstance(text, str) and _MONEY_RE.fullmatch(text) is not None:
        return Decimal(text)
    raise _money_error(text)


def _money_error(text: object) -> ValueError | PydanticCustomError:
    """The most precise reason a money value is refused: its sign, its size, or its shape."""
    if isinstance(text, str) and _DECIMAL_RE.fullmatch(text) is not None:
        if text.startswith("-"):
            return PydanticCustomError(
                "greater_than_equal", "Input should be greater than or equal to {ge}", {"ge": 0}
            )
        if Decimal(text) > MAX_AMOUNT:
            return PydanticCustomError(
                "less_than_equal",
                "Input should be less than or equal to {le}",
                {"le": str(MAX_AMOUNT)},
            )
    return ValueError('money must be a decimal string such as "12.50" (up to 4 decimals)')


def _money_to_json(value: Decimal) -> str:
    return format(value, "f")


Money = Annotated[
    Decimal,
    BeforeValidator(_money_from_json),
    PlainSerializer(_money_to_json, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": MONEY_PATTERN,
            "description": f"A decimal string from 0 to {MAX_AMOUNT} with at most 4 decimals, "
            'such as "12.50": no sign, no exponent, not a JSON number.',
        }
    ),
]
Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=IDENTIFIER_PATTERN)]
ShortText = Annotated[str, Field(min_length=1, max_length=256)]  # output contracts: our own text
FreeText = Annotated[str, Field(min_length=1, max_length=256, pattern=TEXT_PATTERN)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
# orjson refuses a JSON number beyond a double. (No Field bounds here: they would rename the
# union's members in every error, "properties.k.int" becoming "properties.k.constrained-int".)
JsonInteger = Annotated[
    int,
    WithJsonSchema({"type": "integer", "minimum": -MAX_JSON_NUMBER, "maximum": MAX_JSON_NUMBER}),
]
JsonNumber = Annotated[
    float,
    Field(allow_inf_nan=False),
    WithJsonSchema({"type": "number", "minimum": -MAX_JSON_NUMBER, "maximum": MAX_JSON_NUMBER}),
]
PropertyValue = (
    Annotated[str, Field(max_length=256, pattern=TEXT_PATTERN)] | JsonInteger | JsonNumber | bool
)


def _keys_as_property_names(schema: dict[str, Any]) -> None:
    """Publish the key pattern as ``propertyNames``, as the decoder applies it.

    pydantic renders a key pattern as ``patternProperties``, which leaves every key that does
    not match it unconstrained, where the decoder refuses such a key.
    """
    ((pattern, values),) = schema.pop("patternProperties").items()
    schema["additionalProperties"] = values
    schema["propertyNames"]["pattern"] = pattern


Properties = Annotated[
    dict[Annotated[str, Field(max_length=64, pattern=TEXT_PATTERN)], PropertyValue],
    Field(max_length=32, json_schema_extra=_keys_as_property_names),
]
# price and currency: both given or neither, as the ClickEvent validator checks.
_PRICE_WITH_CURRENCY: Final[dict[str, Any]] = {
    "anyOf": [
        {
            "required": ["price", "currency"],
            "properties": {"price": {"type": "string"}, "currency": {"type": "string"}},
        },
        {"properties": {"price": {"type": "null"}, "currency": {"type": "null"}}},
    ]
}


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
    event_time: AwareDatetime = Field(
        description=_EVENT_TIME_RULE, json_schema_extra={"pattern": EVENT_TIME_PATTERN}
    )
    origin: Origin = Origin.LIVE
    properties: Properties = Field(default_factory=dict)

    @field_validator("event_time")
    @classmethod
    def _plausible_time(cls, value: datetime) -> datetime:
        if not EARLIEST <= value < LATEST:
            raise ValueError("event_time must be between 1990 and 2100")
        return value


class ClickEvent(_Event):
    """A behavioural event from the `clickstream` topic, keyed by customer (or anonymous) id.

    A price comes with its currency and a currency only with a price. The decoder refuses a
    message over its max_bytes (65536 by default) before parsing it.
    """

    model_config = ConfigDict(json_schema_extra=_PRICE_WITH_CURRENCY)

    event_type: ClickType
    session_id: Identifier | None = None
    anonymous_id: Identifier | None = None
    product_id: Identifier | None = None
    category: FreeText | None = None
    price: Money | None = Field(None, description="Required with currency, refused without it.")
    currency: Currency | None = Field(
        None,
        validate_default=True,
        description="ISO 4217 code of price: required with price, refused without it.",
    )
    search_query: FreeText | None = None

    @field_validator("currency")
    @classmethod
    def _currency_goes_with_price(cls, value: str | None, info: ValidationInfo) -> str | None:
        """An amount is meaningless without its currency, and a currency without an amount."""
        if "price" not in info.data:  # the price itself was refused: that error says it
            return value
        if info.data["price"] is not None and value is None:
            raise ValueError("a price needs its currency")
        if info.data["price"] is None and value is not None:
            raise ValueError("a currency needs a price")
        return value


class TransactionEvent(_Event):
    """A purchase or refund from the `transactions` topic, keyed by customer id.

    The decoder refuses a message over its max_bytes (65536 by default) before parsing it.
    """

    event_type: TransactionType
    order_id: Identifier
    amount: Money
    currency: Currency
    item_count: int = Field(1, ge=0, le=100_000)
    categories: Annotated[list[FreeText], Field(max_length=32)] = Field(default_factory=list)


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


ScoreName = Literal["purchase_propensity", "churn_risk"]


class Scores(_Contract):
    """The customer's scores as of the change. A score that was not computed is ``null``, never
    a number that looks like one (``churn_risk: 0.0`` read as "no risk"), and ``absent`` says
    why, keyed by the score's name."""

    purchase_propensity: float | None = Field(ge=0, le=1)
    churn_risk: float | None = Field(ge=0, le=1)
    absent: dict[ScoreName, ShortText] = Field(
        default_factory=dict, description="Why each null score was not computed."
    )


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
    drops a redelivered change by its id and detects a gap by its sequence number. Version 2:
    scores may be null, with the reason in ``scores.absent`` (see docs/integration-guide.md,
    versioning policy).
    """

    schema_version: Literal[2] = SEGMENT_CHANGE_VERSION
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


class SegmentMembership(_Contract):
    """The compacted `segment-membership` value (keyed by customer id): the customer's current
    segment as of their newest change. A new subscriber reads the topic from the beginning to
    know everyone's segment, then follows `segment-changes`; ``sequence`` and ``change_id`` say
    which change it reflects (a change with a higher sequence supersedes it)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    customer_id: Identifier
    segment: Segment
    segment_name: ShortText
    sequence: int = Field(ge=1)
    change_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    event_time: AwareDatetime
    origin: Origin
    model_version: ShortText


class DeadLetterReason(StrEnum):
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    OVERSIZED = "oversized"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    LATE_EVENT = "late_event"
    FUTURE_EVENT = "future_event"
    PROCESSING_ERROR = "processing_error"


Base64 = Annotated[
    str,
    Field(
        max_length=4 * -(-MAX_CARRIED_BYTES // 3), json_schema_extra={"contentEncoding": "base64"}
    ),
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class DeadLetter(_Contract):
    """An input that could not be processed, with the original bytes and where it came from.

    The original payload and key are carried whole up to 65,536 bytes each (MAX_CARRIED_BYTES);
    past that only their first 65,536 bytes, with `*_truncated` true. Their size and sha256
    always describe the whole original, so a dead letter stays far below Kafka's 1 MiB limit
    and still identifies what was refused.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    reason: DeadLetterReason
    detail: Annotated[str, Field(max_length=2048)]
    source_topic: Annotated[str, Field(min_length=1, max_length=249)]
    source_partition: int = Field(ge=-1)
    source_offset: int = Field(ge=-1)
    key_b64: Base64 | None = None
    key_size_bytes: int | None = Field(None, ge=0, description="Of the whole original key.")
    key_sha256: Sha256 | None = Field(None, description="Of the whole original key.")
    key_truncated: bool = Field(False, description="key_b64 holds only the key's start.")
    payload_b64: Base64
    payload_size_bytes: int = Field(ge=0, description="Of the whole original payload.")
    payload_sha256: Sha256 = Field(description="Of the whole original payload.")
    payload_truncated: bool = Field(description="payload_b64 holds only the payload's start.")
    failed_at: AwareDatetime


CONTRACTS: Final[dict[str, type[BaseModel]]] = {
    "click_event": ClickEvent,
    "transaction_event": TransactionEvent,
    "segment_change": SegmentChange,
    "segment_membership": SegmentMembership,
    "dead_letter": DeadLetter,
    "model_record": ModelRecord,
    "model_params": ModelParams,
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


_CONTROL_RE: Final = re.compile(f"[{CONTROL_CHARACTERS}]")


def _escape_controls(text: str) -> str:
    """A refused dict key shows in the detail as ``\\u202e``, never as the character itself: a
    bidi override or a newline in a dead letter would garble whatever log line shows it."""
    return _CONTROL_RE.sub(lambda match: f"\\u{ord(match[0]):04x}", text)


def describe_errors(error: ValidationError) -> str:
    """pydantic's failures as 'field: message' pairs, short enough for a log line or a dead
    letter (control characters in field names escaped)."""
    parts = []
    for item in error.errors(include_url=False)[:5]:
        loc = ".".join(_escape_controls(str(p)) for p in item["loc"]) or "(root)"
        parts.append(f"{loc}: {item['msg']}")
    return "; ".join(parts)


class _Carried(NamedTuple):
    b64: str
    size_bytes: int
    sha256: str
    truncated: bool


def _carry(data: bytes, limit: int) -> _Carried:
    """At most `limit` bytes of `data`, with the size and hash that identify all of it."""
    return _Carried(
        _b64(data[:limit]), len(data), hashlib.sha256(data).hexdigest(), len(data) > limit
    )


def dead_letter(
    payload: bytes,
    reason: DeadLetterReason,
    detail: str,
    source: MessageOrigin,
    key: bytes | None = None,
    failed_at: datetime | None = None,
    *,
    max_carried_bytes: int = MAX_CARRIED_BYTES,
) -> DeadLetter:
    """The dead letter of one message, always small enough to publish.

    A message can be refused precisely because it is huge (up to the broker's own limit), so
    payload and key are each carried up to `max_carried_bytes` (at most MAX_CARRIED_BYTES, the
    published bound), with the whole original's size and sha256.
    """
    if not 0 <= max_carried_bytes <= MAX_CARRIED_BYTES:
        raise ValueError(f"max_carried_bytes must be within 0..{MAX_CARRIED_BYTES}")
    body = _carry(payload, max_carried_bytes)
    head = None if key is None else _carry(key, max_carried_bytes)
    return DeadLetter(
        reason=reason,
        detail=detail[:2048],
        source_topic=source.topic,
        source_partition=source.partition,
        source_offset=source.offset,
        key_b64=None if head is None else head.b64,
        key_size_bytes=None if head is None else head.size_bytes,
        key_sha256=None if head is None else head.sha256,
        key_truncated=head is not None and head.truncated,
        payload_b64=body.b64,
        payload_size_bytes=body.size_bytes,
        payload_sha256=body.sha256,
        payload_truncated=body.truncated,
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
        return reject(DeadLetterReason.INVALID_FIELD, describe_errors(exc))


def encode(model: BaseModel) -> bytes:
    """The one JSON encoding of every contract: compact JSON straight from pydantic's serializer.

    Byte for byte what ``orjson.dumps(model.model_dump(mode="json"))`` gives (same key order,
    shortest round-trip floats, the same string escapes; a unit test holds them equal) without
    the intermediate dict.
    """
    return model.__pydantic_serializer__.to_json(model)
