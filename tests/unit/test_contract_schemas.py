"""The published input schemas say what the decoder enforces, in standard JSON Schema 2020-12.

Instances generated from each committed input schema (clickstream and transaction events) must be
accepted by `decode_event`, and what the decoder refuses (negative money, control characters, a
price without its currency, wrong types...) must be invalid under the schema too. Schema and
decoder may differ only where the schema is the stricter one.

The validator is the jsonschema package's Draft 2020-12 one, asserting ``format: date-time``, with
one correction: a JSON Schema ``pattern`` is an ECMA-262 regex, where ``$`` ends the input, but the
package matches with Python's ``re.search``, where ``$`` also matches before a final newline (so
it would let "EUR\\n" through ``^[A-Z]{3}$``). The generator is written here from the schema's
keywords: hypothesis-jsonschema 0.23.1, the latest, fails on the installed hypothesis.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, ValidationError, validators  # type: ignore[import-untyped]

from stream_app.contracts import events
from stream_app.contracts.events import DeadLetter, DeadLetterReason, MessageOrigin, decode_event
from stream_app.contracts.schemas import schema_path

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

SOURCE = MessageOrigin(topic="contract-test")
MAX_EVENT_BYTES = 65536  # decode_event's default max_bytes
SCHEMA_OF = {"click": "click_event", "transaction": "transaction_event"}
MODEL_OF = {"click": events.ClickEvent, "transaction": events.TransactionEvent}
REFUSED_CHARACTERS = "".join(
    map(chr, [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)])
)
# Everything JSON text can carry (no lone surrogates: orjson refuses them as invalid JSON).
CHARACTERS = st.characters(codec="utf-8")

# Every keyword of the 2020-12 vocabularies. Anything else is a key no validator reads.
VOCABULARIES_2020_12 = {
    "core": "$schema $id $ref $defs $anchor $dynamicRef $dynamicAnchor $vocabulary $comment",
    "applicator": "allOf anyOf oneOf not if then else dependentSchemas prefixItems items "
    "contains properties patternProperties additionalProperties propertyNames",
    "unevaluated": "unevaluatedItems unevaluatedProperties",
    "validation": "type enum const multipleOf maximum exclusiveMaximum minimum exclusiveMinimum "
    "maxLength minLength pattern maxItems minItems uniqueItems maxContains minContains "
    "maxProperties minProperties required dependentRequired",
    "meta-data": "title description default deprecated readOnly writeOnly examples",
    "format-annotation": "format",
    "content": "contentEncoding contentMediaType contentSchema",
}
STANDARD_KEYWORDS = frozenset(" ".join(VOCABULARIES_2020_12.values()).split(" "))
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "dependentSchemas")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
SCHEMA_VALUES = (
    *("not", "if", "then", "else", "items", "contains", "additionalProperties"),
    *("propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema"),
)


# --- the validator --------------------------------------------------------------------------------


@cache
def ecma_regex(pattern: str) -> re.Pattern[str]:
    """`pattern` with ECMA-262's `$`: the end of the input, as Python's `\\Z` is."""
    assert "$" not in pattern[:-1], f"a `$` inside {pattern!r} needs a real translation"
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


def ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


EcmaValidator = validators.extend(Draft202012Validator, {"pattern": ecma_pattern})


def committed_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads(schema_path(SCHEMAS, name).read_bytes())
    return schema


@cache
def validator(name: str) -> Any:
    schema = committed_schema(name)
    Draft202012Validator.check_schema(schema)
    checker = Draft202012Validator.FORMAT_CHECKER
    assert "date-time" in checker.checkers, "date-time is only checked with rfc3339-validator"
    return EcmaValidator(schema, format_checker=checker)


# --- instances generated from a schema ------------------------------------------------------------

GENERATED_KEYWORDS = frozenset(
    " ".join(
        [
            "$schema $id $defs $ref const enum anyOf type title description default",
            "properties required additionalProperties propertyNames maxProperties items maxItems",
            "minLength maxLength pattern format minimum maximum",
        ]
    ).split(" ")
)

zones = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
EDGE_DAYS = [date(1989, 12, 31), date(1990, 1, 1), date(2099, 12, 31), date(2100, 1, 1)]
moments = st.datetimes(
    min_value=datetime(1989, 12, 30), max_value=datetime(2100, 1, 2, 23), timezones=zones
) | st.builds(  # the days where the zone decides, which a uniform draw would rarely reach
    lambda day, clock, zone: datetime.combine(day, clock, tzinfo=zone),
    st.sampled_from(EDGE_DAYS),
    st.times(),
    zones,
)
fractions = st.just("") | st.from_regex(r"\.[0-9]{1,12}", fullmatch=True)


@st.composite
def rfc3339(draw: st.DrawFn) -> str:
    """RFC 3339 date-times a little beyond the contract's range, in every spelling of a zone."""
    moment = draw(moments)
    offset = moment.utcoffset()
    assert offset is not None
    minutes = int(offset.total_seconds()) // 60
    sign, minutes = ("-", -minutes) if minutes < 0 else ("+", minutes)
    zone = f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    if minutes == 0:
        zone = draw(st.sampled_from(["Z", "+00:00", "-00:00"]))
    return f"{moment:%Y-%m-%dT%H:%M:%S}{draw(fractions)}{zone}"


def string_from(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = schema.get("minLength", 0), schema.get("maxLength", math.inf)
    if schema.get("format") == "date-time":
        strategy = rfc3339()
    elif "pattern" in schema:
        strategy = st.from_regex(schema["pattern"], fullmatch=True, alphabet=CHARACTERS)
    else:
        return st.text(CHARACTERS, min_size=low, max_size=schema.get("maxLength"))
    pattern = ecma_regex(schema.get("pattern", ""))
    return strategy.filter(lambda text: low <= len(text) <= high and bool(pattern.search(text)))


def object_from(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "properties" not in schema:  # a map, such as an event's `properties`
        names = string_from(schema.get("propertyNames", {}))
        values = from_schema(schema["additionalProperties"], root)
        return st.dictionaries(names, values, max_size=schema.get("maxProperties"))
    assert schema["additionalProperties"] is False
    fields = {name: from_schema(sub, root) for name, sub in schema["properties"].items()}
    required = set(schema.get("required", []))
    return st.fixed_dictionaries(
        {name: s for name, s in fields.items() if name in required},
        optional={name: s for name, s in fields.items() if name not in required},
    )


def from_schema(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of `schema`, read from its keywords; a keyword it does not know fails loudly.

    An object's own ``anyOf`` (the price-and-currency rule) is left to the caller's filter.
    """
    unknown = set(schema) - GENERATED_KEYWORDS
    assert not unknown, f"the generator does not know {sorted(unknown)}"
    if "$ref" in schema:
        return from_schema(root["$defs"][schema["$ref"].removeprefix("#/$defs/")], root)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema and "type" not in schema:
        return st.one_of([from_schema(branch, root) for branch in schema["anyOf"]])
    kind = schema["type"]
    if kind == "object":
        return object_from(schema, root)
    if kind == "array":
        return st.lists(from_schema(schema["items"], root), max_size=schema.get("maxItems"))
    if kind == "string":
        return string_from(schema)
    if kind == "integer":
        low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        return st.integers(
            None if low == -math.inf else math.ceil(low),
            None if high == math.inf else math.floor(high),
        )
    if kind == "number":
        low, high = schema.get("minimum"), schema.get("maximum")
        return st.floats(low, high, allow_nan=False, allow_infinity=False)
    return {"boolean": st.booleans(), "null": st.none()}[kind]


@cache
def instances(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    name = SCHEMA_OF[kind]
    schema = committed_schema(name)
    return from_schema(schema, schema).filter(validator(name).is_valid)


def encode_json(instance: object) -> bytes:
    """JSON text as a producer writes it (the standard library, which also writes big integers)."""
    return json.dumps(instance, ensure_ascii=False).encode()


# --- schema instances are accepted ----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SCHEMA_OF))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_instance_of_the_published_schema_is_accepted_by_the_decoder(
    kind: str, data: st.DataObject
) -> None:
    instance = data.draw(instances(kind))
    payload = encode_json(instance)
    result = decode_event(payload, kind, SOURCE)  # type: ignore[arg-type]
    if len(payload) > MAX_EVENT_BYTES:  # a message-size rule, stated in the schema's description
        assert isinstance(result, DeadLetter)
        assert result.reason is DeadLetterReason.OVERSIZED
        return
    assert isinstance(result, MODEL_OF[kind]), getattr(result, "detail", result)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(CHARACTERS, max_size=12)
    | st.sampled_from(["EUR", "12.50", "-1", "2024-03-01T12:00:00Z", "purchase", "live", "\x00"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children)
    ),
    max_leaves=8,
)


@pytest.mark.parametrize("kind", sorted(SCHEMA_OF))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_the_schema_allows_in_a_field_is_accepted_by_the_decoder(
    kind: str, data: st.DataObject
) -> None:
    instance = data.draw(instances(kind))
    name = data.draw(st.sampled_from(sorted(committed_schema(SCHEMA_OF[kind])["properties"])))
    instance[name] = data.draw(json_values)
    if validator(SCHEMA_OF[kind]).is_valid(instance):
        result = decode_event(encode_json(instance), kind, SOURCE)  # type: ignore[arg-type]
        assert isinstance(result, MODEL_OF[kind]), getattr(result, "detail", result)


# --- what the decoder refuses is schema-invalid ---------------------------------------------------

Mutation = Callable[[str, dict[str, Any], st.DataObject], str]
TEXT_FIELDS = {
    "click": [
        "event_id",
        "customer_id",
        "session_id",
        "anonymous_id",
        "product_id",
        "category",
        "search_query",
    ],
    "transaction": ["event_id", "customer_id", "order_id"],
}
money_refused = st.one_of(
    st.from_regex(r"-[0-9]{1,7}(\.[0-9]{1,4})?", fullmatch=True),  # negative, -0 included
    st.from_regex(r"0*[1-9][0-9]{7,11}(\.[0-9]{1,4})?", fullmatch=True).filter(
        lambda text: float(text) > float(events.MAX_AMOUNT)
    ),
    st.from_regex(r"[0-9]{1,7}\.[0-9]{5,8}", fullmatch=True),  # more than 4 decimals
    st.from_regex(r"0{13,20}[0-9]", fullmatch=True),  # more than 12 integer digits
    st.sampled_from(["1e3", "1E+2", "+5", " 12.5", "12.5 ", "12,50", "1_000", "NaN", "Infinity"]),
    st.sampled_from(["", ".5", "5.", "0x10", "١٢", "12.50\n"]),
    st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.booleans(),
)


def with_refused_character(text: str, data: st.DataObject) -> str:
    at = data.draw(st.integers(0, len(text)))
    return text[:at] + data.draw(st.sampled_from(REFUSED_CHARACTERS)) + text[at:]


def control_character_in_text(kind: str, instance: dict[str, Any], data: st.DataObject) -> str:
    name = data.draw(st.sampled_from(TEXT_FIELDS[kind]))
    instance[name] = with_refused_character(instance.get(name) or "x", data)
    return name


def control_character_in_a_category(_: str, instance: dict[str, Any], data: st.DataObject) -> str:
    categories = list(instance.get("categories") or ["shoes"])
    at = data.draw(st.integers(0, len(categories) - 1))
    categories[at] = with_refused_character(categories[at], data)
    instance["categories"] = categories
    return "categories"


def control_character_in_properties(_: str, instance: dict[str, Any], data: st.DataObject) -> str:
    text = with_refused_character(data.draw(st.text(max_size=8)), data)
    instance["properties"] = data.draw(st.sampled_from([{text: 1}, {"k": text}]))
    return "properties"


def refused_money(kind: str, instance: dict[str, Any], data: st.DataObject) -> str:
    name = "amount" if kind == "transaction" else "price"
    instance[name] = data.draw(money_refused)
    instance["currency"] = "EUR"
    return name


def price_without_currency(_: str, instance: dict[str, Any], data: st.DataObject) -> str:
    instance["price"] = data.draw(st.sampled_from(["0", "12.50", "10000000"]))
    if data.draw(st.booleans()):
        instance["currency"] = None
    else:
        instance.pop("currency", None)
    return "currency"


def currency_without_price(_: str, instance: dict[str, Any], data: st.DataObject) -> str:
    instance["currency"] = data.draw(st.text(string.ascii_uppercase, min_size=3, max_size=3))
    if data.draw(st.booleans()):
        instance["price"] = None
    else:
        instance.pop("price", None)
    return "currency"


def wrong_currency(kind: str, instance: dict[str, Any], data: st.DataObject) -> str:
    if kind == "click":
        instance["price"] = "1.00"
    instance["currency"] = data.draw(
        st.sampled_from(["eur", "EURO", "EU", "E1R", "", "EUR\n", "ÉUR"]) | st.integers()
    )
    return "currency"


def out_of_range_time(_: str, instance: dict[str, Any], data: st.DataObject) -> str:
    instance["event_time"] = data.draw(
        st.sampled_from(
            [
                "1989-12-31T23:59:59.999999Z",
                "1990-01-01T00:30:00+01:00",
                "2099-12-31T23:30:00-01:00",
                "2100-01-01T00:00:00Z",
                "2200-01-01T00:00:00Z",
                "0001-01-01T00:00:00Z",
                "2024-03-01T12:00:00",
                "2023-02-29T12:00:00Z",
                "2024-03-01T23:59:60Z",
                "2024-03-01T12:00:00+24:00",
                "2024-03-01T12:00:00Z\n",
                "yesterday",
            ]
        )
        | st.none()
    )
    return "event_time"


def too_long(kind: str, instance: dict[str, Any], data: st.DataObject) -> str:
    ids = ["event_id", "customer_id"] + (["order_id"] if kind == "transaction" else ["session_id"])
    texts = ["category", "search_query"] if kind == "click" else []
    name = data.draw(st.sampled_from(ids + texts + ["properties"]))
    if name == "properties":
        instance[name] = data.draw(
            st.sampled_from(
                [{"k" * 65: 1}, {"k": "v" * 257}, {f"k{i}": i for i in range(33)}],
            )
        )
    else:
        instance[name] = "x" * (129 if name in ids else 257)
    return name


def too_many_categories(_: str, instance: dict[str, Any], data: st.DataObject) -> str:
    instance["categories"] = [f"c{i}" for i in range(33)]
    return "categories"


WRONG_TYPES = st.sampled_from([5, 1.5, True, None, [], {}, ["x"], {"a": 1}])


def wrong_type(kind: str, instance: dict[str, Any], data: st.DataObject) -> str:
    """Any field replaced by a JSON value the decoder refuses for it (strings that parse as
    numbers and integers that are booleans are left out: the decoder's leniency there is where
    the schema is stricter)."""
    candidates = {
        name: WRONG_TYPES.filter(lambda v: v is not None)
        for name in ("event_id", "customer_id", "event_type", "event_time", "properties")
    }
    candidates["properties"] = st.sampled_from([5, "x", [], ["x"], {"k": None}, {"k": [1]}])
    candidates["schema_version"] = st.sampled_from([2, 0, "1", None, [], 1.5])
    candidates["origin"] = st.sampled_from(["backfill", 1, None, "LIVE"])
    if kind == "transaction":
        candidates["order_id"] = WRONG_TYPES
        candidates["item_count"] = st.sampled_from(["two", 2.5, -1, 100_001, None, [], {}])
        candidates["categories"] = st.sampled_from(["shoes", [1], [None], [""], {}, None])
    else:
        candidates["session_id"] = WRONG_TYPES.filter(lambda v: v is not None)
        candidates["category"] = st.sampled_from([5, [], "", True])
    name = data.draw(st.sampled_from(sorted(candidates)))
    instance[name] = data.draw(candidates[name])
    return name


def missing_required(kind: str, instance: dict[str, Any], data: st.DataObject) -> str:
    required = ["event_id", "customer_id", "event_time", "event_type"]
    required += ["order_id", "amount", "currency"] if kind == "transaction" else []
    name = data.draw(st.sampled_from(required))
    del instance[name]
    return name


def unknown_field(_: str, instance: dict[str, Any], data: st.DataObject) -> str:
    name = data.draw(st.sampled_from(["colour", "Price", "event_id ", "amount_cents"]))
    instance[name] = 1
    return name


def other_kinds_type(kind: str, instance: dict[str, Any], data: st.DataObject) -> str:
    instance["event_type"] = "purchase" if kind == "click" else "page_view"
    return "event_type"


MUTATIONS: dict[str, list[Mutation]] = {
    "click": [
        control_character_in_text,
        control_character_in_properties,
        refused_money,
        price_without_currency,
        currency_without_price,
        wrong_currency,
        out_of_range_time,
        too_long,
        wrong_type,
        missing_required,
        unknown_field,
        other_kinds_type,
    ],
    "transaction": [
        control_character_in_text,
        control_character_in_a_category,
        control_character_in_properties,
        refused_money,
        wrong_currency,
        out_of_range_time,
        too_long,
        too_many_categories,
        wrong_type,
        missing_required,
        unknown_field,
        other_kinds_type,
    ],
}


@pytest.mark.parametrize("kind", sorted(SCHEMA_OF))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_what_the_decoder_refuses_is_invalid_under_the_published_schema(
    kind: str, data: st.DataObject
) -> None:
    instance = data.draw(instances(kind))
    mutation = data.draw(st.sampled_from(MUTATIONS[kind]), label="mutation")
    field = mutation(kind, instance, data)
    result = decode_event(encode_json(instance), kind, SOURCE)  # type: ignore[arg-type]
    assert isinstance(result, DeadLetter), f"{mutation.__name__} was accepted: {instance}"
    assert result.reason in {DeadLetterReason.INVALID_FIELD, DeadLetterReason.UNKNOWN_TYPE}
    assert re.match(rf"{re.escape(field)}[.: ]", result.detail), result.detail
    assert not validator(SCHEMA_OF[kind]).is_valid(instance), f"{mutation.__name__}: {instance}"


# --- fixed cases: the edges of the time range and of the pattern dialect --------------------------

TIME_EDGES = [
    # (event_time, the decoder accepts it, the schema accepts it)
    ("1990-01-01T00:00:00Z", True, True),
    ("1990-01-01T00:00:00-05:00", True, True),
    ("1990-01-01T05:00:00+01:00", True, False),  # 04:00Z: the schema is stricter on this day
    ("1990-01-01T00:30:00+01:00", False, False),
    ("1989-12-31T23:59:59.999999Z", False, False),
    ("1989-12-31T23:30:00-01:00", True, False),  # 00:30Z on 1990-01-01
    ("2099-12-31T23:59:59.999999Z", True, True),
    ("2099-12-31T23:30:00+01:00", True, True),
    ("2099-12-31T23:30:00-01:00", False, False),
    ("2099-12-31T20:00:00-01:00", True, False),  # 21:00Z: the schema is stricter on this day
    ("2100-01-01T00:00:00Z", False, False),
    ("2100-01-01T00:30:00+01:00", True, False),  # 23:30Z on 2099-12-31
    ("2024-02-29T12:00:00Z", True, True),
    ("2023-02-29T12:00:00Z", False, False),  # only format: date-time knows the calendar
    ("2024-03-01T12:00:00", False, False),
    ("2024-03-01T23:59:60Z", False, False),
    ("2024-03-01T12:00:00.123456789Z", True, True),
]


@pytest.mark.parametrize(("event_time", "decoded", "valid"), TIME_EDGES)
def test_the_edges_of_the_time_range(event_time: str, decoded: bool, valid: bool) -> None:
    instance = {
        "event_id": "e",
        "customer_id": "c",
        "event_time": event_time,
        "event_type": "page_view",
    }
    result = decode_event(encode_json(instance), "click", SOURCE)
    assert isinstance(result, events.ClickEvent) is decoded
    assert validator("click_event").is_valid(instance) is valid


def test_a_final_newline_is_why_patterns_are_matched_as_ecma_262() -> None:
    """The jsonschema package alone would let "EUR\\n" through; the decoder and ECMA do not."""
    schema = {"type": "string", "pattern": "^[A-Z]{3}$"}
    assert Draft202012Validator(schema).is_valid("EUR\n")
    assert not EcmaValidator(schema).is_valid("EUR\n")


# --- the published schemas themselves -------------------------------------------------------------


def keys_outside_the_standard(schema: object, where: str = "") -> Iterator[str]:
    if not isinstance(schema, dict):
        return
    yield from (f"{where}/{key}" for key in schema if key not in STANDARD_KEYWORDS)
    for key in SCHEMA_MAPS:
        for name, sub in schema.get(key, {}).items():
            yield from keys_outside_the_standard(sub, f"{where}/{key}/{name}")
    for key in SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key, [])):
            yield from keys_outside_the_standard(sub, f"{where}/{key}/{i}")
    for key in SCHEMA_VALUES:
        yield from keys_outside_the_standard(schema.get(key), f"{where}/{key}")


def patterns_in(schema: object) -> Iterator[str]:
    if isinstance(schema, dict):
        if isinstance(schema.get("pattern"), str):
            yield schema["pattern"]
        for key, value in schema.items():
            if key not in ("default", "const", "enum", "examples"):
                yield from patterns_in(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from patterns_in(item)


@pytest.mark.parametrize("name", sorted(events.CONTRACTS))
def test_published_schemas_use_only_standard_keywords(name: str) -> None:
    assert list(keys_outside_the_standard(committed_schema(name))) == []


@pytest.mark.parametrize("name", sorted(events.CONTRACTS))
def test_published_patterns_mean_the_same_in_every_regex_dialect(name: str) -> None:
    """No class shorthand (Unicode-aware in Python, ASCII in ECMA) and no look-around (which
    Rust's regex, pydantic's engine, refuses)."""
    for pattern in patterns_in(committed_schema(name)):
        for construct in ("\\d", "\\s", "\\w", "\\b", "(?=", "(?!", "(?<"):
            assert construct not in pattern, (construct, pattern)
        re.compile(pattern)


@pytest.mark.parametrize("name", ["click_event", "transaction_event"])
def test_every_text_field_of_the_input_contracts_refuses_control_characters(name: str) -> None:
    """Each string of an input contract is an enum, or has a pattern that refuses them: the
    free-text or identifier rule, or one that admits only listed ASCII characters."""
    refuse = (events.TEXT_PATTERN, events.IDENTIFIER_PATTERN)
    listed = (events.MONEY_PATTERN, events.EVENT_TIME_PATTERN, r"^[A-Z]{3}$")
    schema = committed_schema(name)
    found = list(strings_in(schema["properties"])) + list(strings_in(schema["$defs"]))
    assert len(found) > 10
    for string_schema in found:
        pattern = string_schema.get("pattern")
        assert pattern in refuse + listed or "enum" in string_schema, string_schema
        if pattern in listed:
            assert "[^" not in pattern and pattern.isascii()


def strings_in(schema: object) -> Iterator[dict[str, Any]]:
    """Every string schema under `schema`, property names included."""
    if isinstance(schema, dict):
        if schema.get("type") == "string" and "const" not in schema:
            yield schema
        for key, value in schema.items():
            if key == "propertyNames":
                yield value
            elif key not in ("default", "const", "enum", "examples"):
                yield from strings_in(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from strings_in(item)
