"""The models topic after the broker compacted it: a worker still has what it scores with.

The topic is compacted, so Kafka keeps one record per key. Every version goes to the app id key
(the newest wins), so without more a restarted worker would find only the newest version, and
score the events it reads again (its uncommitted input) with the untrained base. Here Online
Retail's December 2010 is bootstrapped, the next six weeks go through one shared-learning
worker, and then the broker's log cleaner compacts the topic for real (small segments, a low
dirty ratio). A follower reading the compacted topic from its start, as a restarted worker's
does, must still hold the bootstrap record and the versions of the newest `model_recent_keep`
epochs, and choose for each change the version that stamped it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from conftest import TopicReader

from load_tests.systems import processed_count
from stream_app.contracts.events import Event, Origin
from stream_app.core.learning import ModelShelf
from stream_app.core.models import SegmentModels
from stream_app.live.model_log import bootstrap_key, newest_key
from stream_app.live.trainer import ModelFollower
from stream_app.settings import Settings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.publish import publish

if TYPE_CHECKING:
    from conftest import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
RETAIL = ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"
BOOTSTRAP_UNTIL = datetime(2011, 1, 1, tzinfo=UTC)
LIVE_UNTIL = datetime(2011, 2, 15, tzinfo=UTC)
KEEP = 6  # epochs (days) of versions kept against compaction; six weeks cut about 35 versions

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)"),
]


def records(settings: Settings) -> list[Any]:
    """Every record the models topic holds now, by a consumer of our own."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"{settings.app_id}-outside-models-{time.monotonic_ns()}",
            "enable.auto.commit": False,
        }
    )
    try:
        tp = TopicPartition(settings.model_snapshots_topic, 0)
        low, high = consumer.get_watermark_offsets(tp, timeout=10)
        consumer.assign([TopicPartition(settings.model_snapshots_topic, 0, low)])
        out: list[Any] = []
        while high > low:
            msg = consumer.poll(5)
            if msg is None:
                break
            if msg.error() is None:
                out.append(msg)
                if msg.offset() >= high - 1:
                    break
        return out
    finally:
        consumer.close()


def compact(settings: Settings) -> None:
    """Make the broker compact the models topic now: roll its segment each second, clean at
    any dirt, then append a record under a key nobody follows so the last segment rolls too;
    wait until the app key holds one record (the log cleaner runs every 15 s)."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    wanted = {"segment.ms": "1000", "min.cleanable.dirty.ratio": "0.01"}
    resource = ConfigResource(
        "topic",
        settings.model_snapshots_topic,
        incremental_configs=[
            ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
            for name, value in wanted.items()
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    deadline = time.monotonic() + 120
    while True:
        time.sleep(1.5)
        producer.produce(settings.model_snapshots_topic, key=b"test-roll", value=b"{}", partition=0)
        producer.flush(10)
        newest = [m for m in records(settings) if m.key() == newest_key(settings.app_id)]
        if len(newest) <= 1:
            return
        assert time.monotonic() < deadline, f"not compacted: {len(newest)} records left"
        time.sleep(3)


def events(since: datetime | None, until: datetime) -> list[Event]:
    return [
        item
        for item in read_dataset(RETAIL, "online-retail", origin=Origin.LIVE)
        if not isinstance(item, RowError)
        and (since is None or item.event_time >= since)
        and item.event_time < until
    ]


def test_compaction_keeps_the_versions_a_restarted_worker_scores_with(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    from test_warm_start import bootstrap_cli

    settings = settings_factory(partitions=1, learning="shared", model_recent_keep=KEEP)
    topics_factory(settings)
    done = bootstrap_cli(
        settings, str(RETAIL), "--format", "online-retail", "--until", BOOTSTRAP_UNTIL.isoformat()
    )
    assert done.returncode == 0, done.stderr
    live = events(BOOTSTRAP_UNTIL, LIVE_UNTIL)
    worker = worker_factory(settings)
    worker.wait_ready()
    publish(live, settings)
    worker.wait_for(lambda c: processed_count(c) >= len(live), timeout=240)
    assert worker.stop() == 0, worker.log_tail()
    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        reader.poll(3.0)
    finally:
        reader.close()
    changes = reader.received

    # Every version the trainer cut (not its progress records), by id: the epoch it was cut at.
    before = records(settings)
    cut: dict[str, float] = {}
    for msg in before:
        if msg.key() == newest_key(settings.app_id) and msg.value():
            record = orjson.loads(msg.value())
            trainer = orjson.loads(record["params"])["trainer"]
            if trainer and trainer["valid_from"] == trainer["closed_until"]:
                cut[record["version"]] = trainer["valid_from"]
    (boot,) = [m for m in before if m.key() == bootstrap_key(settings.app_id)]
    boot_version = orjson.loads(boot.value())["version"]
    assert len(cut) > 3 * KEEP, len(cut)

    compact(settings)

    epochs = settings.epochs()
    shelf = ModelShelf(SegmentModels(settings.segmentation), epochs)

    def offer(models: SegmentModels | None, pinned: bool) -> None:
        assert models is not None and not pinned
        shelf.offer(models)

    follower = ModelFollower(settings, offer)
    for msg in records(settings):
        follower.take(msg.key(), msg.value())
    follower.follow()
    assert shelf.base.stamp == boot_version  # the bootstrap still scores before the versions
    last_epoch = max(cut.values()) // epochs.epoch_s
    kept = {v for v, b in cut.items() if b // epochs.epoch_s > last_epoch - KEEP}
    assert shelf.newest.stamp == max(cut, key=lambda v: cut[v])
    covered = [c for c in changes if c["model_version"] in kept | {boot_version}]
    older = [c for c in changes if c["model_version"] in set(cut) - kept]
    assert len(covered) > 100 and older, (len(covered), len(older))
    at = [
        (c["model_version"], shelf.at(datetime.fromisoformat(c["event_time"]).timestamp()).stamp)
        for c in covered
    ]
    assert [(want, got) for want, got in at if want != got] == []
