"""Tests for stream_app.contracts.events: the contracts and the one decoder, `decode_event`.

Every rejection is checked for its exact reason and detail, and the dead letter must carry the
original bytes (their start, size and sha256 past 64 KiB, so it stays publishable) and where they
came from. Valid events round-trip through `encode` exactly, nothing
makes the decoder raise, and the committed JSON Schema files match the models and accept every
encoded event.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import string
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from pydantic import ValidationError

from stream_app.contracts import events
from stream_app.contracts.events import (
    IDENTIFIER_PATTERN,
    MAX_AMOUNT,
    MAX_CARRIED_BYTES,
    TEXT_PATTERN,
    ClickEvent,
    ClickType,
    Component,
    DeadLetter,
    DeadLetterReason,
    Lifecycle,
    MessageOrigin,
    Origin,
    PropensityTier,
    SegmentChange,
    TransactionEvent,
    TransactionType,
    dead_letter,
    decode_event,
    encode,
)
from stream_app.contracts.schemas import render, schema_path, stale_schemas, version, write_schemas

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = REPO_ROOT / "schemas"
FAILED_AT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
SOURCE = MessageOrigin(topic="transactions", partition=3, offset=1234)
KEY = b"cust-1\x00\xff"

CLICK: dict[str, Any] = {
    "event_id": "evt-click-1",
    "customer_id": "cust-1",
    "event_time": "2024-03-01T12:00:00Z",
    "event_type": "product_view",
    "session_id": "sess-1",
    "product_id": "p-1",
    "category": "shoes",
    "price": "59.90",
    "currency": "EUR",
    "properties": {"device": "ios", "screen": 3, "ratio": 0.5, "logged_in": True},
}
TRANSACTION: dict[str, Any] = {
    "event_id": "evt-tx-1",
    "customer_id": "cust-1",
    "event_time": "2024-03-01T12:05:00+01:00",
    "event_type": "purchase",
    "order_id": "order-1",
    "amount": "119.80",
    "currency": "EUR",
    "item_count": 2,
    "categories": ["shoes"],
}
BASES = {"click": CLICK, "transaction": TRANSACTION}
MISSING = object()

EventFactory = Callable[..., bytes]


@pytest.fixture
def payload_factory() -> EventFactory:
    """Raw JSON bytes of a valid base event of `kind`, with fields replaced (MISSING drops one)."""

    def make(kind: str, **changes: object) -> bytes:
        raw = {**BASES[kind], **changes}
        return orjson.dumps({k: v for k, v in raw.items() if v is not MISSING})

    return make


def decode(payload: bytes, kind: str = "transaction", **kwargs: Any) -> events.Event | DeadLetter:
    return decode_event(payload, kind, SOURCE, key=KEY, failed_at=FAILED_AT, **kwargs)  # type: ignore[arg-type]


def expected_dead_letter(payload: bytes, reason: DeadLetterReason, detail: str) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        detail=detail,
        source_topic="transactions",
        source_partition=3,
        source_offset=1234,
        key_b64=base64.b64encode(KEY).decode(),
        key_size_bytes=len(KEY),
        key_sha256=hashlib.sha256(KEY).hexdigest(),
        key_truncated=False,
        payload_b64=base64.b64encode(payload).decode(),
        payload_size_bytes=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_truncated=False,
        failed_at=FAILED_AT,
    )


def committed_validator(name: str) -> Draft202012Validator:
    schema = orjson.loads(schema_path(SCHEMAS, name).read_bytes())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


# --- valid events ---------------------------------------------------------------------------------


def test_valid_click_decodes_to_its_fields(payload_factory: EventFactory) -> None:
    event = decode(payload_factory("click"), "click")
    assert event == ClickEvent(
        event_id="evt-click-1",
        customer_id="cust-1",
        event_time=datetime(2024, 3, 1, 12, 0, tzinfo=UTC),
        event_type=ClickType.PRODUCT_VIEW,
        session_id="sess-1",
        product_id="p-1",
        category="shoes",
        price=Decimal("59.90"),
        currency="EUR",
        properties={"device": "ios", "screen": 3, "ratio": 0.5, "logged_in": True},
    )
    assert isinstance(event, ClickEvent)
    assert event.origin is Origin.LIVE
    assert type(event.properties["screen"]) is int
    assert type(event.properties["ratio"]) is float
    assert type(event.properties["logged_in"]) is bool


def test_valid_transaction_decodes_with_zone_and_exact_money(payload_factory: EventFactory) -> None:
    event = decode(payload_factory("transaction"))
    assert isinstance(event, TransactionEvent)
    assert event.event_type is TransactionType.PURCHASE
    assert event.amount == Decimal("119.80")
    assert format(event.amount, "f") == "119.80"
    assert event.event_time == datetime(2024, 3, 1, 11, 5, tzinfo=UTC)
    assert event.event_time.utcoffset() == timedelta(hours=1)
    assert event.item_count == 2
    assert event.categories == ["shoes"]


@pytest.mark.parametrize("amount", [1250, 12.5, "1e3", "+5", " 12.5", "1_000", "0.00010"])
def test_money_must_be_a_decimal_string_within_the_schema_pattern(
    payload_factory: EventFactory, amount: object
) -> None:
    letter = decode(payload_factory("transaction", amount=amount))
    assert isinstance(letter, DeadLetter)
    assert letter.reason is DeadLetterReason.INVALID_FIELD
    assert letter.detail.startswith("amount: Value error, money must be a decimal string")


def test_money_encodes_as_the_exact_decimal_string(payload_factory: EventFactory) -> None:
    event = decode(payload_factory("transaction", amount="0.10"))
    assert isinstance(event, TransactionEvent)
    assert orjson.loads(encode(event))["amount"] == "0.10"


def transaction_with(amount: Decimal) -> TransactionEvent:
    fields = {**TRANSACTION, "amount": amount}
    return TransactionEvent.model_validate(fields)


@pytest.mark.parametrize("amount", ["-0", "-0.01", "12.50000", "10000000.0001", "NaN", "1E-5"])
def test_money_built_in_python_obeys_the_rule_of_its_encoded_text(amount: str) -> None:
    """A Decimal that would encode to text the decoder refuses is refused when it is built."""
    with pytest.raises(ValidationError):
        transaction_with(Decimal(amount))


def test_money_built_in_python_is_kept_as_its_encoded_text() -> None:
    event = transaction_with(Decimal("1E+2"))
    assert orjson.loads(encode(event))["amount"] == "100"
    assert decode(encode(event)) == event


@pytest.mark.parametrize(
    "char", ["\x00", "\x07", "\x1f", "\x7f", "\x80", "\x9f", "\u202a", "\u202e", "\u2066", "\u2069"]
)
def test_each_end_of_each_refused_range_is_refused_in_free_text(
    payload_factory: EventFactory, char: str
) -> None:
    letter = decode(payload_factory("click", category=f"a{char}b"), "click")
    assert isinstance(letter, DeadLetter)
    assert letter.detail == f"category: {TEXT_RULE}"


@pytest.mark.parametrize(
    "char", [" ", "~", "\xa0", "\u2029", "\u202f", "\u2065", "\u206a", "\U0001f600"]
)
def test_the_neighbours_of_the_refused_ranges_are_fine_in_free_text(
    payload_factory: EventFactory, char: str
) -> None:
    event = decode(payload_factory("click", category=f"a{char}b"), "click")
    assert isinstance(event, ClickEvent)
    assert event.category == f"a{char}b"


def test_boundary_values_are_accepted(payload_factory: EventFactory) -> None:
    at_max = decode(
        payload_factory(
            "transaction",
            amount=str(MAX_AMOUNT),
            event_time="1990-01-01T00:00:00Z",
            event_id="e" * 128,
            properties={f"k{i}": i for i in range(32)},
        )
    )
    assert isinstance(at_max, TransactionEvent)
    assert at_max.amount == Decimal("10000000")


# --- rejections: exact reason and detail ----------------------------------------------------------

TEXT_RULE = f"String should match pattern '{TEXT_PATTERN}'"
ID_RULE = f"String should match pattern '{IDENTIFIER_PATTERN}'"
MONEY_SHAPE = 'Value error, money must be a decimal string such as "12.50" (up to 4 decimals)'
REJECTIONS: list[tuple[str, str, dict[str, object], DeadLetterReason, str]] = [
    (
        "unknown transaction type names the allowed ones",
        "transaction",
        {"event_type": "page_view"},
        DeadLetterReason.UNKNOWN_TYPE,
        "event_type 'page_view' is not a transaction type (purchase, refund)",
    ),
    (
        "unknown click type names the allowed ones",
        "click",
        {"event_type": "purchase"},
        DeadLetterReason.UNKNOWN_TYPE,
        "event_type 'purchase' is not a click type (cart_add, checkout, email_open, login, "
        "page_view, product_view, push_open, search)",
    ),
    (
        "a long unknown type is cut to 64 characters in the detail",
        "transaction",
        {"event_type": "x" * 100},
        DeadLetterReason.UNKNOWN_TYPE,
        f"event_type {'x' * 64!r} is not a transaction type (purchase, refund)",
    ),
    (
        "event_type of the wrong JSON type",
        "transaction",
        {"event_type": 5},
        DeadLetterReason.INVALID_FIELD,
        "event_type: Input should be 'purchase' or 'refund'",
    ),
    (
        "missing event_type",
        "transaction",
        {"event_type": MISSING},
        DeadLetterReason.INVALID_FIELD,
        "event_type: Field required",
    ),
    (
        "missing field",
        "transaction",
        {"order_id": MISSING},
        DeadLetterReason.INVALID_FIELD,
        "order_id: Field required",
    ),
    (
        "several missing fields are all named",
        "click",
        {"event_id": MISSING, "customer_id": MISSING},
        DeadLetterReason.INVALID_FIELD,
        "event_id: Field required; customer_id: Field required",
    ),
    (
        "wrong type: string for an integer",
        "transaction",
        {"item_count": "two"},
        DeadLetterReason.INVALID_FIELD,
        "item_count: Input should be a valid integer, unable to parse string as an integer",
    ),
    (
        "wrong type: number for an id",
        "transaction",
        {"event_id": 5},
        DeadLetterReason.INVALID_FIELD,
        "event_id: Input should be a valid string",
    ),
    (
        "naive timestamp (no zone)",
        "transaction",
        {"event_time": "2024-03-01T12:05:00"},
        DeadLetterReason.INVALID_FIELD,
        "event_time: Input should have timezone info",
    ),
    (
        "absurd year 2200",
        "transaction",
        {"event_time": "2200-01-01T00:00:00Z"},
        DeadLetterReason.INVALID_FIELD,
        "event_time: Value error, event_time must be between 1990 and 2100",
    ),
    (
        "before 1990",
        "click",
        {"event_time": "1989-12-31T23:59:59Z"},
        DeadLetterReason.INVALID_FIELD,
        "event_time: Value error, event_time must be between 1990 and 2100",
    ),
    (
        "negative amount",
        "transaction",
        {"amount": "-1"},
        DeadLetterReason.INVALID_FIELD,
        "amount: Input should be greater than or equal to 0",
    ),
    (
        "amount above MAX_AMOUNT",
        "transaction",
        {"amount": "10000000.01"},
        DeadLetterReason.INVALID_FIELD,
        "amount: Input should be less than or equal to 10000000",
    ),
    (
        "money as a JSON float loses cents",
        "transaction",
        {"amount": 12.5},
        DeadLetterReason.INVALID_FIELD,
        'amount: Value error, money must be a decimal string such as "12.50" (up to 4 decimals)',
    ),
    (
        "money as a JSON boolean",
        "transaction",
        {"amount": True},
        DeadLetterReason.INVALID_FIELD,
        'amount: Value error, money must be a decimal string such as "12.50" (up to 4 decimals)',
    ),
    (
        "money that is not a number",
        "transaction",
        {"amount": "12,50"},
        DeadLetterReason.INVALID_FIELD,
        'amount: Value error, money must be a decimal string such as "12.50" (up to 4 decimals)',
    ),
    (
        "money with more than 4 decimal places",
        "transaction",
        {"amount": "1.23456"},
        DeadLetterReason.INVALID_FIELD,
        'amount: Value error, money must be a decimal string such as "12.50" (up to 4 decimals)',
    ),
    (
        "money NaN",
        "transaction",
        {"amount": "NaN"},
        DeadLetterReason.INVALID_FIELD,
        'amount: Value error, money must be a decimal string such as "12.50" (up to 4 decimals)',
    ),
    (
        "negative price on a click",
        "click",
        {"price": "-0.01"},
        DeadLetterReason.INVALID_FIELD,
        "price: Input should be greater than or equal to 0",
    ),
    (
        "price as a JSON float",
        "click",
        {"price": 59.9},
        DeadLetterReason.INVALID_FIELD,
        'price: Value error, money must be a decimal string such as "12.50" (up to 4 decimals)',
    ),
    (
        "currency in lower case",
        "transaction",
        {"currency": "eur"},
        DeadLetterReason.INVALID_FIELD,
        "currency: String should match pattern '^[A-Z]{3}$'",
    ),
    (
        "currency of four letters",
        "transaction",
        {"currency": "EURO"},
        DeadLetterReason.INVALID_FIELD,
        "currency: String should match pattern '^[A-Z]{3}$'",
    ),
    (
        "too-long event id",
        "transaction",
        {"event_id": "e" * 129},
        DeadLetterReason.INVALID_FIELD,
        "event_id: String should have at most 128 characters",
    ),
    (
        "too-long customer id",
        "click",
        {"customer_id": "c" * 129},
        DeadLetterReason.INVALID_FIELD,
        "customer_id: String should have at most 128 characters",
    ),
    (
        "id with whitespace",
        "click",
        {"customer_id": "cust 1"},
        DeadLetterReason.INVALID_FIELD,
        f"customer_id: {ID_RULE}",
    ),
    (
        "empty id",
        "click",
        {"session_id": ""},
        DeadLetterReason.INVALID_FIELD,
        "session_id: String should have at least 1 character",
    ),
    (
        "too many properties",
        "click",
        {"properties": {f"k{i}": i for i in range(33)}},
        DeadLetterReason.INVALID_FIELD,
        "properties: Dictionary should have at most 32 items after validation, not more",
    ),
    (
        "too many categories",
        "transaction",
        {"categories": [f"c{i}" for i in range(33)]},
        DeadLetterReason.INVALID_FIELD,
        "categories: List should have at most 32 items after validation, not 33",
    ),
    (
        "item_count absurd",
        "transaction",
        {"item_count": 100_001},
        DeadLetterReason.INVALID_FIELD,
        "item_count: Input should be less than or equal to 100000",
    ),
    (
        "unknown schema version",
        "click",
        {"schema_version": 2},
        DeadLetterReason.INVALID_FIELD,
        "schema_version: Input should be 1",
    ),
    (
        "unknown field",
        "click",
        {"colour": "red"},
        DeadLetterReason.INVALID_FIELD,
        "colour: Extra inputs are not permitted",
    ),
    (
        "unknown origin",
        "click",
        {"origin": "backfill"},
        DeadLetterReason.INVALID_FIELD,
        "origin: Input should be 'live' or 'replay'",
    ),
    (
        "BEL in a category",
        "click",
        {"category": "shoes\x07"},
        DeadLetterReason.INVALID_FIELD,
        f"category: {TEXT_RULE}",
    ),
    (
        "NUL in a search query",
        "click",
        {"event_type": "search", "search_query": "red\x00shoes"},
        DeadLetterReason.INVALID_FIELD,
        f"search_query: {TEXT_RULE}",
    ),
    (
        "a final newline in a search query",
        "click",
        {"event_type": "search", "search_query": "shoes\n"},
        DeadLetterReason.INVALID_FIELD,
        f"search_query: {TEXT_RULE}",
    ),
    (
        "DEL in a product id",
        "click",
        {"product_id": "p\x7f1"},
        DeadLetterReason.INVALID_FIELD,
        f"product_id: {ID_RULE}",
    ),
    (
        "C1 control (NEL) in a session id",
        "click",
        {"session_id": "s\x851"},
        DeadLetterReason.INVALID_FIELD,
        f"session_id: {ID_RULE}",
    ),
    (
        "bidi override in an anonymous id",
        "click",
        {"anonymous_id": "anon\u202e1"},
        DeadLetterReason.INVALID_FIELD,
        f"anonymous_id: {ID_RULE}",
    ),
    (
        "bidi isolate in an order id",
        "transaction",
        {"order_id": "order\u20661"},
        DeadLetterReason.INVALID_FIELD,
        f"order_id: {ID_RULE}",
    ),
    (
        "escape character in a transaction category",
        "transaction",
        {"categories": ["shoes", "bags\x1b[31m"]},
        DeadLetterReason.INVALID_FIELD,
        f"categories.1: {TEXT_RULE}",
    ),
    (
        "bidi override in a property name, shown escaped",
        "click",
        {"properties": {"dev\u202eice": "ios"}},
        DeadLetterReason.INVALID_FIELD,
        f"properties.dev\\u202eice.[key]: {TEXT_RULE}",
    ),
    (
        "control character in a property value",
        "click",
        {"properties": {"device": "ios\x00"}},
        DeadLetterReason.INVALID_FIELD,
        f"properties.device.constrained-str: {TEXT_RULE}; "
        "properties.device.int: Input should be a valid integer, unable to parse string as an "
        "integer; properties.device.float: Input should be a valid number, unable to parse string "
        "as a number; properties.device.bool: Input should be a valid boolean, unable to interpret "
        "input",
    ),
    (
        "a price without its currency",
        "click",
        {"currency": MISSING},
        DeadLetterReason.INVALID_FIELD,
        "currency: Value error, a price needs its currency",
    ),
    (
        "a price with a null currency",
        "click",
        {"currency": None},
        DeadLetterReason.INVALID_FIELD,
        "currency: Value error, a price needs its currency",
    ),
    (
        "a currency without a price",
        "click",
        {"price": MISSING},
        DeadLetterReason.INVALID_FIELD,
        "currency: Value error, a currency needs a price",
    ),
    (
        "a currency with a null price",
        "click",
        {"price": None},
        DeadLetterReason.INVALID_FIELD,
        "currency: Value error, a currency needs a price",
    ),
    (
        "negative amount with cents (the schema used to allow it)",
        "transaction",
        {"amount": "-5.00"},
        DeadLetterReason.INVALID_FIELD,
        "amount: Input should be greater than or equal to 0",
    ),
    (
        "negative zero amount",
        "transaction",
        {"amount": "-0"},
        DeadLetterReason.INVALID_FIELD,
        "amount: Input should be greater than or equal to 0",
    ),
    (
        "amount above MAX_AMOUNT by leading zeros' count",
        "transaction",
        {"amount": "000010000001"},
        DeadLetterReason.INVALID_FIELD,
        "amount: Input should be less than or equal to 10000000",
    ),
    (
        "amount with 13 integer digits, even when they are leading zeros",
        "transaction",
        {"amount": "0000000000001"},
        DeadLetterReason.INVALID_FIELD,
        f"amount: {MONEY_SHAPE}",
    ),
]


@pytest.mark.parametrize(
    ("kind", "changes", "reason", "detail"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_invalid_event_is_dead_lettered_with_exact_reason(
    payload_factory: EventFactory,
    kind: str,
    changes: dict[str, object],
    reason: DeadLetterReason,
    detail: str,
) -> None:
    payload = payload_factory(kind, **changes)
    assert decode(payload, kind) == expected_dead_letter(payload, reason, detail)


def test_too_many_errors_are_summarised_as_the_first_five() -> None:
    payload = b"{}"
    expected = (
        "event_id: Field required; customer_id: Field required; event_time: Field required; "
        "event_type: Field required; order_id: Field required"
    )
    assert decode(payload) == expected_dead_letter(
        payload, DeadLetterReason.INVALID_FIELD, expected
    )


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"{", b'{"a": 1,}', b"\xff\xfe", b'"\\ud800"', b"[1e400]", b"NaN"],
    ids=[
        "empty",
        "text",
        "truncated",
        "trailing-comma",
        "not-utf8",
        "lone-surrogate",
        "inf",
        "nan",
    ],
)
def test_invalid_json_is_dead_lettered_with_the_parser_message(payload: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError) as parse:
        orjson.loads(payload)
    assert decode(payload) == expected_dead_letter(
        payload, DeadLetterReason.INVALID_JSON, str(parse.value)
    )


@pytest.mark.parametrize(
    ("payload", "type_name"),
    [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")],
)
def test_json_that_is_not_an_object_is_dead_lettered(payload: bytes, type_name: str) -> None:
    assert decode(payload) == expected_dead_letter(
        payload, DeadLetterReason.NOT_AN_OBJECT, f"expected a JSON object, got {type_name}"
    )


def test_oversized_payload_is_rejected_before_parsing(payload_factory: EventFactory) -> None:
    payload = payload_factory("transaction")
    limit = len(payload) - 1
    assert decode(payload, max_bytes=limit) == expected_dead_letter(
        payload, DeadLetterReason.OVERSIZED, f"{len(payload)} bytes exceeds {limit}"
    )
    assert isinstance(decode(payload, max_bytes=len(payload)), TransactionEvent)


def test_oversized_garbage_is_oversized_not_invalid_json() -> None:
    payload = b"\x00" * 65537
    result = decode(payload)
    assert isinstance(result, DeadLetter)
    assert result.reason is DeadLetterReason.OVERSIZED
    assert result.detail == "65537 bytes exceeds 65536"


def test_dead_letter_carries_origin_and_original_bytes() -> None:
    payload = b'{"event_type": "purchase", "amount": 1.5}\n\x00\xff'
    source = MessageOrigin(topic="clickstream", partition=7, offset=99)
    result = decode_event(payload, "click", source, key=b"\x01\x02k", failed_at=FAILED_AT)
    assert isinstance(result, DeadLetter)
    assert (result.source_topic, result.source_partition, result.source_offset) == (
        "clickstream",
        7,
        99,
    )
    assert result.key_b64 is not None
    assert base64.b64decode(result.key_b64) == b"\x01\x02k"
    assert base64.b64decode(result.payload_b64) == payload
    assert result.failed_at == FAILED_AT


def test_dead_letter_without_key_or_time() -> None:
    result = decode_event(b"[]", "click", MessageOrigin(topic="clickstream"))
    assert isinstance(result, DeadLetter)
    assert result.key_b64 is None
    assert (result.key_size_bytes, result.key_sha256, result.key_truncated) == (None, None, False)
    assert (result.source_partition, result.source_offset) == (-1, -1)
    assert result.failed_at.utcoffset() == timedelta(0)


def test_dead_letter_detail_is_capped() -> None:
    letter = dead_letter(b"x", DeadLetterReason.PROCESSING_ERROR, "d" * 5000, SOURCE)
    assert letter.detail == "d" * 2048


def test_dead_letter_encodes_and_validates_against_its_schema() -> None:
    letter = decode(b"not json")
    assert isinstance(letter, DeadLetter)
    document = orjson.loads(encode(letter))
    committed_validator("dead_letter").validate(document)
    assert DeadLetter.model_validate(document) == letter


# --- every dead letter is publishable -------------------------------------------------------------

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


def random_bytes(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def assert_carries_a_prefix(b64: str | None, original: bytes) -> None:
    assert b64 is not None
    carried = base64.b64decode(b64)
    assert len(carried) == MAX_CARRIED_BYTES
    assert carried == original[:MAX_CARRIED_BYTES]


def assert_publishable(letter: DeadLetter) -> None:
    encoded = encode(letter)
    assert len(encoded) < KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    committed_validator("dead_letter").validate(orjson.loads(encoded))
    assert DeadLetter.model_validate_json(encoded) == letter


def test_a_small_dead_letter_carries_everything_and_says_so() -> None:
    payload = b"not json"
    letter = decode(payload)
    assert isinstance(letter, DeadLetter)
    assert base64.b64decode(letter.payload_b64) == payload
    assert (letter.payload_size_bytes, letter.payload_truncated) == (len(payload), False)
    assert letter.payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert (letter.key_size_bytes, letter.key_truncated) == (len(KEY), False)
    assert letter.key_sha256 == hashlib.sha256(KEY).hexdigest()
    assert_publishable(letter)


@pytest.mark.parametrize("size", [800_000, 1_048_576], ids=["800KB", "1MiB"])
@pytest.mark.parametrize("path", ["decoder", "dead_letter"])
def test_a_huge_payload_gives_a_publishable_dead_letter_with_its_start(
    size: int, path: str
) -> None:
    payload = random_bytes(size)
    if path == "decoder":
        letter = decode(payload)
    else:
        letter = dead_letter(payload, DeadLetterReason.PROCESSING_ERROR, "boom", SOURCE, KEY)
    assert isinstance(letter, DeadLetter)
    assert_publishable(letter)
    assert letter.payload_truncated is True
    assert letter.payload_size_bytes == size
    assert letter.payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert_carries_a_prefix(letter.payload_b64, payload)
    assert letter.key_truncated is False


def test_a_huge_key_is_carried_as_its_start_with_its_size_and_hash() -> None:
    key = random_bytes(1_048_576)
    letter = dead_letter(b"{}", DeadLetterReason.PROCESSING_ERROR, "boom", SOURCE, key)
    assert_publishable(letter)
    assert letter.key_truncated is True
    assert letter.key_size_bytes == len(key)
    assert letter.key_sha256 == hashlib.sha256(key).hexdigest()
    assert_carries_a_prefix(letter.key_b64, key)
    assert (letter.payload_truncated, base64.b64decode(letter.payload_b64)) == (False, b"{}")


def test_the_largest_dead_letter_stays_far_below_the_kafka_limit() -> None:
    """Both originals huge, the longest detail in its longest JSON escape, the longest topic."""
    letter = dead_letter(
        random_bytes(1_048_576),
        DeadLetterReason.PROCESSING_ERROR,
        "\x00" * 5000,
        MessageOrigin(topic="t" * 249, partition=2**31 - 1, offset=2**63 - 1),
        random_bytes(1_048_577),
    )
    assert_publishable(letter)
    assert len(encode(letter)) < KAFKA_DEFAULT_MAX_MESSAGE_BYTES // 4


def test_a_payload_of_exactly_the_bound_is_carried_whole() -> None:
    whole = dead_letter(random_bytes(MAX_CARRIED_BYTES), DeadLetterReason.OVERSIZED, "", SOURCE)
    assert whole.payload_truncated is False
    assert base64.b64decode(whole.payload_b64) == random_bytes(MAX_CARRIED_BYTES)
    cut = dead_letter(random_bytes(MAX_CARRIED_BYTES + 1), DeadLetterReason.OVERSIZED, "", SOURCE)
    assert cut.payload_truncated is True
    assert cut.payload_size_bytes == MAX_CARRIED_BYTES + 1


def test_the_carried_bound_is_a_keyword_that_may_only_lower_it() -> None:
    letter = dead_letter(
        b"abcdef", DeadLetterReason.PROCESSING_ERROR, "d", SOURCE, b"keyk", max_carried_bytes=4
    )
    assert base64.b64decode(letter.payload_b64) == b"abcd"
    assert (letter.payload_size_bytes, letter.payload_truncated) == (6, True)
    assert letter.payload_sha256 == hashlib.sha256(b"abcdef").hexdigest()
    assert letter.key_b64 is not None
    assert (base64.b64decode(letter.key_b64), letter.key_truncated) == (b"keyk", False)
    with pytest.raises(ValueError, match="max_carried_bytes"):
        dead_letter(b"x", DeadLetterReason.PROCESSING_ERROR, "d", SOURCE, max_carried_bytes=-1)
    with pytest.raises(ValueError, match="max_carried_bytes"):
        dead_letter(
            b"x",
            DeadLetterReason.PROCESSING_ERROR,
            "d",
            SOURCE,
            max_carried_bytes=MAX_CARRIED_BYTES + 1,
        )


# --- round trips (hypothesis) ---------------------------------------------------------------------

# What the contracts refuse in every text: C0, DEL and C1 controls (category Cc) and the bidi
# overrides and isolates (in category Cf with harmless characters); ids refuse spaces (Z) too.
BIDI_CONTROLS = "".join(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))
text_characters = st.characters(exclude_categories=("Cs", "Cc"), exclude_characters=BIDI_CONTROLS)
identifiers = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc", "Z"), exclude_characters=BIDI_CONTROLS),
    min_size=1,
    max_size=128,
)
short_texts = st.text(text_characters, min_size=1, max_size=256)
zones = st.integers(-14 * 60, 14 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))
event_times = st.datetimes(
    min_value=datetime(1990, 1, 2), max_value=datetime(2099, 12, 30), timezones=zones
)
money = st.integers(0, 4).flatmap(
    lambda places: st.integers(0, int(MAX_AMOUNT) * 10**places).map(
        lambda minor: Decimal(minor).scaleb(-places)
    )
)
currencies = st.text(alphabet=string.ascii_uppercase, min_size=3, max_size=3)
property_values = st.one_of(
    st.text(text_characters, max_size=256),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
properties = st.dictionaries(st.text(text_characters, max_size=64), property_values, max_size=32)
common = {
    "event_id": identifiers,
    "customer_id": identifiers,
    "event_time": event_times,
    "origin": st.sampled_from(Origin),
    "properties": properties,
}


def priced_click(price_and_currency: tuple[Decimal, str] | None, **fields: Any) -> ClickEvent:
    """A click with a price and its currency, or with neither."""
    price, currency = price_and_currency or (None, None)
    return ClickEvent(price=price, currency=currency, **fields)


clicks = st.builds(
    priced_click,
    **common,
    event_type=st.sampled_from(ClickType),
    session_id=st.none() | identifiers,
    anonymous_id=st.none() | identifiers,
    product_id=st.none() | identifiers,
    category=st.none() | short_texts,
    price_and_currency=st.none() | st.tuples(money, currencies),
    search_query=st.none() | short_texts,
)
transactions = st.builds(
    TransactionEvent,
    **common,
    event_type=st.sampled_from(TransactionType),
    order_id=identifiers,
    amount=money,
    currency=currencies,
    item_count=st.integers(0, 100_000),
    categories=st.lists(short_texts, max_size=32),
)
KIND_OF = {ClickEvent: "click", TransactionEvent: "transaction"}
SCHEMA_OF = {ClickEvent: "click_event", TransactionEvent: "transaction_event"}


@settings(max_examples=150)
@given(st.one_of(clicks, transactions))
def test_encode_then_decode_round_trips_exactly(event: ClickEvent | TransactionEvent) -> None:
    payload = encode(event)
    decoded = decode_event(payload, KIND_OF[type(event)], SOURCE)  # type: ignore[arg-type]
    assert decoded == event
    assert encode(decoded) == payload


@settings(max_examples=150)
@given(st.one_of(clicks, transactions))
def test_every_encoded_event_validates_against_its_committed_schema(
    event: ClickEvent | TransactionEvent,
) -> None:
    committed_validator(SCHEMA_OF[type(event)]).validate(orjson.loads(encode(event)))


@pytest.mark.parametrize("amount", ["0.00010", "0E-20", "0E-70000", "0.0001", "999999999999.9999"])
def test_decoded_money_always_re_encodes_within_the_contract(
    payload_factory: EventFactory, amount: str
) -> None:
    """Whatever the decoder accepts, its own encoding validates and decodes back (regression:
    "0E-70000" used to be accepted and re-encoded as 70,000 zeros)."""
    event = decode(payload_factory("transaction", amount=amount))
    if isinstance(event, DeadLetter):
        assert event.reason is DeadLetterReason.INVALID_FIELD
        return
    assert isinstance(event, TransactionEvent)
    payload = encode(event)
    committed_validator("transaction_event").validate(orjson.loads(payload))
    assert decode(payload) == event


# --- never raises ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(sorted(TRANSACTION)) | st.text(max_size=8), children)
    ),
    max_leaves=20,
)
kinds = st.sampled_from(["click", "transaction"])


def assert_event_or_dead_letter(payload: bytes, result: object) -> None:
    assert isinstance(result, ClickEvent | TransactionEvent | DeadLetter)
    if isinstance(result, DeadLetter):
        assert base64.b64decode(result.payload_b64) == payload
        assert result.detail


@settings(max_examples=200)
@given(st.binary(max_size=512), kinds)
def test_arbitrary_bytes_never_raise(payload: bytes, kind: str) -> None:
    result = decode_event(payload, kind, SOURCE, key=payload[:8])  # type: ignore[arg-type]
    assert_event_or_dead_letter(payload, result)


@settings(max_examples=200)
@given(json_values, kinds)
def test_arbitrary_json_values_never_raise(value: object, kind: str) -> None:
    payload = json.dumps(value).encode()
    assert_event_or_dead_letter(payload, decode_event(payload, kind, SOURCE))  # type: ignore[arg-type]


@settings(max_examples=200)
@given(kinds, st.data())
def test_a_valid_event_with_one_arbitrary_field_never_raises(
    kind: str, data: st.DataObject
) -> None:
    raw = dict(BASES[kind])
    raw[data.draw(st.sampled_from(sorted(raw)))] = data.draw(json_values)
    payload = json.dumps(raw).encode()
    assert_event_or_dead_letter(payload, decode_event(payload, kind, SOURCE))  # type: ignore[arg-type]


# --- schema files ---------------------------------------------------------------------------------


def test_committed_schemas_are_up_to_date() -> None:
    assert stale_schemas(SCHEMAS) == []
    assert sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(
        schema_path(SCHEMAS, name).name for name in events.CONTRACTS
    )


@pytest.mark.parametrize("name", sorted(events.CONTRACTS))
def test_committed_schemas_are_valid_2020_12(name: str) -> None:
    schema = committed_validator(name).schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"{name}.v{version(name)}.json"


def test_written_schemas_are_fresh_and_tampering_is_reported(tmp_path: Path) -> None:
    written = write_schemas(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        f"{name}.v{version(name)}.json" for name in events.CONTRACTS
    )
    assert stale_schemas(tmp_path) == []
    click = schema_path(tmp_path, "click_event")
    click.write_bytes(click.read_bytes().replace(b'"maxLength": 128', b'"maxLength": 129', 1))
    schema_path(tmp_path, "dead_letter").unlink()
    assert stale_schemas(tmp_path) == ["click_event", "dead_letter"]


def test_a_changed_model_makes_its_schema_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_schemas(tmp_path)

    class ChangedClick(ClickEvent):
        referrer: str | None = None

    monkeypatch.setitem(events.CONTRACTS, "click_event", ChangedClick)
    assert stale_schemas(tmp_path) == ["click_event"]
    assert b'"referrer"' in render("click_event")


def test_contract_models_are_frozen(payload_factory: EventFactory) -> None:
    event = decode(payload_factory("click"), "click")
    assert isinstance(event, ClickEvent)
    with pytest.raises(ValueError, match="frozen"):
        event.customer_id = "someone-else"  # type: ignore[misc]


def _change_with(value: float, text: str) -> SegmentChange:
    segment = {
        "cluster": 2,
        "cluster_profile": text,
        "propensity_tier": PropensityTier.HIGH,
        "lifecycle": Lifecycle.AT_RISK,
    }
    return SegmentChange.model_validate(
        {
            "change_id": "0123456789abcdef0123456789abcdef",
            "customer_id": "c-\u00e9\u4e2d",
            "sequence": 7,
            "component": Component.LIFECYCLE,
            "previous": None,
            "current": segment,
            "scores": {"purchase_propensity": 0.123457, "churn_risk": 1e-05},
            "reason": {
                "trigger_event_id": "time:1700000000",
                "trigger_event_type": "time_passed",
                "summary": text,
                "top_contributions": [
                    {"feature": "order_count", "value": value, "contribution": -value},
                ],
            },
            "model_version": "m",
            "segment_definition_version": "s",
            "event_time": datetime(2011, 3, 4, 5, 6, 7, tzinfo=UTC),
            "processed_at": datetime(2011, 3, 4, 5, 6, 7, 890000, tzinfo=UTC),
            "origin": Origin.REPLAY,
        }
    )


def test_encode_gives_these_exact_bytes() -> None:
    text = 'a "quoted" \\ line\nwith \u2028, \x01 and \U0001f600'
    escaped = 'a \\"quoted\\" \\\\ line\\nwith \u2028, \\u0001 and \U0001f600'.encode()
    assert encode(_change_with(1e16, text)) == (
        b'{"schema_version":2,"change_id":"0123456789abcdef0123456789abcdef",'
        + '"customer_id":"c-\u00e9\u4e2d",'.encode()
        + b'"sequence":7,"component":"lifecycle","previous":null,"current":{"cluster":2,'
        + b'"cluster_profile":"'
        + escaped
        + b'","propensity_tier":"high","lifecycle":"at_risk"},'
        + b'"scores":{"purchase_propensity":0.123457,"churn_risk":0.00001,"absent":{}},'
        + b'"reason":{"trigger_event_id":"time:1700000000","trigger_event_type":"time_passed",'
        + b'"summary":"'
        + escaped
        + b'","top_contributions":[{"feature":"order_count","value":1e+16,"contribution":-1e+16}]},'
        + b'"model_version":"m","segment_definition_version":"s",'
        + b'"event_time":"2011-03-04T05:06:07Z","processed_at":"2011-03-04T05:06:07.890000Z",'
        + b'"origin":"replay"}'
    )


@settings(max_examples=300, deadline=None)
@given(
    value=st.floats(allow_nan=False, allow_infinity=False),
    text=st.text(min_size=1, max_size=40),
)
def test_encode_matches_orjson_over_the_json_mode_dump(value: float, text: str) -> None:
    """encode() skips the intermediate dict; its bytes must be what orjson made of that dict."""
    change = _change_with(value, text)
    assert encode(change) == orjson.dumps(change.model_dump(mode="json"))
