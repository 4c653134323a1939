"""`stream-app bootstrap` against the real broker: a deployment that starts warm.

Online Retail up to 2011-11-01 is bootstrapped into a fresh app, one worker starts, and the rest
of the file (2011-11-01 to 2011-12-09, 4,007 invoices) is published live. An independent
consumer reads `segment-changes` and the state changelog. Also the refusals: topics missing, a
changelog that already holds state (and `--force`), a partition count that does not match; and
`--emit`.
"""

from __future__ import annotations

import logging
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from confluent_kafka import Consumer
from conftest import TopicReader, assert_one_history, final_segments

from load_tests.systems import processed_count
from stream_app.contracts.events import Event, Origin
from stream_app.kafka.ranges import Bounds, range_consumer, read_ranges, resolve
from stream_app.live.store import decode_record, partition_of
from stream_app.live.workerproc import run_cli, wait_until
from stream_app.settings import Settings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.publish import publish
from stream_app.tools.replay import replay_offline

if TYPE_CHECKING:
    from conftest import WorkerProcess

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
RETAIL = ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"
UNTIL = datetime(2011, 11, 1, tzinfo=UTC)
WARMING_UP = "warming up"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)"),
]


def bootstrap_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`stream-app bootstrap ARGS` as an operator runs it, configured by the environment."""
    return run_cli(settings, "bootstrap", *args, "--no-progress", cwd=ROOT)


def refused(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""
    return lines[0]


def read_all(reader: TopicReader, quiet_s: float = 3.0) -> None:
    """Read until nothing new arrives for `quiet_s`."""
    while True:
        before = len(reader.received)
        reader.poll(quiet_s)
        if len(reader.received) == before:
            return


def changelog(settings: Settings, expected: int) -> dict[str, Any]:
    """The bootstrapped states as the changelog holds them, checked record by record."""
    reader = TopicReader(settings, settings.customers_changelog_topic)
    try:
        assert reader.until(lambda got: len(got) >= expected, timeout=60)
        read_all(reader, 1.0)
    finally:
        reader.close()
    states = {}
    for msg in reader.messages:
        customer = msg.key().decode()
        assert msg.partition() == partition_of(customer, settings.partitions)
        state, delivery = decode_record(msg.value())
        assert state.customer_id == customer
        assert not delivery.outbox and not delivery.offsets
        states[customer] = state
    assert len(states) == len(reader.messages) == expected
    return states


def live_rest() -> list[Event]:
    return [
        item
        for item in read_dataset(RETAIL, "online-retail", origin=Origin.LIVE)
        if not isinstance(item, RowError) and item.event_time >= UNTIL
    ]


def assert_continued(
    boot: dict[str, Any], changes: list[dict[str, Any]], live: list[Event]
) -> None:
    """A customer known from history gets no second entry; the changes of their first live event
    carry a named cluster and a scored tier; their sequence continues the stored one, without a
    gap or a reuse. A customer new in the live window starts with an entry at 1."""
    assert_one_history(changes, {customer: state.sequence for customer, state in boot.items()})
    by_customer: dict[str, list[dict[str, Any]]] = {}
    for change in changes:
        by_customer.setdefault(change["customer_id"], []).append(change)
    first_event: dict[str, str] = {}
    for event in live:
        first_event.setdefault(event.customer_id, event.event_id)
    known = [c for c in by_customer if c in boot]
    assert len(known) > 1000, "most live customers are known from history"
    for customer in known:
        trail = sorted(by_customer[customer], key=lambda c: c["sequence"])
        assert all(c["component"] != "entry" for c in trail), customer
        at_first = [
            c for c in trail if c["reason"]["trigger_event_id"] == first_event.get(customer)
        ]
        for change in at_first:
            assert not change["current"]["cluster_profile"].startswith(WARMING_UP), change
        # Where the first live event moved the customer, the segment it ends in is scored. (A
        # lifecycle move comes first and still shows the tier before the event's re-scoring;
        # a refund never lifts a tier, not even out of `unscored`: issue 13.)
        if at_first and at_first[-1]["reason"]["trigger_event_type"] != "refund":
            assert at_first[-1]["current"]["propensity_tier"] != "unscored", at_first[-1]
    for customer in set(by_customer) - set(boot):  # new in the live window
        trail = sorted(by_customer[customer], key=lambda c: c["sequence"])
        assert trail[0]["component"] == "entry"


def offline_rest(boot: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """What the offline replay sends after the bootstrapped states (past each stored
    sequence), without the time-driven changes past the watermark the live worker's slowest
    partition reaches on this input (the replay fires what falls due in the last lateness
    window too; a live worker waits for more input).

    Learning in process, that is the replay of the whole file. Shared, the history is replayed
    in process, as `bootstrap` does, and the same processor goes on over the rest with the
    trainer in process, continuing from the bootstrapped models, as the deployment's does."""
    collected: list[dict[str, Any]] = []

    class Collect:
        def write(self, line: bytes) -> int:
            collected.append(orjson.loads(line))
            return len(line)

    everything = [i for i in read_dataset(RETAIL, "online-retail") if not isinstance(i, RowError)]
    if settings.learning == "shared":
        _, history, _ = replay_offline(
            [e for e in everything if e.event_time < UNTIL], settings.segmentation
        )
        replay_offline(
            [e for e in everything if e.event_time >= UNTIL],
            settings.segmentation,
            Collect(),  # type: ignore[arg-type]
            epochs=settings.epochs(),
            start=history,
        )
    else:
        replay_offline(everything, settings.segmentation, Collect())  # type: ignore[arg-type]
    watermark = slowest_watermark(everything, settings)
    return [
        c
        for c in collected
        if (c["customer_id"] not in boot or c["sequence"] > boot[c["customer_id"]].sequence)
        and (c["reason"]["trigger_event_type"] != "time_passed" or at(c) <= watermark)
    ]


def slowest_watermark(events: list[Event], settings: Settings) -> float:
    """The watermark of the partition whose last event is the earliest: time-driven work past
    it has not fired live when the input ends."""
    last: dict[int, float] = {}
    for event in events:
        p = partition_of(event.customer_id, settings.partitions)
        last[p] = max(last.get(p, -math.inf), event.event_time.timestamp())
    return min(last.values()) - settings.segmentation.allowed_lateness_seconds


def at(change: dict[str, Any]) -> float:
    return datetime.fromisoformat(change["event_time"]).timestamp()


@pytest.mark.parametrize("partitions", [1, 2])
def test_bootstrapped_deployment_scores_from_the_first_live_event(
    partitions: int,
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    """On one partition the worker processes in the offline order, so history through the
    bootstrap and the rest through Kafka give exactly the offline replay of the whole file."""
    # One partition is held to the offline replay of the whole file, which learns in process;
    # two partitions run the default, shared learning (from the bootstrapped version).
    learning = "in_process" if partitions == 1 else "shared"
    settings = settings_factory(partitions=partitions, learning=learning)
    topics_factory(settings)
    started = time.monotonic()
    done = bootstrap_cli(
        settings, str(RETAIL), "--format", "online-retail", "--until", "2011-11-01"
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip()
    assert "\n" not in summary
    assert summary.startswith("Bootstrapped 4,010 customers"), summary
    assert "The models are warm" in summary and "Nothing was sent to" in summary
    log.info("bootstrap took %.1fs: %s", took, summary)
    boot = changelog(settings, 4010)
    last_history = max(st.behaviour.last_event_at for st in boot.values())
    assert last_history < UNTIL.timestamp()

    worker = worker_factory(settings)
    worker.wait_ready()
    live = live_rest()
    assert len(live) == 4007
    publish(live, settings)
    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        worker.wait_for(lambda c: processed_count(c) >= len(live), timeout=120)
        read_all(reader)
    finally:
        reader.close()
    assert "models restored from snapshot" in worker.log_tail(10_000)
    changes = list(reader.unique().values())
    assert len(changes) == len(reader.received)  # one worker, no crash: nothing sent twice

    # Nothing from history: every change is live, after the history, past the stored sequence.
    assert {c["origin"] for c in changes} == {"live"}
    assert all(datetime.fromisoformat(c["event_time"]).timestamp() > last_history for c in changes)
    cold = [
        c
        for c in changes
        if c["current"]["propensity_tier"] == "unscored"
        or c["current"]["cluster_profile"].startswith(WARMING_UP)
    ]
    share = len(cold) / len(changes)
    log.info("%d live changes, %d (%.3f%%) unscored or warming up", len(changes), len(cold), share)
    assert share < 0.01, cold[:3]

    assert_continued(boot, changes, live)
    # Exactly the offline replay of the same learning (shared: the bootstrap, then the trainer
    # continuing from its version), up to the slowest partition's watermark.
    expected = offline_rest(boot, settings)
    horizon = max(at(c) for c in expected if c["reason"]["trigger_event_type"] == "time_passed")
    compared = [
        c for c in changes if c["reason"]["trigger_event_type"] != "time_passed" or at(c) <= horizon
    ]
    assert sorted(c["change_id"] for c in compared) == sorted(c["change_id"] for c in expected)
    assert final_segments(compared) == final_segments(expected)
    versions = {c["model_version"] for c in changes}
    assert len(versions) > (1 if learning == "shared" else 0), versions
    assert worker.stop() == 0, worker.log_tail()


def history_file(tmp_path: Path) -> Path:
    """Three customers, two events each (a small history for the refusals)."""
    lines = []
    for i in range(3):
        for hour, event_type in ((i, "product_view"), (i + 30, "cart_add")):
            at = datetime(2024, 3, 1, hour % 24, tzinfo=UTC).replace(day=1 + hour // 24)
            event = {
                "event_id": f"c{i}-{hour}",
                "customer_id": f"c{i}",
                "event_time": at.isoformat(),
                "event_type": event_type,
                "origin": "live",
            }
            lines.append(orjson.dumps(event))
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@contextmanager
def group_member(settings: Settings) -> Iterator[None]:
    """A member of the app's consumer group (as a running worker is) while the block runs."""
    consumer = Consumer(
        {"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.app_id}
    )
    assigned: list[bool] = []
    consumer.subscribe(
        [settings.customers_changelog_topic], on_assign=lambda *_: assigned.append(True)
    )
    try:
        assert wait_until(lambda: bool(assigned), 30, 0.1, lambda _: consumer.poll(0.1))
        yield
    finally:
        consumer.close()


def test_refusals_force_and_emit(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
) -> None:
    path = str(history_file(tmp_path))
    settings = settings_factory(partitions=2)
    missing = refused(bootstrap_cli(settings, path, "--format", "events"))
    assert f"topic '{settings.customers_changelog_topic}' does not exist" in missing

    topics_factory(settings)
    wrong = refused(
        bootstrap_cli(settings.model_copy(update={"partitions": 3}), path, "--format", "events")
    )
    assert "has 2 partitions but the settings say 3" in wrong

    first = bootstrap_cli(settings, path, "--format", "events")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Bootstrapped 3 customers"), first.stdout
    assert "The models are NOT warm" in first.stdout  # six events teach nothing, and it says so
    again = refused(bootstrap_cli(settings, path, "--format", "events"))
    assert "already holds 3 records" in again and "--force" in again

    with group_member(settings):  # a running worker would not see the bootstrap
        running = refused(bootstrap_cli(settings, path, "--format", "events", "--force"))
    assert f"consumer group '{settings.app_id}' has 1 active member(s)" in running

    forced = bootstrap_cli(settings, path, "--format", "events", "--force", "--emit")
    assert forced.returncode == 0, forced.stderr
    assert "over 3 records already there, --force" in forced.stdout
    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        read_all(reader)
    finally:
        reader.close()
    assert reader.received, "--emit sends the history's changes"
    assert {c["origin"] for c in reader.received} == {"replay"}  # though the file says live
    assert {m.key().decode() for m in reader.messages} == {"c0", "c1", "c2"}
    for msg in reader.messages:
        assert msg.key().decode() == orjson.loads(msg.value())["customer_id"]
        assert msg.partition() == partition_of(msg.key().decode(), settings.partitions)
    assert f"{len(reader.received)} history changes were sent" in forced.stdout


def record_sizes(settings: Settings, topic: str) -> list[int]:
    """The size of every record of `topic` now (tombstones count 0), read without a group
    (`kafka.ranges`, as shadow runs and `compare` read)."""
    consumer = range_consumer(settings, f"{settings.app_id}-sizes")
    try:
        ranges = resolve(consumer, [topic], Bounds())
        return [len(msg.value() or b"") for msg in read_ranges(consumer, ranges)]
    finally:
        consumer.close()


def test_a_leap_in_event_time_that_fires_every_customers_due_work_fits_kafkas_limits(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    """After a bootstrap, one event eleven months later makes every customer's lifecycle and
    label work due in one batch: thousands of examples at once. Their records and the state
    table's values stay far under Kafka's 1 MB, and the worker goes on (one record of them,
    as before, was over 1 MB: the batch failed on every restart)."""
    # Shared learning (the default): one CI run in two, Faust never handed this one message
    # over; the worker now reads a partition of which nothing came from its committed offset.
    settings = settings_factory(partitions=1)
    topics_factory(settings)
    done = bootstrap_cli(
        settings, str(RETAIL), "--format", "online-retail", "--until", "2011-11-01"
    )
    assert done.returncode == 0, done.stderr
    worker = worker_factory(settings)
    worker.wait_ready()
    leap = [e for e in live_rest() if e.event_time >= datetime(2011, 12, 9, tzinfo=UTC)][:1]
    later = leap[0].model_copy(
        update={"event_time": datetime(2012, 10, 1, tzinfo=UTC), "event_id": "leap-1"}
    )
    publish([later], settings)
    counts = worker.wait_for(lambda c: processed_count(c) >= 1, timeout=120)
    assert counts["dead_letters"] == {}
    reader = TopicReader(settings, settings.learning_examples_topic)
    try:
        assert reader.until(lambda got: sum(len(r["examples"]) for r in got) > 5400, 120)
        reader.read_to_end()
    finally:
        reader.close()
    examples = sum(len(r["examples"]) for r in reader.received)
    log.info(
        "%d examples in %d records, largest %d B", examples, len(reader.sizes), max(reader.sizes)
    )
    assert max(reader.sizes) < 512 * 1024
    changelog_sizes = record_sizes(settings, settings.customers_changelog_topic)
    assert max(changelog_sizes) < 512 * 1024
    # Still working: the next event is processed too.
    publish([later.model_copy(update={"event_id": "leap-2"})], settings)
    worker.wait_for(lambda c: processed_count(c) >= 2, timeout=60)
    assert worker.stop() == 0, worker.log_tail()
