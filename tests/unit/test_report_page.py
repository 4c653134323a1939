"""The report page: self-contained, every input escaped, key figures readable from the DOM; and
`stream-app report` as users run it (mistakes: one line, exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import segment_change

from stream_app.contracts.events import SegmentChange, TransactionEvent, TransactionType, encode
from stream_app.settings import SegmentationSettings
from stream_app.tools.report import ReportFigures, build_figures, change_log
from stream_app.tools.report_page import render_report

T0 = datetime(2011, 3, 1, tzinfo=UTC)
HOSTILE_NAME = '<script>alert("name")</script>'
HOSTILE_VERSION = 'v1"><img src=x onerror=alert(1)>'


def seg(cluster: int, tier: str, stage: str, name: str = "quiet") -> dict[str, Any]:
    return {
        "cluster": cluster,
        "cluster_profile": name,
        "propensity_tier": tier,
        "lifecycle": stage,
    }


def change(
    customer: str,
    sequence: int,
    day: float,
    current: dict[str, Any],
    previous: dict[str, Any] | None = None,
    component: str = "entry",
    purchase: float | None = None,
    version: str = "m1",
) -> SegmentChange:
    return segment_change(
        customer,
        sequence,
        T0 + timedelta(days=day),
        current,
        previous,
        change_id=f"{customer}{sequence}",
        component=component,
        purchase=purchase,
        version=version,
    )


# Three customers over three days; two move from low to high, one of them buys afterwards.
STREAM = [
    change("a1", 1, 0, seg(0, "low", "new")),
    change("b2", 1, 0, seg(1, "low", "new", HOSTILE_NAME)),
    change("c3", 1, 1, seg(0, "low", "active")),
    change(
        "a1", 2, 1, seg(0, "high", "new"), seg(0, "low", "new"), "propensity", 0.8, HOSTILE_VERSION
    ),
    change(
        "b2", 2, 2, seg(1, "high", "new", HOSTILE_NAME), seg(1, "low", "new"), "propensity", 0.6
    ),
]


def buy(customer: str, day: float) -> TransactionEvent:
    return TransactionEvent(
        event_id=f"t-{customer}-{day}",
        customer_id=customer,
        event_time=T0 + timedelta(days=day),
        event_type=TransactionType.PURCHASE,
        order_id=f"o-{customer}-{day}",
        amount=Decimal("5.00"),
        currency="GBP",
    )


EVENTS = [buy("a1", 5), buy("z9", 40)]  # z9's purchase on day 40 ends the stream


def figures() -> ReportFigures:
    return build_figures(change_log(STREAM), SegmentationSettings(), events=EVENTS)


class _Elements(HTMLParser):
    """Every element's attributes and text, by id and in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None], list[str]]] = []
        self.open: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        text: list[str] = []
        self.elements.append((tag, dict(attrs), text))
        if tag not in ("meta", "line", "circle", "br", "polyline", "rect"):
            self.open.append(text)

    def handle_endtag(self, tag: str) -> None:
        if self.open and tag not in ("meta", "line", "circle", "br", "polyline", "rect"):
            self.open.pop()

    def handle_data(self, data: str) -> None:
        for text in self.open:
            text.append(data)

    def by_id(self, element_id: str) -> tuple[dict[str, str | None], str]:
        for _, attrs, text in self.elements:
            if attrs.get("id") == element_id:
                return attrs, "".join(text)
        raise AssertionError(f"no element #{element_id}")

    def matching(self, **wanted: str) -> list[dict[str, str | None]]:
        keys = {k.replace("_", "-"): v for k, v in wanted.items()}
        return [a for _, a, _ in self.elements if all(a.get(k) == v for k, v in keys.items())]


def parsed(page: str) -> _Elements:
    elements = _Elements()
    elements.feed(page)
    return elements


def value_of(attrs: dict[str, str | None]) -> Any:
    raw = attrs.get("data-value")
    assert raw is not None
    return orjson.loads(raw)


def test_every_text_from_the_input_is_escaped() -> None:
    page = render_report(figures(), title="<b>Q1</b> & more")
    assert HOSTILE_NAME not in page
    assert "<img" not in page
    assert "&lt;script&gt;alert(&quot;name&quot;)&lt;/script&gt;" in page
    assert "v1&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    elements = parsed(page)
    assert elements.by_id("report-title")[1] == "<b>Q1</b> & more"
    (changes, _) = elements.matching(data_version=HOSTILE_VERSION)
    assert changes["data-version"] == HOSTILE_VERSION  # an attribute the parser decodes back


def test_the_page_needs_nothing_else_to_open() -> None:
    page = render_report(figures())
    assert "default-src 'none'" in page  # the browser refuses any load the page would try
    elements = parsed(page)
    tags = {tag for tag, _, _ in elements.elements}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "image", "use"}
    for _, attrs, _ in elements.elements:
        assert not {"src", "href", "xlink:href", "srcset"} & set(attrs)
    (csp,) = elements.matching(http_equiv="Content-Security-Policy")
    assert csp["content"] == "default-src 'none'; style-src 'unsafe-inline'"
    (style,) = [text for tag, _, text in elements.elements if tag == "style"]
    assert "url(" not in "".join(style) and "@import" not in "".join(style)


def test_key_figures_are_in_the_dom_with_their_exact_values() -> None:
    elements = parsed(render_report(figures()))
    attrs, text = elements.by_id("total-customers")
    assert (value_of(attrs), text) == (3, "3")
    assert value_of(elements.by_id("total-changes")[0]) == 5
    assert value_of(elements.by_id("first-event")[0]) == "2011-03-01T00:00:00Z"
    assert value_of(elements.by_id("model-versions")[0]) == 2
    # a1 (0.8) bought on day 5, b2 (0.6) did not: AUC 1, both in March.
    assert value_of(elements.by_id("auc-purchase_propensity")[0]) == 1.0
    assert value_of(elements.by_id("judged-purchase_propensity")[0]) == 2
    (auc,) = elements.matching(data_score="purchase_propensity", data_figure="auc")
    assert value_of(auc) == 1.0
    assert value_of(elements.by_id("auc-churn_risk")[0]) is None
    (high,) = elements.matching(data_dimension="tier", data_segment="high")
    assert value_of(high) == 2
    (flow,) = elements.matching(data_flow="tier", data_from="low", data_to="high")
    assert value_of(flow) == 2
    (bought,) = elements.matching(data_figure="bought_share")[2:]  # low, medium, high
    assert value_of(bought) == 0.5


def test_without_events_or_centres_the_page_says_what_to_pass() -> None:
    page = render_report(build_figures(change_log(STREAM), SegmentationSettings()))
    assert "--dataset FILE --format FORMAT" in page
    assert "--replay-report R.json" in page
    assert 'id="auc-purchase_propensity"' not in page


def run_report(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_APP_")}
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "report", *args, "--no-progress"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def refused(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert done.stdout == ""
    return line


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    (tmp_path / "changes.jsonl").write_bytes(b"".join(encode(c) + b"\n" for c in STREAM))
    (tmp_path / "events.jsonl").write_bytes(b"".join(encode(e) + b"\n" for e in EVENTS))
    report = {"clusters": [{"id": 0, "profile": "quiet", "centre": {"order_count": -0.25}}]}
    (tmp_path / "r.json").write_bytes(orjson.dumps(report))
    return tmp_path


def test_report_command_writes_the_page_and_one_summary_line(inputs: Path) -> None:
    done = run_report(
        inputs,
        "changes.jsonl",
        "--out",
        "report.html",
        "--dataset",
        "events.jsonl",
        "--format",
        "events",
        "--replay-report",
        "r.json",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "wrote report.html: 3 customers, 5 changes, purchase_propensity AUC 1.000, "
        "churn_risk AUC n/a"
    ]
    elements = parsed((inputs / "report.html").read_text(encoding="utf-8"))
    (centre,) = elements.matching(data_cluster="0", data_feature="order_count")
    assert value_of(centre) == -0.25


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jsonl", "--out", "r.html"], "no such file: missing.jsonl"),
        (["changes.jsonl"], "the following arguments are required: --out"),
        (["changes.jsonl", "--out", "r.html", "--dataset", "events.jsonl"], "go together"),
        (["changes.jsonl", "--out", "changes.jsonl"], "same file as the changes file"),
        (["changes.jsonl", "--out", "nowhere/r.html"], "directory nowhere does not exist"),
        (["changes.jsonl", "--out", "r.html", "--replay-report", "no.json"], "no such file"),
        (["changes.jsonl", "--out", "r.html", "--replay-report", "events.jsonl"], "not JSON"),
        (["r.json", "--out", "r.html"], "line 1: not a segment change"),
    ],
)
def test_report_mistakes_are_one_line(inputs: Path, args: list[str], message: str) -> None:
    assert message in refused(run_report(inputs, *args))
    assert not (inputs / "r.html").exists()


def test_a_bad_line_is_named_by_its_number(inputs: Path) -> None:
    lines = (inputs / "changes.jsonl").read_bytes().splitlines(keepends=True)
    (inputs / "changes.jsonl").write_bytes(b"".join([*lines[:2], b"\n", b'{"sequence": 1}\n']))
    line = refused(run_report(inputs, "changes.jsonl", "--out", "r.html"))
    assert line.startswith("error: line 4: not a segment change:")


def test_a_model_version_a_day_draws_thirty_and_lists_all() -> None:
    # Shared learning cuts a version per day of event time: 35 days, 35 versions.
    daily = [change(f"k{d}", 1, d, seg(0, "low", "new"), version=f"v{d:02d}") for d in range(35)]
    page = render_report(build_figures(change_log(daily), SegmentationSettings()))
    elements = parsed(page)
    chart = page[page.index('id="versions-chart"') :].split("</svg>")[0]
    assert chart.count("<rect") == 30
    assert len(elements.matching(data_figure="changes")) == 35
    assert "The chart shows the first 30; the table lists all." in page
