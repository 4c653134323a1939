"""Pure parts of the replay tools: windows, progress arithmetic, replay marking, offset specs,
the comparison of two outputs, and the CLI's one-line errors (no broker needed)."""

from __future__ import annotations

import io
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_app.cli import main
from stream_app.contracts.events import ClickEvent, ClickType, Event, Origin
from stream_app.errors import UserError
from stream_app.kafka.ranges import parse_offsets
from stream_app.progress import StatusLine, format_duration, render
from stream_app.settings import Settings
from stream_app.tools.compare import compare, read_side
from stream_app.tools.datasets import RowError
from stream_app.tools.replay import Window, as_replay, parse_instant
from stream_app.tools.rewind import Move
from stream_app.tools.shadow import mark_replay, shadow_settings


def click(event_id: str, at: datetime, origin: Origin = Origin.LIVE) -> ClickEvent:
    return ClickEvent(
        event_id=event_id,
        event_type=ClickType.PAGE_VIEW,
        customer_id="c1",
        event_time=at,
        origin=origin,
    )


# --- windows and instants -----------------------------------------------------------------------


def test_instants_without_a_zone_are_utc() -> None:
    assert parse_instant("2011-06-01", "--from") == datetime(2011, 6, 1, tzinfo=UTC)
    assert parse_instant("2011-06-01T12:30:00+02:00", "--from") == datetime(
        2011, 6, 1, 10, 30, tzinfo=UTC
    )
    with pytest.raises(UserError, match="--until must be an ISO 8601"):
        parse_instant("June", "--until")


def test_window_keeps_start_drops_until_and_counts_the_rest() -> None:
    window = Window(datetime(2011, 6, 1, tzinfo=UTC), datetime(2011, 7, 1, tzinfo=UTC))
    items: list[Event | RowError] = [
        click("before", datetime(2011, 5, 31, 23, 59, tzinfo=UTC)),
        click("start", datetime(2011, 6, 1, tzinfo=UTC)),
        RowError(line=7, reason="missing_customer_id", detail="no id"),
        click("inside", datetime(2011, 6, 30, 23, 59, tzinfo=UTC)),
        click("until", datetime(2011, 7, 1, tzinfo=UTC)),
    ]
    outside: Counter[str] = Counter()
    kept = list(window.select(items, outside))
    assert [getattr(i, "event_id", "row") for i in kept] == ["start", "row", "inside"]
    assert outside == {"outside_window": 2}
    with pytest.raises(UserError, match="later than --from"):
        Window(datetime(2011, 7, 1, tzinfo=UTC), datetime(2011, 6, 1, tzinfo=UTC))


def test_a_replayed_event_is_always_marked_as_replay() -> None:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    live = click("e1", at, Origin.LIVE)
    marked = as_replay(live)
    assert marked.origin is Origin.REPLAY
    assert marked.model_dump(exclude={"origin"}) == live.model_dump(exclude={"origin"})
    already = click("e2", at, Origin.REPLAY)
    assert as_replay(already) is already


# --- progress ----------------------------------------------------------------------------------


def test_progress_line_has_count_rate_share_and_eta() -> None:
    assert format_duration(75) == "1:15"
    assert format_duration(3725) == "1:02:05"
    assert render("published", 2500, 2.0, 10000, None) == (
        "published 2,500/10,000 events (1,250/s) 25% ETA 0:06"
    )
    # A paced replay's ETA follows event time, not the count.
    assert render("published", 10, 30.0, 100, 0.5) == "published 10/100 events (0/s) 50% ETA 0:30"
    assert render("replayed", 42, 0.0, None, None) == "replayed 42 events (0/s)"


# --- shadow marking and settings ----------------------------------------------------------------


def test_mark_replay_sets_origin_and_keeps_everything_else() -> None:
    value = orjson.dumps({"event_id": "e1", "origin": "live", "x": [1, 2]})
    assert orjson.loads(mark_replay(value) or b"") == {
        "event_id": "e1",
        "origin": "replay",
        "x": [1, 2],
    }
    for untouched in (b"{not json", b"[1, 2]", b'"text"', orjson.dumps({"origin": "replay"})):
        assert mark_replay(untouched) == untouched
    assert mark_replay(None) is None


@given(st.binary(max_size=64))
def test_mark_replay_never_loses_a_message(value: bytes) -> None:
    marked = mark_replay(value)
    assert marked is not None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        assert marked == value
        return
    if isinstance(doc, dict):
        assert orjson.loads(marked) == {**doc, "origin": "replay"}
    else:
        assert marked == value


def test_shadow_settings_rename_everything_that_identifies_the_app() -> None:
    live = Settings(app_id="stream-app", state_dir="/var/lib/stream-app")
    shadow = shadow_settings(live, "k8-test", partitions=3)
    assert shadow.app_id == "shadow-k8-test"
    assert shadow.customers_changelog_topic == "shadow-k8-test-customers-changelog"
    assert shadow.model_snapshots_topic == "shadow-k8-test-model-snapshots"
    assert [shadow.clickstream_topic, shadow.segment_changes_topic, shadow.dead_letters_topic] == [
        "shadow-k8-test-clickstream",
        "shadow-k8-test-segment-changes",
        "shadow-k8-test-dead-letters",
    ]
    assert shadow.partitions == 3
    assert str(shadow.state_dir) == "/var/lib/stream-app/shadow-k8-test"
    assert shadow.web_port != live.web_port
    with pytest.raises(UserError, match="shadow name"):
        shadow_settings(live, "no spaces", partitions=1)


def test_offset_specs() -> None:
    assert parse_offsets("clickstream:0=120, transactions:1=40", "--from-offsets") == {
        ("clickstream", 0): 120,
        ("transactions", 1): 40,
    }
    with pytest.raises(UserError, match="TOPIC:PARTITION=OFFSET"):
        parse_offsets("clickstream=5", "--from-offsets")


def test_a_rewind_never_moves_forward() -> None:
    assert Move("t", 0, committed=100, target=40).rewinds
    assert not Move("t", 0, committed=100, target=100).rewinds
    assert Move("t", 0, committed=None, target=0).rewinds


# --- compare -----------------------------------------------------------------------------------


def change(
    customer: str, sequence: int, component: str, cluster: int, tier: str, stage: str
) -> bytes:
    record: dict[str, Any] = {
        "change_id": f"{customer}-{sequence}-{cluster}{tier}{stage}",
        "customer_id": customer,
        "sequence": sequence,
        "component": component,
        "current": {"cluster": cluster, "propensity_tier": tier, "lifecycle": stage},
        "reason": {"trigger_event_type": "purchase", "summary": "why"},
        "event_time": "2024-01-01T00:00:00Z",
    }
    return orjson.dumps(record)


def test_compare_finds_final_segment_differences_by_part() -> None:
    a = [
        change("c1", 1, "entry", 0, "low", "new"),
        change("c1", 2, "propensity", 0, "high", "new"),
        change("c2", 1, "entry", 1, "low", "new"),
        change("c3", 1, "entry", 2, "low", "new"),
        change("c1", 2, "propensity", 0, "high", "new"),  # redelivered: dropped
        b"{broken",
    ]
    b = [
        change("c1", 1, "entry", 0, "low", "new"),
        change("c2", 1, "entry", 3, "medium", "new"),
        change("c4", 1, "entry", 0, "low", "new"),
    ]
    report = compare(read_side("A", a), read_side("B", b), sample_size=5)
    assert report["a"] == {
        "source": "A",
        "changes": 4,
        "duplicates_dropped": 1,
        "unreadable": 1,
        "customers": 3,
        "by_component": {"entry": 3, "propensity": 1},
    }
    assert report["customers_in_both"] == 2
    assert report["final_segment_differs"] == 2
    assert report["differs_by"] == {"cluster": 1, "propensity_tier": 2, "lifecycle": 0}
    assert (report["customers_only_in_a"], report["customers_only_in_b"]) == (1, 1)
    assert [s["customer_id"] for s in report["sample"]] == ["c1", "c2"]
    assert report["sample"][1]["differs_in"] == ["cluster", "propensity_tier"]
    assert report["sample"][0]["a"]["sequence"] == 2
    assert not report["identical"]
    same = compare(read_side("A", b), read_side("B", list(reversed(b))))
    assert same["identical"] and same["final_segment_differs"] == 0


def test_compare_command_exit_codes(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_bytes(change("c1", 1, "entry", 0, "low", "new") + b"\n")
    two.write_bytes(change("c1", 1, "entry", 1, "low", "new") + b"\n")
    assert main(["compare", str(one), str(one)]) == 0
    assert main(["compare", str(one), str(two), "--out", str(tmp_path / "r.json")]) == 1
    assert orjson.loads((tmp_path / "r.json").read_bytes())["final_segment_differs"] == 1
    assert main(["compare", str(one), str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: no such file")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rewind"], "error: give exactly one of --to TIME or --to-earliest"),
        (["rewind", "--to", "x", "--to-earliest"], "error: give exactly one of --to TIME"),
        (["shadow", "s1", "--from", "2024-01-01", "--from-offsets", "t:0=1"], "error: give --from"),
        (["shadow", "s1", "--until-offsets", "t:0"], "error: --until-offsets takes"),
        (["replay", "x.csv", "--format", "rees46", "--offline"], "error: no such file"),
    ],
)
def test_cli_mistakes_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message)
    assert len(err.splitlines()) == 1


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_one_status_line_rewrites_on_a_terminal_and_writes_lines_in_a_log() -> None:
    now = [0.0]
    log = _Stream(tty=False)
    line = StatusLine(log, log_every_s=5.0, clock=lambda: now[0])
    for second in range(12):
        now[0] = float(second)
        line.show(f"at {second}")
    assert log.getvalue() == "at 0\nat 5\nat 10\n"
    silent = _Stream(tty=False)
    StatusLine(silent, clock=lambda: now[0]).show("never in a log")
    assert silent.getvalue() == ""
    term = _Stream(tty=True)
    on_tty = StatusLine(term, redraw_s=0.0, clock=lambda: now[0])
    on_tty.show("a")
    on_tty.clear("done")
    assert term.getvalue() == "\r" + "a".ljust(200) + "\r" + " " * 200 + "\r" + "done\n"
