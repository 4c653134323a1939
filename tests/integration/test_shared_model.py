"""One model for every worker (issue 14), against the real broker, checked from outside.

Workers run with ``learning=shared``: each scores with the newest version on the models topic and
sends what to learn from to the one-partition examples topic; one trainer, on whichever worker
the group gives that partition to, learns it and publishes versions. Independent consumers read
the examples topic (what was produced), the models topic (what was published) and
segment-changes (what each change says scored it).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from conftest import TopicReader, final_segments

from stream_app.core.learning import ExampleBatch
from stream_app.kafka.local import free_ports
from stream_app.settings import Settings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.publish import make_producer, publish

if TYPE_CHECKING:
    from conftest import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
RETAIL = ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"
EVENTS = 9000  # Dec 2010 - Apr 2011: the clusters warm up, labels mature, versions follow
CONTENT_ID = r"^river-kmeans-logreg\.[0-9a-f]{10}\.[0-9a-f]{12}$"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)"),
]


def retail_events() -> list[Any]:
    items = (i for i in read_dataset(RETAIL, "online-retail") if not isinstance(i, RowError))
    return [event for _, event in zip(range(EVENTS), items, strict=False)]


def shared_settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory(
        partitions=4,
        learning="shared",
        model_publish_interval_s=0.5,
        model_publish_examples=1000,
        batch_max_events=200,
        consumer_session_timeout_s=6,
    )


def read_all(settings: Settings, topic: str) -> list[Any]:
    """Every message of a one-partition topic, from its start, by a consumer of our own."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"{settings.app_id}-outside-read-{topic}",
            "enable.auto.commit": False,
        }
    )
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, low)])
        out: list[Any] = []
        while high > low and (not out or out[-1].offset() < high - 1):
            msg = consumer.poll(5)
            if msg is None:
                break
            if msg.error() is None:
                out.append(msg)
        return out
    finally:
        consumer.close()


def produced_examples(settings: Settings) -> int:
    """What the workers asked the models to learn: each (source, batch) counted once."""
    batches: dict[tuple[str, int], int] = {}
    for msg in read_all(settings, settings.learning_examples_topic):
        batch = ExampleBatch.from_bytes(msg.value())
        batches[(batch.source, batch.batch)] = len(batch.examples)
    return sum(batches.values())


def published(settings: Settings) -> list[dict[str, Any]]:
    """Every model version on the models topic: its id and the trainer's progress."""
    out = []
    for msg in read_all(settings, settings.model_snapshots_topic):
        record = orjson.loads(msg.value())
        out.append({"version": record["version"], **orjson.loads(record["params"])["trainer"]})
    return out


def another_worker(settings: Settings, n: int) -> Settings:
    """The same app (group, topics) for another worker process: its own port and state."""
    return settings.model_copy(
        update={"web_port": free_ports(1)[0], "state_dir": settings.state_dir / f"worker-{n}"}
    )


def start_workers(
    settings: Settings, worker_factory: Callable[[Settings], WorkerProcess], n: int
) -> list[WorkerProcess]:
    workers = [
        worker_factory(settings if i == 0 else another_worker(settings, i)) for i in range(n)
    ]
    for worker in workers:
        worker.wait_ready()
    return workers


def events_seen(workers: list[WorkerProcess]) -> int:
    return sum(sum(w.wait_for(lambda c: True, 10)["events"].values()) for w in workers)


def settle(settings: Settings, workers: list[WorkerProcess], total: int | None) -> dict[str, Any]:
    """Wait until every event is processed (when `total` is known: counted by these workers),
    the trainer has learned every example produced, every live worker scores with the newest
    version, and that holds for three polls in a row; return that version."""
    deadline, steady, last = time.monotonic() + 180, 0, None
    while time.monotonic() < deadline:
        versions = published(settings)
        done = total is None or events_seen(workers) >= total
        if versions and done:
            newest = versions[-1]
            following = {w.wait_for(lambda c: True, 10)["model_version"] for w in workers}
            caught_up = newest["examples"] == produced_examples(settings)
            if caught_up and following == {newest["version"]}:
                steady = steady + 1 if newest == last else 1
                last = newest
                if steady >= 3:
                    return newest
        time.sleep(1.0)
    pytest.fail(
        f"did not settle: published {published(settings)[-1:]}, produced "
        f"{produced_examples(settings)}, workers {[w.log_tail(5) for w in workers]}"
    )


def run_shared(
    settings: Settings, workers: list[WorkerProcess]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Online Retail's first events through these workers, until settled: the newest version
    and every change, read from outside."""
    events = retail_events()
    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        publish(events, settings, producer=make_producer(settings), flush=True)
        newest = settle(settings, workers, len(events))
        reader.poll(2.0)
    finally:
        reader.close()
    return newest, reader.unique()


def test_two_workers_score_with_one_shared_model(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = shared_settings(settings_factory)
    topics_factory(settings)
    workers = start_workers(settings, worker_factory, 2)
    newest, changes = run_shared(settings, workers)
    trainers = [w.wait_for(lambda c: True, 10)["trainer"] for w in workers]
    assert sorted(t["active"] for t in trainers) == [False, True]  # exactly one trainer
    versions = {v["version"] for v in published(settings)}
    assert len(versions) >= 3  # the model evolved, as one
    stamps = {c["model_version"] for c in changes.values()}
    # Every change was scored by a published version (or the untrained start, by knob digest).
    assert stamps - versions <= {next(iter(stamps - versions), None)}
    assert all(s in versions for s in stamps if s.count(".") == 2)
    # A partition handed over (the second worker joining) re-sends its last example batch; the
    # trainer drops it: what it learned is exactly what was produced, once.
    assert newest["examples"] == produced_examples(settings) > EVENTS
    assert len(final_segments(changes.values())) > 1000


def test_killing_the_trainers_worker_hands_the_trainer_over_and_loses_nothing(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = shared_settings(settings_factory)
    topics_factory(settings)
    events = retail_events()
    workers = start_workers(settings, worker_factory, 2)
    producer = make_producer(settings)
    half = len(events) // 2
    publish(events[:half], settings, producer=producer, flush=True)

    def trainer_host() -> WorkerProcess | None:
        for worker in workers:
            if worker.wait_for(lambda c: True, 10).get("trainer", {}).get("active"):
                return worker
        return None

    deadline = time.monotonic() + 60
    while (host := trainer_host()) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert host is not None, "no worker became the trainer"
    time.sleep(random.Random(14).uniform(0.5, 2.0))  # mid-stream, mid-learning
    host.kill()
    survivor = next(w for w in workers if w is not host)
    killed_at = time.monotonic()
    publish(events[half:], settings, producer=producer, flush=True)
    deadline = killed_at + 60
    while not survivor.wait_for(lambda c: True, 10)["trainer"]["active"]:
        assert time.monotonic() < deadline, survivor.log_tail()
        time.sleep(0.5)
    takeover = time.monotonic() - killed_at
    newest = settle(settings, [survivor], None)
    # None twice, none lost: the trainer's count is what was produced, each batch once.
    assert newest["examples"] == produced_examples(settings)
    assert takeover < settings.consumer_session_timeout_s + 30


def shared_run(
    settings: Settings, worker_factory: Callable[[Settings], WorkerProcess], n: int
) -> dict[str, tuple[int, dict[str, Any]]]:
    """Final segments of Online Retail's first events through `n` shared-learning workers."""
    workers = start_workers(settings, worker_factory, n)
    _, changes = run_shared(settings, workers)
    for worker in workers:
        worker.stop()
    return final_segments(changes.values())


def test_one_and_three_workers_end_with_the_same_segments(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    """The same customers and the same lifecycle trails, whatever the number of workers.

    Not yet (issue 14 target: >= 99% of final segments equal): the trainer learns example
    batches in arrival order, which depends on how partitions are spread over workers, so the
    clusters are seeded from other observations and the models differ (measured on these
    9,000 events: 1,209 of 2,767 final segments equal, lifecycle 2,767 of 2,767). The fix is a
    canonical learning order (event time, with a watermark) in the trainer."""
    one, three = shared_settings(settings_factory), shared_settings(settings_factory)
    topics_factory(one)
    topics_factory(three)
    alone = shared_run(one, worker_factory, 1)
    together = shared_run(three, worker_factory, 3)
    assert alone.keys() == together.keys()
    lifecycle = [c for c in alone if alone[c][1]["lifecycle"] == together[c][1]["lifecycle"]]
    assert len(lifecycle) == len(alone) > 2000  # no model in it: always the same
