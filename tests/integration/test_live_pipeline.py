"""The live worker against the real broker: equivalence with the offline replay, crash recovery."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import TopicReader, assert_one_history, final_segments

from stream_app.contracts.events import SegmentChange
from stream_app.settings import Settings
from stream_app.tools.datasets import read_dataset
from stream_app.tools.publish import make_producer, publish
from stream_app.tools.replay import replay_offline

if TYPE_CHECKING:
    from conftest import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
REES46 = ROOT.parent / "shared" / "datasets" / "rees46_2019oct_head" / "events.csv.gz"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not REES46.exists(), reason=f"{REES46} is absent (CI has it)"),
]


def offline_changes(settings: Settings) -> list[SegmentChange]:
    collected: list[SegmentChange] = []

    class Collect:
        def write(self, line: bytes) -> int:
            collected.append(SegmentChange.model_validate_json(line))
            return len(line)

    replay_offline(read_dataset(REES46, "rees46"), settings.segmentation, Collect())  # type: ignore[arg-type]
    return collected


def publish_with_garbage(settings: Settings) -> int:
    """The REES46 sample, with malformed messages mixed into both input topics."""
    producer = make_producer(settings)
    garbage = [
        (settings.clickstream_topic, b"{not json"),
        (settings.clickstream_topic, b'{"event_type": "teleport", "customer_id": "x"}'),
        (settings.transactions_topic, b'{"event_type": "purchase", "amount": 9.99}'),
    ]
    for topic, value in garbage:
        producer.produce(topic, key=b"garbage", value=value)
    summary = publish(read_dataset(REES46, "rees46"), settings, producer=producer)
    assert producer.flush(30) == 0
    return summary.published


def test_live_worker_gives_the_offline_segments_and_dead_letters_garbage(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = settings_factory(partitions=1)
    topics_factory(settings)
    expected = offline_changes(settings)
    assert publish_with_garbage(settings) == 17434

    worker = worker_factory(settings)
    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        reader.until(lambda got: len(got) >= len(expected), timeout=240)
        counts = worker.wait_for(lambda c: sum(c["events"].values()) >= 17434, timeout=30)
    finally:
        reader.close()
    assert counts["dead_letters"] == {"invalid_field": 1, "invalid_json": 1, "unknown_type": 1}
    assert sum(counts["events"].values()) == 17434

    live = reader.unique()
    assert sorted(live) == sorted(c.change_id for c in expected)
    offline_final = final_segments([c.model_dump(mode="json") for c in expected])
    assert final_segments(list(live.values())) == offline_final
    assert len(offline_final) == 4504
    assert {c["origin"] for c in live.values()} == {"replay"}
    assert worker.stop() == 0, worker.log_tail()


def test_sigkill_mid_stream_loses_nothing_and_duplicates_are_detectable(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = settings_factory(partitions=2, model_snapshot_interval_s=0.5)
    topics_factory(settings)
    expected = offline_changes(settings)
    publish(read_dataset(REES46, "rees46"), settings)

    reader = TopicReader(settings, settings.segment_changes_topic)
    first = worker_factory(settings)
    try:
        reader.until(lambda got: len(got) >= len(expected) // 3, timeout=120)
        first.kill()
        killed_at = len(reader.received)
        assert killed_at < len(expected), "the worker finished before it could be killed"
        second = worker_factory(settings)
        reader.until(lambda got: len(reader.unique()) >= len(expected), timeout=90)
    finally:
        reader.close()
    live = reader.unique()
    missing = sorted({c.change_id for c in expected} - set(live))
    assert not missing, (
        f"{len(missing)} of {len(expected)} changes never arrived, e.g. "
        f"{[c.customer_id for c in expected if c.change_id in missing[:3]]}; "
        f"restarted worker counts {second.counts()}; received {len(reader.received)}"
    )
    assert "models restored from snapshot" in second.log_tail(10_000)
    # Nothing lost, nothing applied twice: exactly the offline set of changes, by id.
    assert sorted(live) == sorted(c.change_id for c in expected)
    # No gaps, no fork, and a re-sent change is the one sent before (same id, same content): a
    # subscriber drops it.
    assert_one_history(reader.received)

    # The model-independent part of every final segment equals the offline replay's.
    def lifecycle_and_tier(final: dict[str, tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        return {k: (v[0], v[1]["lifecycle"], v[1]["propensity_tier"]) for k, v in final.items()}

    offline_final = final_segments([c.model_dump(mode="json") for c in expected])
    assert lifecycle_and_tier(final_segments(list(live.values()))) == lifecycle_and_tier(
        offline_final
    )
    assert second.stop() == 0, second.log_tail()


def test_sigterm_mid_backlog_stops_promptly_and_the_restart_completes_the_job(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    """Regression: SIGTERM while the ordered merge held events (a transaction read ahead of
    clicks not yet read) waited for their acks forever, since the stopped fetcher never
    delivered the clicks that would release them. Now the worker exits 0 at once, and the
    events it had not finished are read again by the next worker."""
    settings = settings_factory(partitions=1, model_snapshot_interval_s=0.5)
    topics_factory(settings)
    expected = offline_changes(settings)
    publish(read_dataset(REES46, "rees46"), settings)

    reader = TopicReader(settings, settings.segment_changes_topic)
    first = worker_factory(settings)
    try:
        reader.until(lambda got: len(got) >= len(expected) // 3, timeout=120)
        started = time.monotonic()
        assert first.stop(timeout=30) == 0, first.log_tail()
        assert time.monotonic() - started < 30
        assert len(reader.unique()) < len(expected), "the worker finished before it was stopped"
        second = worker_factory(settings)
        reader.until(lambda got: len(reader.unique()) >= len(expected), timeout=120)
    finally:
        reader.close()
    live = reader.unique()
    assert sorted(live) == sorted(c.change_id for c in expected)
    assert_one_history(reader.received)
    assert second.stop() == 0, second.log_tail()
