"""The demo's pieces that need no broker: which events stream in live after the warm start."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from stream_app.contracts.events import ClickEvent, ClickType, Origin
from stream_app.settings import Settings
from stream_app.tools.datasets import RowError
from stream_app.tools.demo import WARM_UNTIL, _limited, _warm_start


def click(n: int, at: datetime) -> ClickEvent:
    return ClickEvent(
        event_id=f"e{n}",
        customer_id=f"c{n}",
        event_time=at,
        event_type=ClickType.PAGE_VIEW,
        origin=Origin.REPLAY,
    )


def test_the_live_part_starts_where_the_warm_start_ended_and_is_limited() -> None:
    before = [click(i, WARM_UNTIL - timedelta(hours=i + 1)) for i in range(3)]
    after = [click(10 + i, WARM_UNTIL + timedelta(hours=i)) for i in range(5)]
    error = RowError(line=1, reason="invalid_field", detail="x")
    items: list[ClickEvent | RowError] = [*before, error, *after]
    live = list(_limited(items, 3, WARM_UNTIL))
    assert [e.event_id for e in live if not isinstance(e, RowError)] == ["e10", "e11", "e12"]
    assert len(live) == 3
    assert len(list(_limited(items, 100, None))) == 8  # no warm start: everything, no errors


def test_only_online_retail_has_the_history_to_warm_up_from(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    assert _warm_start(settings, tmp_path / "events.jsonl", "events") is None
    assert _warm_start(settings, tmp_path / "rees46.csv.gz", "rees46") is None
    assert datetime(2011, 11, 1, tzinfo=UTC) == WARM_UNTIL
