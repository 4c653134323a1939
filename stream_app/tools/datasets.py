"""Adapters that turn the real datasets into our event contracts, deterministically.

Replay, tests and benchmarks all read history through :func:`read_dataset`, so the same file always
yields the same events with the same ids in the same order: downstream deduplication (by
``event_id``) and SegmentChange ids then stay reproducible from one replay to the next.

Three formats are supported (plain or gzip, detected by the gzip magic bytes, not the suffix):

``events``
    JSON Lines of our own contracts (ClickEvent / TransactionEvent), chosen by ``event_type``.
``online-retail``
    UCI "Online Retail": one invoice becomes one TransactionEvent (purchase, or refund for a
    cancellation invoice ``C...``), amount = sum(Quantity x UnitPrice) in exact Decimal, GBP.
``rees46``
    REES46 clickstream: ``view`` -> product_view, ``cart`` -> cart_add (ClickEvents), ``purchase``
    -> TransactionEvent (USD, one item).

Nothing is dropped silently: every data line that does not become (part of) an event becomes
a :class:`RowError` whose ``reason`` is one of :data:`ROW_ERROR_REASONS`. Only blank lines are
skipped, because they carry no record. A problem with the file as a whole (missing, corrupt gzip,
wrong header) is a :class:`~stream_app.errors.UserError`, raised when iteration reaches it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import re
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, Protocol

import orjson
from pydantic import ValidationError

from stream_app.contracts.events import (
    EARLIEST,
    LATEST,
    ClickEvent,
    ClickType,
    Origin,
    TransactionEvent,
    TransactionType,
    describe_errors,
)
from stream_app.errors import UserError

if TYPE_CHECKING:
    from _csv import Reader as CsvReader

__all__ = [
    "ROW_ERROR_REASONS",
    "DatasetFormat",
    "DatasetItem",
    "RowError",
    "iter_events_jsonl",
    "iter_online_retail",
    "iter_rees46",
    "read_dataset",
]


@dataclass(frozen=True, slots=True)
class RowError:
    """One input line that did not become (part of) an event, and why.

    ``reason`` is a short machine-readable code from :data:`ROW_ERROR_REASONS` (for counting and
    alerting); ``line`` is the 1-based physical line in the source file (a CSV's first data line
    is 2); ``detail`` is for a human.
    """

    reason: str
    line: int
    detail: str


DatasetFormat = Literal["events", "online-retail", "rees46"]
DatasetItem = ClickEvent | TransactionEvent | RowError

ROW_ERROR_REASONS: Final = frozenset(
    {
        # any format
        "malformed_row",  # CSV syntax error or wrong number of fields
        "invalid_event",  # the built or given event fails its pydantic contract
        "missing_customer_id",
        "bad_timestamp",  # unparseable, or outside the contracts' 1990..2100 window
        # events (JSON Lines)
        "invalid_json",
        "not_an_object",
        "unknown_event_type",  # also used by rees46 (e.g. remove_from_cart)
        # online-retail
        "invalid_customer_id",
        "invalid_invoice_no",
        "invalid_quantity",
        "zero_quantity",
        "negative_quantity",  # on a non-cancellation invoice: a stock adjustment, not a sale
        "cancellation_positive_quantity",
        "invalid_unit_price",
        "negative_unit_price",
        "customer_mismatch",  # a line of an invoice names another customer than its first line
        # rees46
        "missing_product_id",
        "invalid_price",
    }
)

GZIP_MAGIC: Final = b"\x1f\x8b"
_CORRUPT_FILE_ERRORS: Final = (EOFError, gzip.BadGzipFile, zlib.error)
_ASCII_DIGITS: Final = re.compile(r"[+-]?[0-9]+")
_DECIMAL_TEXT: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_CUSTOMER_ID: Final = re.compile(r"([0-9]+)(?:\.0*)?")
_INVOICE_NO: Final = re.compile(r"C?[0-9]+")
_CACHE_SIZE: Final = 1 << 16


class _LineRejectedError(Exception):
    """A line cannot be used; carries the RowError reason and detail up to the loop."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --- shared plumbing ----------------------------------------------------------------------------


class _Reader(Protocol):
    def __call__(self, path: Path, *, origin: Origin = ...) -> Iterator[DatasetItem]: ...


def read_dataset(
    path: Path, fmt: DatasetFormat, *, origin: Origin = Origin.REPLAY
) -> Iterator[ClickEvent | TransactionEvent | RowError]:
    """Every event of the file in event-time order (ties by event_id), plus its RowErrors.

    Sorting needs the whole file, so RowErrors are yielded as they are found, which is before
    the first event; their ``line`` says where they belong. The sort is stable, so even events
    with the same time and id keep their file order and the output is fully deterministic.
    """
    readers: dict[str, _Reader] = {
        "events": iter_events_jsonl,
        "online-retail": iter_online_retail,
        "rees46": iter_rees46,
    }
    reader = readers.get(fmt)
    if reader is None:
        raise UserError(f"unknown dataset format {fmt!r}; expected one of {', '.join(readers)}")
    events: list[ClickEvent | TransactionEvent] = []
    for item in reader(path, origin=origin):
        if isinstance(item, RowError):
            yield item
        else:
            events.append(item)
    events.sort(key=_event_order)
    yield from events


def _event_order(event: ClickEvent | TransactionEvent) -> tuple[datetime, str]:
    return event.event_time, event.event_id


@contextmanager
def _open_binary(path: Path) -> Iterator[gzip.GzipFile | io.BufferedReader]:
    """Open ``path`` for reading, transparently gunzipping when it starts with the gzip magic.

    Magic bytes rather than the suffix decide, so a mis-named file still reads correctly.
    A missing or corrupt file becomes a UserError: the person running the replay can fix it.
    """
    try:
        raw = Path(path).open("rb")  # noqa: SIM115 - closed by the with block below
    except OSError as exc:
        raise UserError(f"cannot read dataset {path}: {exc.strerror or exc}") from exc
    with raw:
        try:
            if raw.peek(len(GZIP_MAGIC))[: len(GZIP_MAGIC)] == GZIP_MAGIC:
                with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                    yield unzipped
            else:
                yield raw
        except _CORRUPT_FILE_ERRORS as exc:
            raise UserError(f"dataset {path} is corrupt or truncated: {exc}") from exc


def _csv_records(
    path: Path, columns: Sequence[str], fmt: str
) -> Iterator[tuple[int, list[str]] | RowError]:
    """(first line number, fields in ``columns`` order) per CSV record, or a malformed_row error.

    Columns are found by header name, so a file with reordered or extra columns still reads.
    The csv module (C parser) keeps the 541,909-line Online Retail file to a few seconds.
    Undecodable bytes become U+FFFD rather than aborting the whole file; they can only sit in
    free-text fields or make an id fail validation, which is then reported for that line.
    """
    with (
        _open_binary(path) as stream,
        io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="") as text,
    ):
        reader = csv.reader(text)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise UserError(f"dataset {path} is empty; expected a {fmt} CSV header") from None
        except csv.Error as exc:
            raise UserError(f"dataset {path}: unreadable {fmt} CSV header: {exc}") from exc
        missing = [name for name in columns if name not in header]
        if missing:
            raise UserError(
                f"dataset {path} is not a {fmt} CSV: missing column(s) {', '.join(missing)}"
            )
        indexes = [header.index(name) for name in columns]
        yield from _csv_rows(reader, len(header), indexes)


def _csv_rows(
    reader: CsvReader, width: int, indexes: list[int]
) -> Iterator[tuple[int, list[str]] | RowError]:
    """Non-blank rows (fields in ``indexes`` order) with the line each starts on; a CSV syntax
    error or a wrong field count costs only its record.

    A plain ``for`` loop (rather than ``next`` per row) keeps the per-row cost low; after an
    error the reader resumes with the next record.
    """
    reorder = indexes != list(range(width))
    start = reader.line_num + 1
    while True:
        try:
            for row in reader:
                if len(row) == width:
                    yield start, [row[index] for index in indexes] if reorder else row
                elif row:
                    yield RowError("malformed_row", start, f"{len(row)} fields, expected {width}")
                start = reader.line_num + 1
        except csv.Error as exc:
            yield RowError("malformed_row", start, f"CSV error: {exc}")
            if reader.line_num < start:  # the parser made no progress: stop, never loop forever
                return
            start = reader.line_num + 1
        else:
            return


def _in_contract_window(moment: datetime) -> bool:
    return EARLIEST <= moment < LATEST


def _as_utc(moment: datetime) -> datetime:
    """A zone-less time is taken as UTC; a zoned one is converted, so all output is in UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_decimal(text: str) -> Decimal | None:
    """Exact money from its text (never via float); None for anything but plain decimal digits.

    The strict pattern keeps out NaN, Infinity and exponents, which are not prices.
    Cached: a dataset repeats a few thousand prices across hundreds of thousands of lines.
    """
    text = text.strip()
    if not _DECIMAL_TEXT.fullmatch(text):
        return None
    return Decimal(text)


# --- events: JSON Lines of our own contracts ----------------------------------------------------

_MODEL_BY_TYPE: Final[dict[str, type[ClickEvent] | type[TransactionEvent]]] = {
    **{member.value: ClickEvent for member in ClickType},
    **{member.value: TransactionEvent for member in TransactionType},
}


def iter_events_jsonl(
    path: Path, *, origin: Origin = Origin.REPLAY
) -> Iterator[ClickEvent | TransactionEvent | RowError]:
    """One event or RowError per non-blank line, in file order; never raises on bad lines.

    (A file that starts with the gzip magic bytes is read as gzip; if it is not valid gzip after
    all, that is a UserError about the file, not a row error.)

    An event keeps the ``origin`` written in the file (a recorded live event stays live);
    ``origin`` only fills in events that do not say.
    """
    with _open_binary(path) as stream:
        for line, raw in enumerate(stream, start=1):
            if raw.strip():
                yield _decode_json_line(line, raw, origin)


def _decode_json_line(
    line: int, raw: bytes, origin: Origin
) -> ClickEvent | TransactionEvent | RowError:
    try:
        value: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return RowError("invalid_json", line, str(exc))
    if not isinstance(value, dict):
        return RowError(
            "not_an_object", line, f"expected a JSON object, got {type(value).__name__}"
        )
    event_type = value.get("event_type")
    model = _MODEL_BY_TYPE.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        return RowError(
            "unknown_event_type",
            line,
            f"event_type {repr(event_type)[:80]} is neither a click nor a transaction type",
        )
    value.setdefault("origin", origin.value)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        return RowError("invalid_event", line, describe_errors(exc))


# --- online-retail: UCI Online Retail, one invoice = one transaction ----------------------------

RETAIL_COLUMNS: Final = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)
RETAIL_CURRENCY: Final = "GBP"


# One valid line: invoice number, customer id, time, quantity, unit price, country. A plain
# tuple: a NamedTuple's constructor cost a measurable share of reading the 541,909 lines.
_RetailLine = tuple[str, str, datetime, int, Decimal, str]


@dataclass(slots=True)
class _Invoice:
    """Running totals of one invoice's valid lines (the file is not grouped by invoice)."""

    number: str
    first_line: int
    customer_id: str
    country: str
    event_time: datetime
    amount: Decimal
    item_count: int


def iter_online_retail(
    path: Path, *, origin: Origin = Origin.REPLAY
) -> Iterator[TransactionEvent | RowError]:
    """UCI Online Retail invoices as TransactionEvents, line problems as RowErrors.

    Mapping (see the module docstring for the why):

    * one invoice -> one event, ``event_id`` ``"oretail-<InvoiceNo>"``, ``order_id`` InvoiceNo;
      amount = |sum(Quantity x UnitPrice)| of its valid lines in exact Decimal, GBP;
      item_count = |sum(Quantity)|; no categories (the file has none).
    * ``C...`` invoices are cancellations -> refund with a positive amount.
    * InvoiceDate has no zone. It is UK wall-clock time; we **treat it as UTC**, deliberately:
      every time stays valid and unambiguous (no DST gap or fold), replays do not depend on the
      host's tz database, and file order is preserved. The cost: from 27 Mar to 30 Oct 2011
      (BST) the true instant was one hour earlier. Both "2010-12-01 08:26:00" (this copy) and
      the original export's "12/1/2010 8:26" are accepted.
    * An invoice's lines can differ by a minute; the event takes the earliest line's time.
    * Lines without CustomerID, zero or malformed quantities, negative prices, negative
      quantities on non-cancellations (stock adjustments), ... -> one RowError per line; the
      invoice keeps the total of its valid lines. A line with no CustomerID is reported as
      ``missing_customer_id`` even when something else is wrong too (the detail says what),
      so that count matches the file's count of customer-less lines.

    Yields line RowErrors while scanning, then the invoices in order of first appearance.
    """
    invoices: dict[str, _Invoice] = {}
    for record in _csv_records(path, RETAIL_COLUMNS, "online-retail"):
        if isinstance(record, RowError):
            yield record
            continue
        line, row = record
        parsed = _parse_retail_line(line, row)
        if isinstance(parsed, RowError):
            yield parsed
            continue
        mismatch = _add_to_invoice(invoices, line, parsed)
        if mismatch is not None:
            yield mismatch
    for invoice in invoices.values():
        yield _invoice_event(invoice, origin)


def _parse_retail_line(line: int, row: list[str]) -> _RetailLine | RowError:
    """Validate one line: customer first (who), then the values (what)."""
    invoice_no, _stock_code, _description, quantity, invoice_date, unit_price, customer, country = (
        row
    )
    invoice_no = invoice_no.strip()
    customer = customer.strip()
    try:
        event_time, qty, price = _retail_values(invoice_no, quantity, invoice_date, unit_price)
    except _LineRejectedError as exc:
        if not customer:
            return RowError(
                "missing_customer_id",
                line,
                f"invoice {invoice_no!r}: no CustomerID (also {exc.reason}: {exc.detail})",
            )
        return RowError(exc.reason, line, exc.detail)
    if not customer:
        return RowError("missing_customer_id", line, f"invoice {invoice_no!r}: no CustomerID")
    customer_id = _retail_customer_id(customer)
    if customer_id is None:
        return RowError(
            "invalid_customer_id", line, f"CustomerID {customer[:40]!r} is not a number"
        )
    return invoice_no, customer_id, event_time, qty, price, country.strip()


def _retail_values(
    invoice_no: str, quantity_text: str, date_text: str, price_text: str
) -> tuple[datetime, int, Decimal]:
    """Parsed (time, quantity, unit price) of a line; raises naming the first problem."""
    if not _INVOICE_NO.fullmatch(invoice_no):
        raise _LineRejectedError(
            "invalid_invoice_no",
            f"InvoiceNo {invoice_no[:40]!r} is neither a sale (digits) nor a cancellation (C...)",
        )
    event_time = _parse_retail_time(date_text)
    if event_time is None:
        raise _LineRejectedError(
            "bad_timestamp", f"InvoiceDate {date_text[:40]!r} unparseable or implausible"
        )
    quantity = _parse_int(quantity_text)
    if quantity is None:
        raise _LineRejectedError(
            "invalid_quantity", f"Quantity {quantity_text[:40]!r} is not an integer"
        )
    price = _parse_decimal(price_text)
    if price is None:
        raise _LineRejectedError(
            "invalid_unit_price", f"UnitPrice {price_text[:40]!r} is not a decimal"
        )
    cancellation = invoice_no.startswith("C")
    if quantity == 0:
        raise _LineRejectedError("zero_quantity", "Quantity is 0")
    if quantity < 0 and not cancellation:
        raise _LineRejectedError(
            "negative_quantity", f"Quantity {quantity} on a sale invoice (stock adjustment)"
        )
    if quantity > 0 and cancellation:
        raise _LineRejectedError(
            "cancellation_positive_quantity", f"Quantity {quantity} on a cancellation"
        )
    if price < 0:
        raise _LineRejectedError("negative_unit_price", f"UnitPrice {price} is negative")
    return event_time, quantity, price


def _add_to_invoice(invoices: dict[str, _Invoice], line: int, item: _RetailLine) -> RowError | None:
    """Fold a valid line into its invoice's totals; a line naming another customer is refused."""
    invoice_no, customer_id, event_time, quantity, unit_price, country = item
    invoice = invoices.get(invoice_no)
    if invoice is None:
        invoices[invoice_no] = _Invoice(
            number=invoice_no,
            first_line=line,
            customer_id=customer_id,
            country=country,
            event_time=event_time,
            amount=unit_price * quantity,
            item_count=quantity,
        )
        return None
    if customer_id != invoice.customer_id:
        return RowError(
            "customer_mismatch",
            line,
            f"invoice {invoice_no} belongs to customer {invoice.customer_id} "
            f"(line {invoice.first_line}), this line names {customer_id}",
        )
    invoice.amount += unit_price * quantity
    invoice.item_count += quantity
    invoice.event_time = min(invoice.event_time, event_time)
    return None


def _invoice_event(invoice: _Invoice, origin: Origin) -> TransactionEvent | RowError:
    """The validated TransactionEvent of an invoice (one pydantic validation per invoice)."""
    refund = invoice.number.startswith("C")
    properties: dict[str, str | int | float | bool] = {"source": "online-retail"}
    if invoice.country:
        properties["country"] = invoice.country
    try:
        return TransactionEvent(
            event_id=f"oretail-{invoice.number}",
            customer_id=invoice.customer_id,
            event_time=invoice.event_time,
            origin=origin,
            properties=properties,
            event_type=TransactionType.REFUND if refund else TransactionType.PURCHASE,
            order_id=invoice.number,
            amount=abs(invoice.amount),
            currency=RETAIL_CURRENCY,
            item_count=abs(invoice.item_count),
        )
    except ValidationError as exc:
        return RowError(
            "invalid_event", invoice.first_line, f"invoice {invoice.number}: {describe_errors(exc)}"
        )


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_int(text: str) -> int | None:
    """ASCII digits only: int() alone would also take '1_000' and non-ASCII digits."""
    text = text.strip()
    return int(text) if _ASCII_DIGITS.fullmatch(text) else None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _retail_customer_id(text: str) -> str | None:
    """'17850.0' (pandas wrote the column as float) -> '17850'; anything non-integral -> None."""
    match = _CUSTOMER_ID.fullmatch(text)
    return match.group(1) if match else None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_retail_time(text: str) -> datetime | None:
    """ISO ('2010-12-01 08:26:00') or the original US export ('12/1/2010 8:26'), as UTC."""
    text = text.strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment_or_none = _parse_us_time(text)
        if moment_or_none is None:
            return None
        moment = moment_or_none
    moment = _as_utc(moment)
    return moment if _in_contract_window(moment) else None


def _parse_us_time(text: str) -> datetime | None:
    for pattern in ("%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S"):
        try:
            return datetime.strptime(text, pattern)  # zone-less; made UTC by the caller
        except ValueError:
            continue
    return None


# --- rees46: REES46 multi-category store clickstream -------------------------------------------

REES46_COLUMNS: Final = (
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
)
REES46_CURRENCY: Final = "USD"
_REES46_CLICKS: Final = {"view": ClickType.PRODUCT_VIEW, "cart": ClickType.CART_ADD}
_REES46_PURCHASE: Final = "purchase"


class _Rees46Row(NamedTuple):
    event_time: datetime
    event_type: str
    product_id: str
    category: str | None
    category_code: str
    brand: str
    price: Decimal | None
    user_id: str
    session_id: str | None


def iter_rees46(
    path: Path, *, origin: Origin = Origin.REPLAY
) -> Iterator[ClickEvent | TransactionEvent | RowError]:
    """REES46 rows in file order: view/cart -> ClickEvent, purchase -> TransactionEvent.

    ``event_id`` is ``"rees46-"`` + 16 hex chars of blake2b over the raw fields and the row's
    occurrence number: the file holds exact duplicate rows, which thus get distinct ids, while
    a re-read (or a read of a slice that keeps the same duplicates) gives the same ids.
    Every event keeps its clickstream context: ClickEvents in their own fields, purchases in
    ``properties`` (session_id, product_id, category, price, brand), since TransactionEvent has
    no such fields. The category is ``category_code``, else ``"cat:<category_id>"``.
    """
    occurrences: dict[bytes, int] = {}
    for record in _csv_records(path, REES46_COLUMNS, "rees46"):
        if isinstance(record, RowError):
            yield record
            continue
        line, row = record
        event_id = _rees46_event_id(row, occurrences)
        try:
            parsed = _parse_rees46_row(row)
            yield _rees46_event(parsed, event_id, origin)
        except _LineRejectedError as exc:
            yield RowError(exc.reason, line, exc.detail)
        except ValidationError as exc:
            yield RowError("invalid_event", line, describe_errors(exc))


def _rees46_event_id(row: list[str], occurrences: dict[bytes, int]) -> str:
    raw = "\x1f".join(row).encode()
    key = hashlib.blake2b(raw, digest_size=16).digest()
    occurrence = occurrences.get(key, 0) + 1
    occurrences[key] = occurrence
    digest = hashlib.blake2b(raw + b"\x1f%d" % occurrence, digest_size=8).hexdigest()
    return f"rees46-{digest}"


def _parse_rees46_row(row: list[str]) -> _Rees46Row:
    """Validate a row's fields; raises _LineRejectedError naming the first problem."""
    time_text, event_type, product_id, category_id, category_code, brand, price, user, session = (
        field.strip() for field in row
    )
    if event_type not in _REES46_CLICKS and event_type != _REES46_PURCHASE:
        raise _LineRejectedError(
            "unknown_event_type", f"event_type {event_type[:40]!r} (known: view, cart, purchase)"
        )
    if not user:
        raise _LineRejectedError("missing_customer_id", "user_id is empty")
    if not product_id:
        raise _LineRejectedError("missing_product_id", "product_id is empty")
    event_time = _parse_rees46_time(time_text)
    if event_time is None:
        raise _LineRejectedError(
            "bad_timestamp", f"event_time {time_text[:40]!r} unparseable or implausible"
        )
    parsed_price = _parse_decimal(price) if price else None
    if (price and parsed_price is None) or (parsed_price is None and event_type == "purchase"):
        raise _LineRejectedError("invalid_price", f"price {price[:40]!r} is not a decimal")
    category = category_code or (f"cat:{category_id}" if category_id else None)
    return _Rees46Row(
        event_time=event_time,
        event_type=event_type,
        product_id=product_id,
        category=category,
        category_code=category_code,
        brand=brand,
        price=parsed_price,
        user_id=user,
        session_id=session or None,
    )


def _rees46_event(row: _Rees46Row, event_id: str, origin: Origin) -> ClickEvent | TransactionEvent:
    """The validated contract for a parsed row; raises ValidationError if it breaks it."""
    properties: dict[str, str | int | float | bool] = {"source": "rees46"}
    click_type = _REES46_CLICKS.get(row.event_type)
    if click_type is not None:
        if row.brand:
            properties["brand"] = row.brand
        return ClickEvent(
            event_id=event_id,
            customer_id=row.user_id,
            event_time=row.event_time,
            origin=origin,
            properties=properties,
            event_type=click_type,
            session_id=row.session_id,
            product_id=row.product_id,
            category=row.category,
            price=row.price,
            currency=REES46_CURRENCY if row.price is not None else None,
        )
    if row.price is None:  # _parse_rees46_row already refuses this; keeps the types honest
        raise _LineRejectedError("invalid_price", "a purchase needs a price")
    context = {
        "session_id": row.session_id,
        "product_id": row.product_id,
        "category": row.category,
        "price": format(row.price, "f"),
        "brand": row.brand,
    }
    properties.update({key: value for key, value in context.items() if value})
    return TransactionEvent(
        event_id=event_id,
        customer_id=row.user_id,
        event_time=row.event_time,
        origin=origin,
        properties=properties,
        event_type=TransactionType.PURCHASE,
        order_id=_rees46_order_id(row),
        amount=row.price,
        currency=REES46_CURRENCY,
        item_count=1,
        categories=[row.category_code] if row.category_code else [],
    )


def _rees46_order_id(row: _Rees46Row) -> str:
    """Session + product + second: REES46 has no order ids, and this names the same purchase
    the same way on every read (exact duplicate purchase rows share it; their event_ids differ).
    """
    session = row.session_id or f"user{row.user_id}"
    return f"{session}-{row.product_id}-{row.event_time:%Y%m%dT%H%M%SZ}"


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_rees46_time(text: str) -> datetime | None:
    """'2019-10-01 00:00:00 UTC' (the file's form) or any ISO 8601 time; zone-less means UTC."""
    if text.endswith(" UTC"):
        text = text[: -len(" UTC")]
    try:
        moment = _as_utc(datetime.fromisoformat(text))
    except ValueError:
        return None
    return moment if _in_contract_window(moment) else None
