"""Replay for engineers on the real broker: file -> Kafka -> worker equals the offline replay,
a second identical replay adds nothing, shadow runs leave the live group alone, rewinds are
idempotent, and ``--speed 60`` plays back at the promised pace."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from stream_app.cli import main
from stream_app.kafka.ranges import Bounds, range_consumer, read_ranges, resolve, watermarks
from stream_app.kafka.topics import admin_client
from stream_app.live.workerproc import http_get
from stream_app.settings import Settings
from stream_app.tools.compare import compare, read_side
from stream_app.tools.shadow import ShadowRequest, run_shadow, shadow_settings

if TYPE_CHECKING:
    from conftest import SettingsFactory, TopicsFactory, WorkerFactory, WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
ONLINE_RETAIL = ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"
# One month of the Online Retail year: 1,707 invoices from 2011-06-01 to 2011-06-30.
WINDOW = ("--from", "2011-06-01", "--until", "2011-07-01")
WINDOW_EVENTS = 1707

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ONLINE_RETAIL.exists(), reason=f"{ONLINE_RETAIL} is absent"),
]


@pytest.fixture
def app(
    settings_factory: SettingsFactory,
    topics_factory: TopicsFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """Fresh one-partition settings (one global event order), their topics created, and the
    environment set so that `stream-app` run in-process uses exactly them."""
    settings = settings_factory(partitions=1)
    topics_factory(settings)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    return settings


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(list(argv)) == 0
    out: dict[str, Any] = orjson.loads(capsys.readouterr().out)
    return out


def publish_window(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return run_cli(
        capsys,
        "replay",
        str(ONLINE_RETAIL),
        "--format",
        "online-retail",
        "--to-kafka",
        "--no-progress",
        *WINDOW,
    )


def topic_changes(settings: Settings, topic: str) -> list[bytes]:
    consumer = range_consumer(settings, f"{settings.app_id}-check")
    try:
        return [m.value() for m in read_ranges(consumer, resolve(consumer, [topic], Bounds()))]
    finally:
        consumer.close()


def change_ids_of(changes: list[bytes]) -> set[str]:
    return {orjson.loads(c)["change_id"] for c in changes}


def change_ids(settings: Settings, topic: str) -> set[str]:
    return change_ids_of(topic_changes(settings, topic))


def end_offsets(settings: Settings, topic: str) -> int:
    consumer = range_consumer(settings, f"{settings.app_id}-check")
    try:
        return sum(watermarks(consumer, topic, p)[1] for p in range(settings.partitions))
    finally:
        consumer.close()


def committed(settings: Settings, group: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group})
    try:
        wanted = [
            TopicPartition(topic, p)
            for topic in settings.input_topics
            for p in range(settings.partitions)
        ]
        return [max(tp.offset, 0) for tp in consumer.committed(wanted, 10)]  # none yet: 0
    finally:
        consumer.close()


def duplicates_seen(worker: WorkerProcess) -> float:
    answer = http_get(f"{worker.url}/metrics", timeout=5)
    assert answer is not None and answer[0] == 200, f"/metrics answered {answer}"
    text = answer[1].decode()
    match = re.search(r"^stream_app_duplicate_events_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def offline_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "offline.jsonl"
    summary = run_cli(
        capsys,
        "replay",
        str(ONLINE_RETAIL),
        "--format",
        "online-retail",
        "--offline",
        "--no-progress",
        "--out",
        str(out),
        *WINDOW,
    )
    assert summary["events"] == WINDOW_EVENTS
    return out


def drain(worker: WorkerProcess, expected_events: int) -> None:
    worker.wait_for(lambda c: sum(c["events"].values()) >= expected_events, timeout=90)


def test_file_to_kafka_equals_offline_and_a_second_replay_adds_nothing(
    app: Settings,
    worker_factory: WorkerFactory,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings = app
    offline = offline_window(tmp_path, capsys)

    first = publish_window(capsys)
    assert first["published"] == WINDOW_EVENTS
    assert first["outside_window"] == 20483
    assert first["invalid"] == {"missing_customer_id": 135080}
    worker = worker_factory(settings)
    drain(worker, WINDOW_EVENTS)
    worker.wait_for(lambda _: end_offsets(settings, settings.segment_changes_topic) > 0, 30)
    worker.stop()

    live_changes = topic_changes(settings, settings.segment_changes_topic)
    assert all(orjson.loads(c)["origin"] == "replay" for c in live_changes)
    report = compare(
        read_side("offline", offline.read_bytes().splitlines()),
        read_side("kafka", live_changes),
    )
    assert report["identical"], report["sample"]
    assert report["a"]["by_component"] == report["b"]["by_component"]
    assert report["a"]["customers"] == report["b"]["customers"] > 500

    # The same file again: every event is a duplicate, so no state moves and nothing is sent.
    second = publish_window(capsys)
    assert second["published"] == WINDOW_EVENTS
    restarted = worker_factory(settings)
    drain(restarted, WINDOW_EVENTS)
    restarted.wait_for(lambda _: duplicates_seen(restarted) >= WINDOW_EVENTS, 30)
    restarted.stop()
    # A restarted worker may resend changes it had no acknowledgement for (same change ids, for
    # consumers to drop); it creates none.
    assert change_ids(settings, settings.segment_changes_topic) == change_ids_of(live_changes)


def test_shadow_run_leaves_the_live_group_alone_and_rewind_is_idempotent(
    app: Settings,
    worker_factory: WorkerFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    live = app
    publish_window(capsys)
    worker = worker_factory(live)
    drain(worker, WINDOW_EVENTS)
    worker.wait_for(lambda _: committed(live, live.app_id) == [0, WINDOW_EVENTS], 30)
    worker.stop()
    live_offsets = committed(live, live.app_id)
    live_changes = topic_changes(live, live.segment_changes_topic)

    name = live.app_id.removeprefix("test-")
    summary = run_shadow(
        live, ShadowRequest(name=name, bounds=Bounds(), timeout_s=120, show_progress=False)
    )
    shadow = shadow_settings(live, name, partitions=1)
    assert summary["copied"] == {shadow.transactions_topic: WINDOW_EVENTS}
    assert committed(live, live.app_id) == live_offsets  # the live group did not move
    assert committed(shadow, shadow.app_id) == [0, WINDOW_EVENTS]
    shadow_changes = topic_changes(live, shadow.segment_changes_topic)
    assert summary["segment_changes"] == len(shadow_changes)
    report = compare(read_side("live", live_changes), read_side("shadow", shadow_changes))
    assert report["identical"], report["sample"]

    assert main(["shadow", name, "--from-offsets", f"{live.transactions_topic}:0=5"]) == 2
    assert "exists already" in capsys.readouterr().err

    # A rewind is a dry run until --execute, and re-reading applied events changes nothing.
    dry = run_cli(capsys, "rewind", "--to-earliest")
    assert [p["new"] for p in dry["partitions"]] == [0, 0]
    assert committed(live, live.app_id) == live_offsets
    run_cli(capsys, "rewind", "--to-earliest", "--execute")
    assert committed(live, live.app_id) == [0, 0]
    rewound = worker_factory(live)
    rewound.wait_for(lambda _: duplicates_seen(rewound) >= WINDOW_EVENTS, 90)
    rewound.stop()
    assert change_ids(live, live.segment_changes_topic) == change_ids_of(live_changes)

    assert main(["shadow", name, "--delete"]) == 0
    remaining = admin_client(live.bootstrap_servers).list_topics(timeout=10).topics
    assert not [t for t in remaining if t.startswith(f"shadow-{name}-")]


def test_rewind_refuses_while_workers_run(
    app: Settings,
    worker_factory: WorkerFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = app
    worker = worker_factory(settings)
    worker.wait_ready()
    worker.wait_for(lambda _: _has_members(settings), 60)
    assert main(["rewind", "--to-earliest", "--execute"]) == 2
    assert "active member" in capsys.readouterr().err
    worker.stop()


def _has_members(settings: Settings) -> bool:
    from stream_app.tools.rewind import active_members

    return active_members(settings, settings.app_id) > 0


def test_speed_60_plays_three_minutes_of_history_in_about_three_seconds(
    app: Settings,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings = app
    start = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
    lines = [
        orjson.dumps(
            {
                "event_id": f"e{i}",
                "event_type": "page_view",
                "customer_id": "c1",
                "event_time": (start + timedelta(seconds=6 * i)).isoformat(),
            }
        )
        for i in range(31)  # 0 .. 180 s of event time
    ]
    path = tmp_path / "slice.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    summary = run_cli(
        capsys,
        "replay",
        str(path),
        "--format",
        "events",
        "--to-kafka",
        "--speed",
        "60",
        "--no-progress",
    )
    assert summary["published"] == 31
    assert 2.9 <= summary["publish_s"] <= 4.5, summary
    consumer = range_consumer(settings, "speed-check")
    try:
        ranges = resolve(consumer, [settings.clickstream_topic], Bounds())
        values = [orjson.loads(m.value()) for m in read_ranges(consumer, ranges)]
    finally:
        consumer.close()
    assert [v["event_id"] for v in values] == [f"e{i}" for i in range(31)]
    assert {v["origin"] for v in values} == {"replay"}
