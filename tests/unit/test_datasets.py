"""Tests for stream_app.tools.datasets: every quirk on hand-written files, exact counts on the real
files, determinism (same bytes on every read) and event-time order. No broker needed.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stream_app.contracts.events import (
    ClickEvent,
    ClickType,
    Origin,
    TransactionEvent,
    TransactionType,
    encode,
)
from stream_app.errors import UserError
from stream_app.tools.datasets import (
    GZIP_MAGIC,
    ROW_ERROR_REASONS,
    DatasetFormat,
    DatasetItem,
    RowError,
    iter_events_jsonl,
    iter_online_retail,
    iter_rees46,
    read_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"
RETAIL_FILE = DATASETS / "online_retail" / "online_retail.csv.gz"
REES46_FILE = DATASETS / "rees46_2019oct_head" / "events.csv.gz"

RETAIL_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
REES46_HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
)
SESSION = "72d76fde-8bb3-4e00-8c23-a032dfed738c"

Summary = tuple[object, ...]


def write(directory: Path, name: str, text: str, *, compress: bool = False) -> Path:
    path = directory / name
    data = text.encode()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def summarize(item: DatasetItem) -> Summary:
    """The fields a reader decides, in a form a table can spell out."""
    if isinstance(item, RowError):
        return ("error", item.reason, item.line)
    when = item.event_time.isoformat()
    if isinstance(item, TransactionEvent):
        amount = format(item.amount, "f")
        return (
            item.event_type.value,
            item.event_id,
            item.customer_id,
            amount,
            item.item_count,
            when,
        )
    price = None if item.price is None else format(item.price, "f")
    return (item.event_type.value, item.customer_id, item.session_id, item.category, price, when)


def read_lines(reader: str, directory: Path, header: str, lines: Sequence[str]) -> list[Summary]:
    path = write(directory, "data.csv", "\n".join([header, *lines]) + "\n")
    items = iter_online_retail(path) if reader == "retail" else iter_rees46(path)
    return [summarize(item) for item in items]


# --- online-retail on hand-written files ----------------------------------------------------------

LINE_2010 = "2010-12-01 08:26:00"
RETAIL_CASES: list[tuple[str, list[str], list[Summary]]] = [
    (
        "invoice lines add up exactly, float CustomerID becomes an integer id",
        [
            f"536365,85123A,WHITE HANGING HEART,6,{LINE_2010},2.55,17850.0,United Kingdom",
            f"536365,71053,WHITE METAL LANTERN,6,{LINE_2010},3.39,17850.0,United Kingdom",
        ],
        [("purchase", "oretail-536365", "17850", "35.64", 12, "2010-12-01T08:26:00+00:00")],
    ),
    (
        "a cancellation is a refund with a positive amount",
        [
            "C536379,D,Discount,-1,2010-12-01 09:41:00,27.50,14527.0,United Kingdom",
            "C536379,22556,PLASTERS,-2,2010-12-01 09:41:00,1.65,14527.0,United Kingdom",
        ],
        [("refund", "oretail-C536379", "14527", "30.80", 3, "2010-12-01T09:41:00+00:00")],
    ),
    (
        "the original export's US date format",
        ["536366,22633,HAND WARMER,6,12/1/2010 8:28,1.85,17850.0,United Kingdom"],
        [("purchase", "oretail-536366", "17850", "11.10", 6, "2010-12-01T08:28:00+00:00")],
    ),
    (
        "mixed valid and invalid lines: valid total kept, each invalid line reported",
        [
            f"536367,84879,BIRD ORNAMENT,32,{LINE_2010},1.69,13047.0,United Kingdom",
            f"536367,22745,POPPY'S PLAYHOUSE,0,{LINE_2010},2.10,13047.0,United Kingdom",
            f"536367,B,Adjust,1,{LINE_2010},-11062.06,13047.0,United Kingdom",
            f"536367,22748,POPPY'S KITCHEN,6,{LINE_2010},2.10,,United Kingdom",
            f"536367,22749,FELTCRAFT,8,{LINE_2010},3.75,13047.0,United Kingdom",
        ],
        [
            ("error", "zero_quantity", 3),
            ("error", "negative_unit_price", 4),
            ("error", "missing_customer_id", 5),
            ("purchase", "oretail-536367", "13047", "84.08", 40, "2010-12-01T08:26:00+00:00"),
        ],
    ),
    (
        "lines of one invoice apart in the file merge; the earliest line's time wins",
        [
            "536368,22960,JAM MAKING SET,6,2010-12-01 08:35:00,4.25,13047.0,United Kingdom",
            "536369,21756,BATH BUILDING BLOCK,3,2010-12-01 08:35:00,5.95,13047.0,United Kingdom",
            "536368,22913,RED COAT RACK,3,2010-12-01 08:34:00,4.95,13047.0,United Kingdom",
        ],
        [
            ("purchase", "oretail-536368", "13047", "40.35", 9, "2010-12-01T08:34:00+00:00"),
            ("purchase", "oretail-536369", "13047", "17.85", 3, "2010-12-01T08:35:00+00:00"),
        ],
    ),
    (
        "an invoice with no valid line produces no event, only its errors",
        [
            f"536589,21777,Unknown,-10,{LINE_2010},0.0,,United Kingdom",
            f"536589,21778,Unknown,-5,{LINE_2010},0.0,,United Kingdom",
        ],
        [("error", "missing_customer_id", 2), ("error", "missing_customer_id", 3)],
    ),
    (
        "free items (price 0) are real lines: they count as items",
        [f"543599,84535B,FAIRY CAKES,16,{LINE_2010},0.0,17560.0,United Kingdom"],
        [("purchase", "oretail-543599", "17560", "0.0", 16, "2010-12-01T08:26:00+00:00")],
    ),
    (
        "a line naming another customer than its invoice is refused",
        [
            f"536370,22728,ALARM CLOCK,24,{LINE_2010},3.75,12583.0,France",
            f"536370,22727,ALARM CLOCK RED,24,{LINE_2010},3.75,12584.0,France",
        ],
        [
            ("error", "customer_mismatch", 3),
            ("purchase", "oretail-536370", "12583", "90.00", 24, "2010-12-01T08:26:00+00:00"),
        ],
    ),
    (
        "an invoice breaking the contract (item_count > 100000) is reported at its first line",
        [
            f"581483,23843,PAPER CRAFT,80995,{LINE_2010},2.08,16446.0,United Kingdom",
            f"581483,23844,PAPER CRAFT,20000,{LINE_2010},0.01,16446.0,United Kingdom",
        ],
        [("error", "invalid_event", 2)],
    ),
    (
        "blank lines are skipped but still counted in line numbers",
        [
            "",
            f"536371,22086,PAPER CHAIN,80,{LINE_2010},2.55,13748.0,United Kingdom",
            f"536372,22632,HAND WARMER,0,{LINE_2010},1.85,17850.0,United Kingdom",
        ],
        [
            ("error", "zero_quantity", 4),
            ("purchase", "oretail-536371", "13748", "204.00", 80, "2010-12-01T08:26:00+00:00"),
        ],
    ),
    (
        "a quoted multi-line description: errors name the line the record starts on",
        [
            f'536373,1,"TWO\nLINES",0,{LINE_2010},1.00,17850.0,United Kingdom',
            f"536374,2,ONE LINE,0,{LINE_2010},1.00,17850.0,United Kingdom",
        ],
        [("error", "zero_quantity", 2), ("error", "zero_quantity", 4)],
    ),
]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [pytest.param(lines, expected, id=name) for name, lines, expected in RETAIL_CASES],
)
def test_online_retail_cases(tmp_path: Path, lines: list[str], expected: list[Summary]) -> None:
    assert read_lines("retail", tmp_path, RETAIL_HEADER, lines) == expected


RETAIL_LINE_ERRORS: list[tuple[str, str]] = [
    (f"536365,1,X,abc,{LINE_2010},2.55,17850.0,UK", "invalid_quantity"),
    (f'536365,1,X,"1_000",{LINE_2010},2.55,17850.0,UK', "invalid_quantity"),
    (f"536365,1,X,6.5,{LINE_2010},2.55,17850.0,UK", "invalid_quantity"),
    (f"536365,1,X,0,{LINE_2010},2.55,17850.0,UK", "zero_quantity"),
    (f"536365,1,X,-3,{LINE_2010},2.55,17850.0,UK", "negative_quantity"),
    (f"C536365,1,X,3,{LINE_2010},2.55,17850.0,UK", "cancellation_positive_quantity"),
    (f"536365,1,X,6,{LINE_2010},-11062.06,17850.0,UK", "negative_unit_price"),
    (f'536365,1,X,6,{LINE_2010},"2,55",17850.0,UK', "invalid_unit_price"),
    (f"536365,1,X,6,{LINE_2010},NaN,17850.0,UK", "invalid_unit_price"),
    (f"536365,1,X,6,{LINE_2010},1e3,17850.0,UK", "invalid_unit_price"),
    (f"536365,1,X,6,{LINE_2010},,17850.0,UK", "invalid_unit_price"),
    ("536365,1,X,6,yesterday,2.55,17850.0,UK", "bad_timestamp"),
    ("536365,1,X,6,13/45/2010 8:26,2.55,17850.0,UK", "bad_timestamp"),
    ("536365,1,X,6,1900-01-01 00:00:00,2.55,17850.0,UK", "bad_timestamp"),
    (f"536365,1,X,6,{LINE_2010},2.55,abc,UK", "invalid_customer_id"),
    (f"536365,1,X,6,{LINE_2010},2.55,17850.5,UK", "invalid_customer_id"),
    (f"A563185,B,Adjust bad debt,1,{LINE_2010},11062.06,17850.0,UK", "invalid_invoice_no"),
    (f"536365,1,X,6,{LINE_2010},2.55,17850.0", "malformed_row"),
    (f"536365,1,X,6,{LINE_2010},2.55,17850.0,UK,extra", "malformed_row"),
    (f"536365,1,X,6,{LINE_2010},2.55,,UK", "missing_customer_id"),
    # no customer wins over every other problem, so the count matches the file's
    (f"A563186,B,Adjust bad debt,1,{LINE_2010},-11062.06,,UK", "missing_customer_id"),
    (f"536589,21777,Unknown,-10,{LINE_2010},0.0,,UK", "missing_customer_id"),
]


@pytest.mark.parametrize(("line", "reason"), RETAIL_LINE_ERRORS)
def test_online_retail_line_errors(tmp_path: Path, line: str, reason: str) -> None:
    items = list(iter_online_retail(write(tmp_path, "one.csv", f"{RETAIL_HEADER}\n{line}\n")))
    assert len(items) == 1
    error = items[0]
    assert isinstance(error, RowError)
    assert (error.reason, error.line) == (reason, 2)
    assert error.reason in ROW_ERROR_REASONS
    assert error.detail


def test_missing_customer_detail_names_the_other_problem(tmp_path: Path) -> None:
    line = f"536589,21777,Unknown,-10,{LINE_2010},0.0,,United Kingdom"
    [error] = iter_online_retail(write(tmp_path, "one.csv", f"{RETAIL_HEADER}\n{line}\n"))
    assert isinstance(error, RowError)
    assert "negative_quantity" in error.detail


def test_online_retail_full_event_and_origin(tmp_path: Path) -> None:
    text = f"{RETAIL_HEADER}\nC536379,D,Discount,-1,{LINE_2010},27.50,14527.0,France\n"
    path = write(tmp_path, "one.csv", text)
    expected = TransactionEvent(
        event_id="oretail-C536379",
        customer_id="14527",
        event_time=datetime(2010, 12, 1, 8, 26, tzinfo=UTC),
        origin=Origin.REPLAY,
        properties={"source": "online-retail", "country": "France"},
        event_type=TransactionType.REFUND,
        order_id="C536379",
        amount=Decimal("27.50"),
        currency="GBP",
        item_count=1,
        categories=[],
    )
    assert list(read_dataset(path, "online-retail")) == [expected]
    [live] = read_dataset(path, "online-retail", origin=Origin.LIVE)
    assert live == expected.model_copy(update={"origin": Origin.LIVE})


def test_reordered_columns_read_the_same(tmp_path: Path) -> None:
    header = "CustomerID,Country,InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice"
    text = f"{header}\n17850.0,United Kingdom,536365,85123A,HEART,6,{LINE_2010},2.55\n"
    [event] = iter_online_retail(write(tmp_path, "reordered.csv", text))
    assert summarize(event) == (
        "purchase",
        "oretail-536365",
        "17850",
        "15.30",
        6,
        "2010-12-01T08:26:00+00:00",
    )


def test_gzip_is_detected_by_magic_bytes_not_suffix(tmp_path: Path) -> None:
    text = "\n".join([RETAIL_HEADER, *RETAIL_CASES[3][1]]) + "\n"
    plain = write(tmp_path, "plain.csv", text)
    misnamed_gzip = write(tmp_path, "really-gzip.csv", text, compress=True)
    misnamed_plain = write(tmp_path, "not-really.csv.gz", text)
    reads = [
        [encode_item(i) for i in read_dataset(p, "online-retail")]
        for p in (plain, misnamed_gzip, misnamed_plain)
    ]
    assert reads[0] == reads[1] == reads[2]
    assert len(reads[0]) == 4


def encode_item(item: DatasetItem) -> bytes:
    if isinstance(item, RowError):
        return orjson.dumps([item.reason, item.line, item.detail])
    return encode(item)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "empty"),
        ("wrong.csv", b"a,b,c\n1,2,3\n", "missing column"),
        ("truncated.csv.gz", gzip.compress(RETAIL_HEADER.encode() * 50)[:60], "corrupt"),
    ],
)
def test_unreadable_files_are_user_errors(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        list(read_dataset(path, "online-retail"))


def test_missing_file_and_unknown_format_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        list(read_dataset(tmp_path / "absent.csv", "rees46"))
    with pytest.raises(UserError, match="unknown dataset format"):
        list(read_dataset(tmp_path / "absent.csv", "parquet"))  # type: ignore[arg-type]


# --- rees46 on hand-written files ----------------------------------------------------------------

T0 = "2019-10-01 00:00:00 UTC"
ISO0 = "2019-10-01T00:00:00+00:00"
REES46_CASES: list[tuple[str, list[str], list[Summary]]] = [
    (
        "view with category_code and price",
        [
            f"{T0},view,3900821,2053013552326770905,appliances.water_heater,aqua,33.20,554748717,{SESSION}"
        ],
        [("product_view", "554748717", SESSION, "appliances.water_heater", "33.20", ISO0)],
    ),
    (
        "cart without category_code falls back to cat:<category_id>",
        [f"{T0},cart,44600062,2103807459595387724,,shiseido,35.79,541312140,{SESSION}"],
        [("cart_add", "541312140", SESSION, "cat:2103807459595387724", "35.79", ISO0)],
    ),
    (
        "view without price or session",
        [f"{T0},view,44600062,2103807459595387724,,,,541312140,"],
        [("product_view", "541312140", None, "cat:2103807459595387724", None, ISO0)],
    ),
    (
        "a zero price is a valid price",
        [f"{T0},view,44600062,2103807459595387724,,,0.00,541312140,{SESSION}"],
        [("product_view", "541312140", SESSION, "cat:2103807459595387724", "0.00", ISO0)],
    ),
    (
        "unknown event types, missing ids, bad times and prices are line errors",
        [
            f"{T0},remove_from_cart,1,2,,,1.00,3,{SESSION}",
            f"{T0},view,1,2,,,1.00,,{SESSION}",
            f"{T0},view,,2,,,1.00,3,{SESSION}",
            f"yesterday,view,1,2,,,1.00,3,{SESSION}",
            f"1800-10-01 00:00:00 UTC,view,1,2,,,1.00,3,{SESSION}",
            f"{T0},view,1,2,,,cheap,3,{SESSION}",
            f"{T0},purchase,1,2,,,,3,{SESSION}",
            f"{T0},view,1,2,,,-1.00,3,{SESSION}",
            f"{T0},view,1,2,,,1.00,3",
        ],
        [
            ("error", "unknown_event_type", 2),
            ("error", "missing_customer_id", 3),
            ("error", "missing_product_id", 4),
            ("error", "bad_timestamp", 5),
            ("error", "bad_timestamp", 6),
            ("error", "invalid_price", 7),
            ("error", "invalid_price", 8),
            ("error", "invalid_event", 9),
            ("error", "malformed_row", 10),
        ],
    ),
]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [pytest.param(lines, expected, id=name) for name, lines, expected in REES46_CASES],
)
def test_rees46_cases(tmp_path: Path, lines: list[str], expected: list[Summary]) -> None:
    assert read_lines("rees46", tmp_path, REES46_HEADER, lines) == expected


def test_rees46_purchase_is_a_full_transaction_with_its_click_context(tmp_path: Path) -> None:
    code = "electronics.smartphone"
    line = f"{T0},purchase,1004856,2053013555631882655,{code},samsung,130.76,5,{SESSION}"
    path = write(tmp_path, "p.csv", f"{REES46_HEADER}\n{line}\n")
    [event] = iter_rees46(path)
    assert isinstance(event, TransactionEvent)
    assert event == TransactionEvent(
        event_id=event.event_id,
        customer_id="5",
        event_time=datetime(2019, 10, 1, tzinfo=UTC),
        origin=Origin.REPLAY,
        properties={
            "source": "rees46",
            "session_id": SESSION,
            "product_id": "1004856",
            "category": "electronics.smartphone",
            "price": "130.76",
            "brand": "samsung",
        },
        event_type=TransactionType.PURCHASE,
        order_id=f"{SESSION}-1004856-20191001T000000Z",
        amount=Decimal("130.76"),
        currency="USD",
        item_count=1,
        categories=["electronics.smartphone"],
    )


def test_rees46_purchase_without_code_or_session(tmp_path: Path) -> None:
    line = f"{T0},purchase,1004856,2053013555631882655,,,130.76,5,"
    [event] = iter_rees46(write(tmp_path, "p.csv", f"{REES46_HEADER}\n{line}\n"))
    assert isinstance(event, TransactionEvent)
    assert event.categories == []
    assert event.order_id == "user5-1004856-20191001T000000Z"
    assert event.properties == {
        "source": "rees46",
        "product_id": "1004856",
        "category": "cat:2053013555631882655",
        "price": "130.76",
    }


def test_rees46_click_keeps_brand_and_origin(tmp_path: Path) -> None:
    line = f"{T0},view,44600062,2103807459595387724,,shiseido,35.79,541312140,{SESSION}"
    path = write(tmp_path, "v.csv", f"{REES46_HEADER}\n{line}\n")
    [event] = read_dataset(path, "rees46", origin=Origin.LIVE)
    assert event == ClickEvent(
        event_id="rees46-3c0c8f706b784de6",  # ids must never change: replays dedupe on them
        customer_id="541312140",
        event_time=datetime(2019, 10, 1, tzinfo=UTC),
        origin=Origin.LIVE,
        properties={"source": "rees46", "brand": "shiseido"},
        event_type=ClickType.PRODUCT_VIEW,
        session_id=SESSION,
        product_id="44600062",
        category="cat:2103807459595387724",
        price=Decimal("35.79"),
        currency="USD",
    )


def test_rees46_duplicate_rows_get_distinct_stable_ids(tmp_path: Path) -> None:
    row = f"{T0},view,44600062,2103807459595387724,,shiseido,35.79,541312140,{SESSION}"
    other = f"{T0},cart,44600062,2103807459595387724,,shiseido,35.79,541312140,{SESSION}"
    path = write(tmp_path, "d.csv", "\n".join([REES46_HEADER, row, other, row, row]) + "\n")
    first = [item.event_id for item in iter_rees46(path) if not isinstance(item, RowError)]
    second = [item.event_id for item in iter_rees46(path) if not isinstance(item, RowError)]
    assert first == second
    assert len(set(first)) == 4
    assert first[0] == "rees46-3c0c8f706b784de6"
    raw = "\x1f".join(row.split(",")).encode()
    for index, occurrence in ((0, 1), (2, 2), (3, 3)):
        digest = hashlib.blake2b(raw + b"\x1f%d" % occurrence, digest_size=8).hexdigest()
        assert first[index] == f"rees46-{digest}"


# --- events (JSON Lines of our contracts) --------------------------------------------------------

CLICK = {
    "event_id": "c1",
    "customer_id": "u1",
    "event_time": "2024-05-01T10:00:00+02:00",
    "event_type": "page_view",
}
PURCHASE = {
    "event_id": "t1",
    "customer_id": "u1",
    "event_time": "2024-05-01T07:00:00Z",
    "event_type": "purchase",
    "order_id": "o1",
    "amount": "12.50",
    "currency": "EUR",
}


def json_line(value: object) -> bytes:
    return orjson.dumps(value)


EVENTS_CASES: list[tuple[str, bytes, str | None]] = [
    ("click", json_line(CLICK), None),
    ("transaction", json_line(PURCHASE), None),
    ("broken json", b'{"event_id": ', "invalid_json"),
    ("invalid utf-8", b"\xff\xfe{}", "invalid_json"),
    ("array", b"[1, 2]", "not_an_object"),
    ("unknown type", json_line({**CLICK, "event_type": "teleport"}), "unknown_event_type"),
    ("no type", json_line({"event_id": "x"}), "unknown_event_type"),
    ("type not a string", json_line({**CLICK, "event_type": 5}), "unknown_event_type"),
    ("float money", json_line({**PURCHASE, "amount": 12.5}), "invalid_event"),
    ("naive time", json_line({**CLICK, "event_time": "2024-05-01T10:00:00"}), "invalid_event"),
    ("extra field", json_line({**CLICK, "colour": "red"}), "invalid_event"),
    ("bad origin", json_line({**CLICK, "origin": "backfill"}), "invalid_event"),
]


@pytest.mark.parametrize(
    ("line", "reason"),
    [pytest.param(line, reason, id=name) for name, line, reason in EVENTS_CASES],
)
def test_events_jsonl_cases(tmp_path: Path, line: bytes, reason: str | None) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n\n  \r\n" + line + b"\r\n")
    [item] = iter_events_jsonl(path)
    if reason is None:
        assert isinstance(item, ClickEvent | TransactionEvent)
        assert item.origin == Origin.REPLAY
    else:
        assert isinstance(item, RowError)
        assert (item.reason, item.line) == (reason, 4)
        assert item.detail


def test_events_jsonl_reports_the_failing_field(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(json_line({**PURCHASE, "amount": 12.5}) + b"\n")
    [error] = iter_events_jsonl(path)
    assert isinstance(error, RowError)
    assert error.detail.startswith("amount: ")


def test_events_jsonl_keeps_the_files_origin(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl.gz"
    lines = [json_line({**CLICK, "origin": "live"}), json_line(PURCHASE)]
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    for default in Origin:
        click, purchase = iter_events_jsonl(path, origin=default)
        assert isinstance(click, ClickEvent)
        assert isinstance(purchase, TransactionEvent)
        assert click.origin == Origin.LIVE  # said in the file: kept
        assert purchase.origin == default  # not said: the caller's origin


def test_events_jsonl_sorted_by_time_then_id(tmp_path: Path) -> None:
    later = {**PURCHASE, "event_id": "a", "event_time": "2024-05-01T09:00:00Z"}
    tie = {**PURCHASE, "event_id": "b", "event_time": "2024-05-01T08:00:00Z"}  # == CLICK's time
    lines = [json_line(later), json_line(tie), json_line(CLICK), b"oops", json_line(PURCHASE)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines))
    items = list(read_dataset(path, "events"))
    assert [summarize_id(item) for item in items] == ["error:invalid_json:4", "t1", "b", "c1", "a"]


def summarize_id(item: DatasetItem) -> str:
    if isinstance(item, RowError):
        return f"error:{item.reason}:{item.line}"
    return item.event_id


def test_dataset_events_round_trip_through_events_jsonl(tmp_path: Path) -> None:
    lines = [row for _, rows, _ in REES46_CASES for row in rows]
    source = write(tmp_path, "r.csv", "\n".join([REES46_HEADER, *lines]) + "\n")
    events = [e for e in read_dataset(source, "rees46") if not isinstance(e, RowError)]
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(b"\n".join(encode(event) for event in events))
    assert list(read_dataset(copy, "events", origin=Origin.LIVE)) == events


# --- hypothesis properties ------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
FIELD_NAMES = sorted({*CLICK, *PURCHASE, "origin", "properties", "price", "session_id", "x"})
EVENT_TYPES = [t.value for t in ClickType] + [t.value for t in TransactionType] + ["nope"]
EVENTISH = st.builds(
    lambda base, event_type, changes: orjson.dumps({**base, "event_type": event_type, **changes}),
    st.sampled_from([CLICK, PURCHASE]),
    st.sampled_from(EVENT_TYPES),
    st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=3),
)
ANY_LINE = (
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b""))
    | st.text(max_size=60).map(lambda s: s.replace("\n", "").encode())
    | EVENTISH
)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(ANY_LINE, max_size=8))
def test_events_jsonl_never_raises_and_accounts_for_every_line(lines: list[bytes]) -> None:
    content = b"\n".join(lines)
    assume(not content.startswith(GZIP_MAGIC))  # such a file is read as gzip, by design
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.jsonl"
        path.write_bytes(content)
        items = list(iter_events_jsonl(path))
    expected_lines = [number for number, line in enumerate(lines, start=1) if line.strip()]
    assert len(items) == len(expected_lines)
    for number, item in zip(expected_lines, items, strict=True):
        if isinstance(item, RowError):
            assert item.line == number
            assert item.reason in ROW_ERROR_REASONS
        else:
            assert isinstance(item, ClickEvent | TransactionEvent)
            assert orjson.loads(encode(item))  # whatever was accepted re-encodes


RETAIL_LINE = st.tuples(
    st.integers(min_value=1, max_value=1000),  # quantity (sign comes from the invoice)
    st.decimals(min_value=0, max_value=Decimal("999.999"), places=3),
)
INVOICE = st.tuples(
    st.integers(min_value=500000, max_value=599999),  # number
    st.booleans(),  # cancellation
    st.integers(min_value=12346, max_value=18287),  # customer
    st.integers(min_value=0, max_value=525599),  # minute of 2011
    st.lists(RETAIL_LINE, min_size=1, max_size=10),
)


@settings(max_examples=60, deadline=None)
@given(
    invoices=st.lists(INVOICE, min_size=1, max_size=6, unique_by=lambda inv: (inv[0], inv[1])),
    data=st.data(),
)
def test_online_retail_valid_rows_round_trip_to_their_totals(
    invoices: list[tuple[int, bool, int, int, list[tuple[int, Decimal]]]], data: st.DataObject
) -> None:
    rows: list[list[str]] = []
    expected: dict[str, tuple[str, str, Decimal, int]] = {}
    for number, cancelled, customer, minute, lines in invoices:
        invoice_no = f"C{number}" if cancelled else str(number)
        sign = -1 if cancelled else 1
        when = datetime(2011, 1, 1, tzinfo=UTC).timestamp() + 60 * minute
        stamp = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S")
        for quantity, price in lines:
            rows.append(
                [
                    invoice_no,
                    "S",
                    "D",
                    str(sign * quantity),
                    stamp,
                    str(price),
                    f"{customer}.0",
                    "UK",
                ]
            )
        total = sum((quantity * price for quantity, price in lines), Decimal(0))
        kind = "refund" if cancelled else "purchase"
        item_count = sum(quantity for quantity, _ in lines)
        expected[f"oretail-{invoice_no}"] = (kind, str(customer), total, item_count)
    shuffled = data.draw(st.permutations(rows))
    buffer = io.StringIO()
    csv.writer(buffer).writerows([RETAIL_HEADER.split(","), *shuffled])
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), "gen.csv.gz", buffer.getvalue(), compress=True)
        items = list(read_dataset(path, "online-retail"))
    got: dict[str, tuple[str, str, Decimal, int]] = {}
    for item in items:
        assert isinstance(item, TransactionEvent), item
        got[item.event_id] = (item.event_type.value, item.customer_id, item.amount, item.item_count)
    assert got == expected
    times = [item.event_time for item in items if not isinstance(item, RowError)]
    assert times == sorted(times)


# --- the real files -------------------------------------------------------------------------------


def real(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real dataset absent: {path} (expected at <repo root>/../shared/datasets)")
    return path


@pytest.fixture(scope="module")
def retail_items() -> list[DatasetItem]:
    return list(read_dataset(real(RETAIL_FILE), "online-retail"))


@pytest.fixture(scope="module")
def rees46_items() -> list[DatasetItem]:
    return list(read_dataset(real(REES46_FILE), "rees46"))


def counts(items: list[DatasetItem]) -> tuple[dict[str, int], dict[str, int]]:
    events = Counter(i.event_type.value for i in items if not isinstance(i, RowError))
    errors = Counter(i.reason for i in items if isinstance(i, RowError))
    return dict(events), dict(errors)


def test_online_retail_real_counts(retail_items: list[DatasetItem]) -> None:
    events, errors = counts(retail_items)
    assert events == {"purchase": 18_536, "refund": 3_654}
    # every line that breaks another rule (1,336 stock adjustments, the 3 "A" bad-debt
    # adjustments with the 2 negative prices) also lacks a CustomerID, so one reason covers them
    assert errors == {"missing_customer_id": 135_080}


def test_online_retail_real_cross_check(retail_items: list[DatasetItem]) -> None:
    """Recompute every invoice independently with csv + Decimal and the README's facts."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    quantities: Counter[str] = Counter()
    invoices: set[str] = set()
    lines = without_customer = cancellation_lines = 0
    grand_total = Decimal(0)
    with gzip.open(RETAIL_FILE, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            lines += 1
            invoices.add(row["InvoiceNo"])
            value = Decimal(row["Quantity"]) * Decimal(row["UnitPrice"])
            grand_total += value
            cancellation_lines += row["InvoiceNo"].startswith("C")
            if not row["CustomerID"]:
                without_customer += 1
                continue
            totals[row["InvoiceNo"]] += value
            quantities[row["InvoiceNo"]] += int(row["Quantity"])
    assert (lines, without_customer, cancellation_lines, len(invoices)) == (
        541_909,
        135_080,
        9_288,
        25_900,
    )
    assert grand_total.quantize(Decimal("0.01")) == Decimal("9747747.93")
    expected = {f"oretail-{no}": (abs(total), abs(quantities[no])) for no, total in totals.items()}
    got = {
        item.event_id: (item.amount, item.item_count)
        for item in retail_items
        if isinstance(item, TransactionEvent)
    }
    assert got == expected
    purchases = sum(
        (a for key, (a, _) in got.items() if not key.startswith("oretail-C")), Decimal(0)
    )
    assert purchases == Decimal("8911407.904")


def test_rees46_real_counts(rees46_items: list[DatasetItem]) -> None:
    events, errors = counts(rees46_items)
    assert events == {"product_view": 17_055, "cart_add": 165, "purchase": 214}
    assert errors == {}
    ids = [item.event_id for item in rees46_items if not isinstance(item, RowError)]
    assert len(set(ids)) == 17_434  # 5 exact duplicate rows still get their own ids
    assert len({item.customer_id for item in rees46_items if not isinstance(item, RowError)}) == (
        4_504
    )
    buyers = {i.customer_id for i in rees46_items if isinstance(i, TransactionEvent)}
    assert len(buyers) == 193
    with gzip.open(REES46_FILE, "rt", encoding="utf-8", newline="") as handle:
        spent = sum(
            (Decimal(r["price"]) for r in csv.DictReader(handle) if r["event_type"] == "purchase"),
            Decimal(0),
        )
    txns = [item for item in rees46_items if isinstance(item, TransactionEvent)]
    assert sum((item.amount for item in txns), Decimal(0)) == spent == Decimal("59442.63")


@pytest.mark.parametrize(
    ("fmt", "fixture"), [("online-retail", "retail_items"), ("rees46", "rees46_items")]
)
def test_real_files_are_deterministic_and_ordered(
    fmt: DatasetFormat, fixture: str, request: pytest.FixtureRequest
) -> None:
    first: list[DatasetItem] = request.getfixturevalue(fixture)
    path = RETAIL_FILE if fmt == "online-retail" else REES46_FILE
    again = list(read_dataset(path, fmt))
    errors = [item for item in first if isinstance(item, RowError)]
    events = [item for item in first if not isinstance(item, RowError)]
    assert [item for item in again if isinstance(item, RowError)] == errors
    assert [encode(item) for item in again if not isinstance(item, RowError)] == [
        encode(event) for event in events
    ]
    keys = [(event.event_time, event.event_id) for event in events]
    assert keys == sorted(keys)
    assert all(event.origin == Origin.REPLAY for event in events)
    assert all(event.properties["source"] == fmt for event in events)
