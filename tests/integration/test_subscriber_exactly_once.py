"""The integration guide's consumer, killed and restarted: every change acted on exactly once.

The reference subscriber (`stream-app subscribe`, a subprocess as users run it) reads a changes
topic of the real broker: a few thousand valid SegmentChange values of 150 customers, some
re-sent with the same bytes, some ``origin: replay``, and a membership topic that already
reflects part of some customers' histories. It is SIGKILLed at seeded random points (while its
state file shows it half way), restarted, and once its committed offsets are moved back to the
start while it is down: what a kill between the SQLite commit and the offset commit leaves.

An independent reader then checks the outcome: plain sqlite3 on the state file, a plain
confluent-kafka consumer of the topic, and the test's own rule of what should be acted on
(entries into ``at_risk`` or the ``high`` tier, live, above the membership record's sequence).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import pytest
from confluent_kafka import Consumer, TopicPartition
from conftest import RunRecords, TopicReader

from stream_app.contracts.events import (
    Component,
    Lifecycle,
    Origin,
    PropensityTier,
    Reason,
    Scores,
    Segment,
    SegmentChange,
    SegmentMembership,
    encode,
)
from stream_app.settings import Settings
from stream_app.tools.publish import make_producer

ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = 150
KILLS = 5
BATCH = 40  # changes per transaction: many commit points for the kills to fall between
T0 = datetime(2026, 11, 1, tzinfo=UTC)

pytestmark = pytest.mark.integration


def history(rng: random.Random, customer: str, length: int) -> list[SegmentChange]:
    """One customer's changes 1..length, each segment following the one before."""
    changes: list[SegmentChange] = []
    previous: Segment | None = None
    for sequence in range(1, length + 1):
        current = Segment(
            cluster=rng.randrange(4),
            cluster_profile="steady buyers",
            propensity_tier=rng.choice(list(PropensityTier)),
            lifecycle=rng.choice(list(Lifecycle)),
        )
        components = [Component.CLUSTER, Component.PROPENSITY, Component.LIFECYCLE]
        changes.append(
            SegmentChange(
                change_id=rng.randbytes(16).hex(),
                customer_id=customer,
                sequence=sequence,
                component=Component.ENTRY if previous is None else rng.choice(components),
                previous=previous,
                current=current,
                scores=Scores(
                    purchase_propensity=round(rng.random(), 3),
                    churn_risk=None,
                    absent={"churn_risk": "not scored yet for this customer"},
                ),
                reason=Reason(
                    trigger_event_id=f"ev-{customer}-{sequence}",
                    trigger_event_type="purchase",
                    summary=f"test change {sequence}",
                    top_contributions=[],
                ),
                model_version="test-model.1",
                segment_definition_version="seg-test.1",
                event_time=T0 + timedelta(hours=sequence),
                processed_at=T0 + timedelta(hours=sequence, seconds=1),
                origin=Origin.REPLAY if rng.random() < 0.15 else Origin.LIVE,
            )
        )
        previous = current
    return changes


def interleaved(rng: random.Random, histories: list[list[SegmentChange]]) -> list[SegmentChange]:
    """All changes, customers interleaved at random, each customer's in sequence order, and about
    one in twenty sent again a little later (same bytes: an at-least-once re-delivery)."""
    queues = [list(h) for h in histories]
    stream: list[SegmentChange] = []
    while queues:
        queue = rng.choice(queues)
        stream.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    resent = list(stream)
    for change in rng.sample(stream, len(stream) // 20):
        later = resent.index(change) + rng.randrange(1, 200)
        resent.insert(min(later, len(resent)), change)
    return resent


def memberships(
    rng: random.Random, histories: list[list[SegmentChange]]
) -> dict[str, SegmentMembership]:
    """Membership records for a fifth of the customers, at a change within their history."""
    records = {}
    for changes in rng.sample(histories, len(histories) // 5):
        change = rng.choice(changes)
        records[change.customer_id] = SegmentMembership(
            customer_id=change.customer_id,
            segment=change.current,
            segment_name=change.current.name,
            sequence=change.sequence,
            change_id=change.change_id,
            event_time=change.event_time,
            origin=change.origin,
            model_version=change.model_version,
        )
    return records


def should_act(change: SegmentChange, members: dict[str, SegmentMembership]) -> str:
    """The expected outcome, written from the guide's rules (not from the subscriber's code)."""
    member = members.get(change.customer_id)
    if member is not None and change.sequence <= member.sequence:
        return "superseded"
    if change.origin is Origin.REPLAY:
        return "replay_ignored"
    cur, prev = change.current, change.previous
    at_risk = cur.lifecycle is Lifecycle.AT_RISK and (
        prev is None or prev.lifecycle != cur.lifecycle
    )
    high = cur.propensity_tier is PropensityTier.HIGH and (
        prev is None or prev.propensity_tier != cur.propensity_tier
    )
    return "acted" if at_risk or high else "not_of_interest"


class Subscriber:
    """`python -m stream_app.cli subscribe` in a subprocess; only its own pid is signalled."""

    def __init__(self, settings: Settings, state: Path, log: Path, records: RunRecords) -> None:
        self.log = log
        args = ["--group", "email-exactly-once", "--state", str(state), "--batch-size", str(BATCH)]
        args += ["--lifecycle", "at_risk", "--tier", "high", "--idle-timeout", "4"]
        env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stream_app.cli", "subscribe", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.records = records
        self.record = records.process(self.process.pid, group=False)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.records.forget(self.record)

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.records.forget(self.record)


GROUP = "email-exactly-once"
Placed = tuple[int, int, str]  # partition, offset, change id of one message on the topic


def from_state(state: Path, query: str) -> set[str]:
    """The first column of ``query`` on the state file (empty before its tables exist)."""
    if not state.exists():
        return set()
    try:
        with sqlite3.connect(state, timeout=5) as db:
            return {row[0] for row in db.execute(query)}
    except sqlite3.OperationalError:  # the subscriber has not created its tables yet
        return set()


def seen(state: Path) -> set[str]:
    return from_state(state, "SELECT change_id FROM seen_changes")


def committed(settings: Settings) -> dict[int, int]:
    """The group's committed offset per partition (0 where it has none), read independently."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": GROUP})
    topic = settings.segment_changes_topic
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    consumer.close()
    return {tp.partition: max(tp.offset, 0) for tp in found}


def rewind(settings: Settings) -> None:
    """Commit offset 0 for every partition of the group, as a lost offset commit leaves it."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": GROUP})
    topic = settings.segment_changes_topic
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.commit(offsets=[TopicPartition(topic, p, 0) for p in partitions], asynchronous=False)
    consumer.close()


def read_topic(settings: Settings, count: int) -> list[Placed]:
    """Every message of the changes topic, by a plain consumer: where it is and its change id."""
    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        reader.until(lambda got: len(got) >= count, timeout=30)
    finally:
        reader.close()
    return [
        (m.partition(), m.offset(), c["change_id"])
        for m, c in zip(reader.messages, reader.received, strict=True)
    ]


def assert_committed_only_what_it_recorded(
    settings: Settings, state: Path, topic: list[Placed]
) -> None:
    """Commit after acting: every message below a committed offset is in the state file."""
    ends = committed(settings)
    behind = {i for p, o, i in topic if o < ends.get(p, 0)} - seen(state)
    assert not behind, f"{len(behind)} changes committed in Kafka but never recorded"


def expected_repeats(topic: list[Placed], starts: dict[int, int], seen_before: set[str]) -> int:
    """Of the messages from ``starts`` on, those whose change id was seen already."""
    read = [i for p, o, i in topic if o >= starts.get(p, 0)]
    return sum(n if i in seen_before else n - 1 for i, n in Counter(read).items())


@dataclass
class Scenario:
    """The topics' content, the state file, and the subscriber processes started on it."""

    settings: Settings
    state: Path
    log: Path
    records: RunRecords
    started: list[Subscriber] = field(default_factory=list)

    def start(self) -> Subscriber:
        subscriber = Subscriber(self.settings, self.state, self.log, self.records)
        self.started.append(subscriber)
        return subscriber

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def run_until_seen(self, count: int, extra_s: float) -> None:
        """Start a subscriber, SIGKILL it ``extra_s`` after its state file has ``count`` changes."""
        subscriber = self.start()
        deadline = time.monotonic() + 30
        while len(seen(self.state)) < count and subscriber.process.poll() is None:
            assert time.monotonic() < deadline, self.tail()
            time.sleep(0.005)
        time.sleep(extra_s)  # anywhere: in a transaction, between two commits
        assert subscriber.process.poll() is None, f"it ended before its kill:\n{self.tail()}"
        subscriber.kill()


class Published(NamedTuple):
    unique: dict[str, SegmentChange]  # every change of every history, by id
    stream: list[SegmentChange]  # as produced, re-sent copies included
    members: dict[str, SegmentMembership]  # by customer


def publish_scenario(settings: Settings, rng: random.Random) -> Published:
    """Produce the memberships, then the change stream."""
    histories = [history(rng, f"cust-{n}", rng.randrange(5, 36)) for n in range(CUSTOMERS)]
    stream = interleaved(rng, histories)
    members = memberships(rng, histories)
    producer = make_producer(settings)
    for member in members.values():
        key = member.customer_id.encode()
        producer.produce(settings.segment_membership_topic, key=key, value=encode(member))
    for change in stream:
        key = change.customer_id.encode()
        producer.produce(settings.segment_changes_topic, key=key, value=encode(change))
    assert producer.flush(30) == 0
    return Published({c.change_id: c for h in histories for c in h}, stream, members)


@pytest.fixture
def scenario(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    run_records: RunRecords,
    tmp_path: Path,
) -> Iterator[Scenario]:
    settings = settings_factory(partitions=2)
    topics_factory(settings)
    made = Scenario(settings, tmp_path / "email.sqlite3", tmp_path / "subscriber.log", run_records)
    yield made
    for subscriber in made.started:
        if subscriber.process.poll() is None:
            subscriber.kill()


def test_the_reference_subscriber_acts_exactly_once_across_sigkills(scenario: Scenario) -> None:
    rng = random.Random(20261215)
    unique, stream, members = publish_scenario(scenario.settings, rng)
    assert 2000 < len(stream) < 5000 and len(stream) > len(unique)
    topic = read_topic(scenario.settings, len(stream))
    assert sorted(i for _, _, i in topic) == sorted(c.change_id for c in stream)

    for kill, target in enumerate(sorted(rng.sample(range(50, len(unique) - 300), KILLS))):
        scenario.run_until_seen(target, rng.uniform(0.0, 0.05))
        assert 0 < len(seen(scenario.state)) < len(unique)  # the kill struck half way
        assert_committed_only_what_it_recorded(scenario.settings, scenario.state, topic)
        if kill == KILLS // 2:
            rewind(scenario.settings)  # as if this kill had struck before the offset commit
    starts = committed(scenario.settings)
    seen_before = seen(scenario.state)
    acted_before = from_state(scenario.state, "SELECT change_id FROM actions")
    assert scenario.start().finish(60) == 0, scenario.tail()

    with sqlite3.connect(scenario.state) as db:
        actions = db.execute("SELECT change_id, customer_id, sequence, segment FROM actions")
        acted = [tuple(row) for row in actions.fetchall()]
        outcomes = dict(db.execute("SELECT change_id, outcome FROM seen_changes").fetchall())
        anomalies = db.execute("SELECT kind, count(*) FROM anomalies GROUP BY kind").fetchall()
    expected = {i: should_act(c, members) for i, c in unique.items()}
    assert outcomes == expected  # every change seen once, nothing lost, each judged right
    wanted = {i for i, outcome in expected.items() if outcome == "acted"}
    assert len(wanted) > 300
    assert sorted(row[0] for row in acted) == sorted(wanted)  # exactly once, nothing else
    for change_id, customer, sequence, segment in acted:
        change = unique[change_id]
        assert (customer, sequence, segment) == (
            change.customer_id,
            change.sequence,
            change.current.name,
        )
    assert anomalies == []  # no gap, no fork: the stream had none
    log = scenario.log.read_text()
    assert "FORK" not in log and "gap: " not in log
    # The last run read from the committed offsets: what had been seen was a repeat, and it
    # acted only on what was left.
    read = sum(1 for p, o, _ in topic if o >= starts.get(p, 0))
    summary = log.strip().splitlines()[-1]
    assert summary.startswith(
        f"done: {read} changes read, {len(wanted - acted_before)} acted on, "
        f"{expected_repeats(topic, starts, seen_before)} repeats ignored, "
    ), summary
    assert summary.endswith("0 gaps, 0 forks, 0 invalid; bootstrap: already done"), summary
