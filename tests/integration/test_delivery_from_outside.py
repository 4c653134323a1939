"""The delivery contract, checked from outside against the real broker.

An independent consumer (plain confluent-kafka, not our subscriber) reads the output topics and
compares them with the offline replay of the same input:
* SIGKILLs at seeded random points of a backlog: one change_id has one content, one (customer,
  sequence) one change_id, sequences have no gaps, and every final segment is the offline one;
* one far-future event: one ``future_event`` dead letter, no change, the partition goes on;
* one and four partitions give every customer the same lifecycle trail;
* a 1 MB payload gives a published, truncated dead letter.
"""

from __future__ import annotations

import base64
import hashlib
import random
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from conftest import TopicReader, assert_one_history, final_segments

from stream_app.contracts.events import Event
from stream_app.settings import SegmentationSettings, Settings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.publish import make_producer, publish
from stream_app.tools.replay import learning_epochs, replay_offline

if TYPE_CHECKING:
    from conftest import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
RETAIL = ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"
# Six weeks: customers of early December go at risk over the Christmas silence (time-driven).
WINDOW = (datetime(2010, 12, 1, tzinfo=UTC), datetime(2011, 1, 15, tzinfo=UTC))
KILLS = 10  # the crash loop of issue 14

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)"),
]

Change = dict[str, Any]


def month_of_retail() -> list[Event]:
    events: list[Event] = []
    for item in read_dataset(RETAIL, "online-retail"):
        if not isinstance(item, RowError) and WINDOW[0] <= item.event_time < WINDOW[1]:
            events.append(item)
    return events


def offline(events: Iterable[Event], settings: Settings) -> list[Change]:
    """The offline replay's changes, without the time-driven ones past the watermark a live
    worker reaches on this input (the replay fires what falls due in the last lateness window
    too; a live worker waits for more input)."""
    collected: list[Change] = []

    class Collect:
        def write(self, line: bytes) -> int:
            collected.append(orjson.loads(line))
            return len(line)

    _, processor, _ = replay_offline(
        list(events),
        settings.segmentation,
        Collect(),  # type: ignore[arg-type]
        epochs=learning_epochs(settings),  # the deployment's learning, shared or in process
    )
    watermark = processor.watermark
    return [
        c
        for c in collected
        if c["reason"]["trigger_event_type"] != "time_passed"
        or datetime.fromisoformat(c["event_time"]).timestamp() <= watermark
    ]


def unique_ids(changes: list[Change]) -> set[str]:
    return {c["change_id"] for c in changes}


@pytest.mark.parametrize(
    ("learning", "snapshot_interval_s"),
    [
        # The default: the worker hosts the trainer, which every SIGKILL kills too; it comes
        # back from its newest record on the models topic and re-reads the examples after it.
        ("shared", 30.0),
        # In process, short: restarts restore a recent snapshot and re-learn the examples after
        # its position. Long (lives shorter than it): everything comes back from the examples
        # log (a crash loop used to restore untrained models).
        ("in_process", 0.3),
        ("in_process", 30.0),
    ],
    ids=["shared", "short-snapshots", "lives-shorter-than-snapshots"],
)
def test_seeded_sigkills_never_fork_the_change_stream(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
    learning: str,
    snapshot_interval_s: float,
) -> None:
    settings = settings_factory(
        partitions=1,
        learning=learning,
        model_snapshot_interval_s=snapshot_interval_s,
        batch_max_events=20,
        consumer_session_timeout_s=6,  # the dead life's partition comes back sooner
        # Models that matter within six weeks: clusters and tiers leave warming-up/unscored.
        segmentation=SegmentationSettings(
            cluster_warmup=300, cluster_warmup_days=3, tier_warm_up_labels=200
        ),
    )
    topics_factory(settings)
    events = month_of_retail()
    expected = offline(events, settings)
    assert len(expected) > 1000 and any(
        c["reason"]["trigger_event_type"] == "time_passed" for c in expected
    )
    rng = random.Random(20261201)
    cuts = sorted(rng.sample(range(1, len(events)), KILLS))
    chunks = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
    producer = make_producer(settings)
    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        for chunk in chunks[:-1]:
            worker = worker_factory(settings)
            worker.wait_for(lambda counts: True, timeout=60)  # up and serving
            publish(chunk, settings, producer=producer, flush=True)
            # Each life gets the partition (after the last one's session expired) and processes
            # some of its chunk; then it dies somewhere inside or just after the chunk.
            worker.wait_for(lambda counts: sum(counts["events"].values()) > 0, timeout=60)
            time.sleep(rng.uniform(0.0, 1.5))
            worker.kill()
            reader.poll(0.2)
        publish(chunks[-1], settings, producer=producer, flush=True)
        last = worker_factory(settings)
        reader.until(lambda got: unique_ids(got) >= unique_ids(expected), timeout=180)
        assert last.stop() == 0, last.log_tail()
        reader.poll(1.0)
    finally:
        reader.close()
    live = assert_one_history(reader.received)
    # Nothing lost: every customer entered once, with the offline entry change, and ends in the
    # offline lifecycle stage (features and lifecycle do not depend on the models).
    entries = {c["change_id"] for c in expected if c["component"] == "entry"}
    assert {i for i, c in live.items() if c["component"] == "entry"} == entries
    stages = {k: v[1]["lifecycle"] for k, v in final_segments(live.values()).items()}
    assert stages == {k: v[1]["lifecycle"] for k, v in final_segments(expected).items()}
    # And the model-dependent parts too (issue 14): in process, each restart restores the last
    # snapshot and re-learns the durable examples after it; shared, the trainer re-reads the
    # examples after its newest record; so cluster and tier end as in the offline replay of the
    # same learning (they drifted for 95-98% of customers when a SIGKILL lost learning).
    live_final, offline_final = final_segments(live.values()), final_segments(expected)
    scored = [s for _, s in offline_final.values() if s["propensity_tier"] != "unscored"]
    clustered = [s for _, s in offline_final.values() if s["cluster"] != 0]
    assert len(scored) > 100 and len(clustered) > 100  # the models really shape the segments
    same = [c for c, (_, segment) in offline_final.items() if live_final[c][1] == segment]
    differ = [(c, live_final[c][1], s) for c, (_, s) in offline_final.items() if c not in same]
    assert not differ, (len(same), len(offline_final), differ[:3])  # every one, exactly
    # Stamped with the same versions: a version id is the learned numbers, not the trainer's
    # offsets, which differ after every takeover (and offline).
    offline_by_id = {c["change_id"]: c for c in expected}
    stamps = {
        (offline_by_id.get(i, {}).get("model_version"), c["model_version"]) for i, c in live.items()
    }
    assert {(a, b) for a, b in stamps if a != b} == set()
    assert len({a for a, _ in stamps}) > (2 if learning == "shared" else 0)


def test_one_far_future_event_is_dead_lettered_and_its_partition_goes_on(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = settings_factory(partitions=1)
    topics_factory(settings)
    events = month_of_retail()[:300]
    expected = offline(events, settings)
    poison = orjson.dumps(
        {
            "event_id": "poison-1",
            "customer_id": "12346",
            "event_time": "2099-12-31T00:00:00Z",
            "event_type": "product_view",
        }
    )
    producer = make_producer(settings)
    publish(events[:150], settings, producer=producer)
    producer.produce(settings.clickstream_topic, key=b"12346", value=poison)
    producer.flush(10)
    publish(events[150:], settings, producer=producer)
    changes = TopicReader(settings, settings.segment_changes_topic)
    letters = TopicReader(settings, settings.dead_letters_topic)
    worker = worker_factory(settings)
    try:
        changes.until(lambda got: unique_ids(got) >= unique_ids(expected), timeout=120)
        letters.until(lambda got: len(got) >= 1, timeout=30)
        changes.poll(2.0)
    finally:
        changes.close()
        letters.close()
    assert [(d["reason"], d["source_topic"]) for d in letters.received] == [
        ("future_event", settings.clickstream_topic)
    ]
    # Every later event on the partition was processed: exactly the offline changes, no more.
    live = assert_one_history(changes.received)
    extra = [live[i] for i in set(live) - unique_ids(expected)]
    assert not extra, extra[:2]
    assert set(live) == unique_ids(expected)
    assert worker.stop() == 0, worker.log_tail()


def lifecycle_trails(changes: Iterable[Change]) -> dict[str, list[tuple[str, str, str]]]:
    trails: dict[str, list[tuple[str, str, str]]] = {}
    for c in sorted(changes, key=lambda c: (c["customer_id"], c["sequence"])):
        if c["component"] == "lifecycle":
            move = (c["event_time"], c["previous"]["lifecycle"], c["current"]["lifecycle"])
            trails.setdefault(c["customer_id"], []).append(move)
    return trails


def test_one_and_four_partitions_give_the_same_lifecycle_trails(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    events = month_of_retail()
    expected = offline(events, settings_factory(partitions=1))
    horizon = max(e.event_time for e in events).timestamp() - 86400  # every partition got here
    results = {}
    for partitions in (1, 4):
        settings = settings_factory(partitions=partitions)
        topics_factory(settings)
        publish(events, settings)
        reader = TopicReader(settings, settings.segment_changes_topic)
        worker = worker_factory(settings)
        try:
            reader.until(lambda got: len(unique_ids(got)) >= len(expected) * 0.98, timeout=120)
            reader.poll(3.0)
        finally:
            reader.close()
        assert worker.stop() == 0, worker.log_tail()
        results[partitions] = [
            c
            for c in assert_one_history(reader.received).values()
            if datetime.fromisoformat(c["event_time"]).timestamp() <= horizon
        ]
    offline_trails = lifecycle_trails(
        c for c in expected if datetime.fromisoformat(c["event_time"]).timestamp() <= horizon
    )
    assert sum(len(t) for t in offline_trails.values()) > 500  # people do move
    assert lifecycle_trails(results[1]) == offline_trails
    assert lifecycle_trails(results[4]) == offline_trails


def test_a_one_megabyte_payload_gives_a_published_truncated_dead_letter(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = settings_factory(partitions=1)
    topics_factory(settings)
    huge = b'{"event_id": "big", "padding": "' + b"x" * 999_000 + b'"}'  # ~1 MB, under the
    # producer's own 1,000,000-byte limit; the worker refuses it as oversized (64 KiB)
    producer = make_producer(settings)
    producer.produce(settings.clickstream_topic, key=b"big", value=huge)
    producer.produce(
        settings.clickstream_topic,
        key=b"after",
        value=orjson.dumps(
            {
                "event_id": "after-1",
                "customer_id": "after",
                "event_time": "2024-01-01T00:00:00Z",
                "event_type": "product_view",
            }
        ),
    )
    assert producer.flush(10) == 0
    letters = TopicReader(settings, settings.dead_letters_topic)
    changes = TopicReader(settings, settings.segment_changes_topic)
    worker = worker_factory(settings)
    try:
        letters.until(lambda got: len(got) >= 1, timeout=60)
        changes.until(lambda got: len(got) >= 1, timeout=30)
    finally:
        letters.close()
        changes.close()
    (letter,) = letters.received
    assert letter["reason"] == "oversized" and letter["payload_truncated"] is True
    assert letter["payload_size_bytes"] == len(huge)
    assert letter["payload_sha256"] == hashlib.sha256(huge).hexdigest()
    assert base64.b64decode(letter["payload_b64"]) == huge[: 64 * 1024]
    assert letters.sizes[0] < 1024 * 1024
    assert [c["customer_id"] for c in changes.received] == ["after"]
    assert worker.stop() == 0, worker.log_tail()
