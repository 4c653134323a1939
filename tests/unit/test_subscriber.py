"""The reference subscriber's dedupe, gap and fork logic on its real SQLite store (no broker).

The deliveries are what an at-least-once stream can hand a subscriber: each customer's changes
in sequence order, some re-sent later, some never arriving (a gap), and, as an error our
guarantees rule out, forks. A crash is an exception in the middle of a batch's transaction
followed by a fresh process (the file reopened) reading again from any earlier point, as
Kafka re-delivers everything after the committed offset.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from hypothesis import given
from hypothesis import strategies as st

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
from stream_app.errors import UserError
from stream_app.settings import Settings
from stream_app.tools.subscriber import (
    Arrival,
    Inbox,
    Interest,
    Ledger,
    Message,
    Outcome,
    Place,
    _committed,
    _locked,
    default_state_path,
    describe,
)

OWNER = {"group": "email", "changes_topic": "changes", "membership_topic": "membership"}
T0 = datetime(2026, 11, 1, tzinfo=UTC)
EVERYTHING = Interest(include_replay=True)


def segment(n: int) -> Segment:
    """A segment that differs from segment n - 1 in its lifecycle stage and tier."""
    return Segment(
        cluster=n % 3,
        cluster_profile="steady buyers",
        propensity_tier=list(PropensityTier)[n % 4],
        lifecycle=list(Lifecycle)[n % 5],
    )


def change(
    customer: str, sequence: int, *, origin: Origin = Origin.LIVE, salt: str = ""
) -> SegmentChange:
    """Change ``sequence`` of ``customer``; ``salt`` makes a different change at the same place."""
    return SegmentChange(
        change_id=hashlib.md5(f"{customer}/{sequence}/{salt}".encode()).hexdigest(),
        customer_id=customer,
        sequence=sequence,
        component=Component.ENTRY if sequence == 1 else Component.LIFECYCLE,
        previous=None if sequence == 1 else segment(sequence - 1),
        current=segment(sequence),
        scores=Scores(purchase_propensity=0.5, churn_risk=None, absent={"churn_risk": "not yet"}),
        reason=Reason(
            trigger_event_id=f"ev-{customer}-{sequence}{salt}",
            trigger_event_type="purchase",
            summary=f"change {sequence}",
            top_contributions=[],
        ),
        model_version="m.1",
        segment_definition_version="seg.1",
        event_time=T0 + timedelta(hours=sequence),
        processed_at=T0 + timedelta(hours=sequence),
        origin=origin,
    )


def messages(changes: list[SegmentChange]) -> list[Message]:
    return [Message(encode(c), Place("changes", 0, offset)) for offset, c in enumerate(changes)]


@dataclass
class Store:
    """One state file, opened as a fresh subscriber process would."""

    path: Path
    interest: Interest = EVERYTHING

    def inbox(self) -> Inbox:
        self.reports: list[str] = []
        return Inbox(Ledger(self.path, OWNER), self.interest, self.reports.append)

    def rows(self, query: str) -> list[Any]:
        with sqlite3.connect(self.path) as db:
            return db.execute(query).fetchall()

    def actions(self) -> list[str]:
        return sorted(row[0] for row in self.rows("SELECT change_id FROM actions"))

    def outcomes(self) -> dict[str, str]:
        return dict(self.rows("SELECT change_id, outcome FROM seen_changes"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.sqlite3")


# Deliveries: a few customers' histories, some changes never delivered, some re-sent later.


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[SegmentChange], dict[str, list[int]]]:
    """(the messages in delivery order, each customer's delivered sequences)."""
    delivered: dict[str, list[int]] = {}
    queues = []
    for n in range(draw(st.integers(1, 4))):
        length = draw(st.integers(1, 8))
        kept = [s for s in range(1, length + 1) if draw(st.integers(0, 4)) > 0]  # 1 in 5 lost
        delivered[f"c{n}"] = kept
        queues.append([change(f"c{n}", s) for s in kept])
    stream: list[SegmentChange] = []
    while any(queues):
        queue = draw(st.sampled_from([q for q in queues if q]))
        stream.append(queue.pop(0))
    for item in draw(st.lists(st.sampled_from(stream), max_size=10)) if stream else []:
        position = draw(st.integers(stream.index(item) + 1, len(stream)))
        stream.insert(position, item)  # re-sent after the original
    return stream, delivered


def expected_gaps(delivered: dict[str, list[int]]) -> int:
    """Jumps of more than one between a customer's consecutive delivered sequences."""
    return sum(b - a > 1 for seqs in delivered.values() for a, b in pairwise(seqs))


@given(plan=deliveries(), batch=st.integers(1, 7))
def test_every_change_is_acted_on_once_and_repeats_and_gaps_are_counted(
    tmp_path_factory: pytest.TempPathFactory,
    plan: tuple[list[SegmentChange], dict[str, list[int]]],
    batch: int,
) -> None:
    stream, delivered = plan
    store = Store(tmp_path_factory.mktemp("s") / "state.sqlite3")
    inbox = store.inbox()
    sent = messages(stream)
    for start in range(0, len(sent), batch):
        inbox.apply(sent[start : start + batch])
    distinct = {c.change_id for c in stream}
    assert store.actions() == sorted(distinct)
    assert inbox.tally.acted == len(distinct)
    assert inbox.tally.repeats == len(stream) - len(distinct)
    assert inbox.tally.gaps == expected_gaps(delivered)
    assert len(store.rows("SELECT * FROM anomalies WHERE kind = 'gap'")) == inbox.tally.gaps
    assert sum(line.startswith("repeat: ") for line in store.reports) == inbox.tally.repeats
    assert inbox.tally.forks == 0


class CrashError(Exception):
    pass


def crashing(inbox: Inbox, after: int) -> Inbox:
    """``inbox`` whose ledger dies at its ``after``-th recorded change (mid-transaction)."""
    record, calls = inbox.ledger.record, [0]

    def record_or_crash(
        change: SegmentChange, arrival: Arrival, outcome: Outcome, place: Place
    ) -> None:
        calls[0] += 1
        if calls[0] == after:
            raise CrashError
        record(change, arrival, outcome, place)

    inbox.ledger.record = record_or_crash  # type: ignore[method-assign]
    return inbox


@given(
    plan=deliveries(),
    batch=st.integers(1, 5),
    crashes=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 40)), max_size=4),
)
def test_crashes_and_redeliveries_change_nothing(
    tmp_path_factory: pytest.TempPathFactory,
    plan: tuple[list[SegmentChange], dict[str, list[int]]],
    batch: int,
    crashes: list[tuple[int, int]],
) -> None:
    """Each crash strikes at some recorded change; the next process reads again from any point
    at or before the first message whose batch did not commit (the offset committed after it).
    The state file ends as after one uninterrupted run."""
    stream, _ = plan
    sent = messages(stream)
    calm = Store(tmp_path_factory.mktemp("calm") / "state.sqlite3")
    calm_inbox = calm.inbox()
    calm_inbox.apply(sent)
    crashed = Store(tmp_path_factory.mktemp("crashed") / "state.sqlite3")
    crashed.inbox().ledger.close()
    position, pending = 0, list(crashes)
    while position < len(sent):
        strike, back = pending.pop(0) if pending else (0, 0)
        inbox = crashing(crashed.inbox(), strike)
        committed = position
        try:
            for start in range(position, len(sent), batch):
                inbox.apply(sent[start : start + batch])
                committed = min(start + batch, len(sent))
            position = len(sent)
        except CrashError:
            position = max(0, committed - back)  # Kafka re-delivers from here
        inbox.ledger.close()
    assert crashed.actions() == calm.actions()
    assert crashed.outcomes() == calm.outcomes()
    assert crashed.rows("SELECT kind, customer_id, sequence FROM anomalies ORDER BY id") == (
        calm.rows("SELECT kind, customer_id, sequence FROM anomalies ORDER BY id")
    )


@given(customers=st.integers(1, 3), forks_at=st.lists(st.integers(0, 20), max_size=5))
def test_a_fork_is_an_error_and_changes_nothing_acted_on(
    tmp_path_factory: pytest.TempPathFactory, customers: int, forks_at: list[int]
) -> None:
    """Two kinds of fork, after the original: the same change id with other content, and the
    same customer and sequence under another change id. Neither is acted on or recorded."""
    store = Store(tmp_path_factory.mktemp("f") / "state.sqlite3")
    stream = [change(f"c{n}", s) for s in range(1, 4) for n in range(customers)]
    inbox = store.inbox()
    inbox.apply(messages(stream))
    forks = []
    for n in forks_at:
        original = stream[n % len(stream)]
        if n % 2:
            forks.append(original.model_copy(update={"model_version": "other"}))
        else:
            forks.append(change(original.customer_id, original.sequence, salt="fork"))
    inbox.apply(messages(forks))
    assert inbox.tally.forks == len(forks)
    assert store.actions() == sorted(c.change_id for c in stream)
    assert set(store.outcomes()) == {c.change_id for c in stream}
    assert sum(line.startswith("FORK: ") for line in store.reports) == len(forks)
    assert len(store.rows("SELECT * FROM anomalies WHERE kind = 'fork'")) == len(forks)


def member(of: SegmentChange) -> SegmentMembership:
    return SegmentMembership(
        customer_id=of.customer_id,
        segment=of.current,
        segment_name=of.current.name,
        sequence=of.sequence,
        change_id=of.change_id,
        event_time=of.event_time,
        origin=of.origin,
        model_version=of.model_version,
    )


def test_a_change_the_membership_already_reflects_is_not_acted_on(store: Store) -> None:
    history = [change("c1", s) for s in range(1, 6)]
    inbox = store.inbox()
    with inbox.ledger.transaction():
        inbox.ledger.remember_member(member(history[2]))  # #3 is the customer's current segment
        inbox.ledger.remember_member(member(history[1]))  # an older record changes nothing
    inbox.apply(messages(history))
    assert store.outcomes() == {
        history[0].change_id: "superseded",
        history[1].change_id: "superseded",
        history[2].change_id: "superseded",
        history[3].change_id: "acted",
        history[4].change_id: "acted",
    }
    assert inbox.tally.gaps == 0
    assert store.rows("SELECT sequence, source FROM customers") == [(5, "change")]


def test_another_change_id_at_the_membership_sequence_is_a_fork(store: Store) -> None:
    inbox = store.inbox()
    with inbox.ledger.transaction():
        inbox.ledger.remember_member(member(change("c1", 3)))
    inbox.apply(messages([change("c1", 3, salt="other"), change("c1", 4)]))
    assert (inbox.tally.forks, inbox.tally.acted) == (1, 1)


def test_replay_is_never_acted_on_unless_asked(tmp_path: Path) -> None:
    stream = [change("c1", 1, origin=Origin.REPLAY), change("c1", 2), change("c2", 1)]
    live_only = Store(tmp_path / "live.sqlite3", Interest())
    live_only.inbox().apply(messages(stream))
    assert live_only.actions() == sorted([stream[1].change_id, stream[2].change_id])
    assert live_only.outcomes()[stream[0].change_id] == "replay_ignored"
    both = Store(tmp_path / "both.sqlite3", Interest(include_replay=True))
    both.inbox().apply(messages(stream))
    assert both.actions() == sorted(c.change_id for c in stream)


def test_only_entries_into_a_chosen_segment_are_acted_on(tmp_path: Path) -> None:
    """segment(n) cycles through the stages; at_risk comes at changes 2 and 7."""
    store = Store(tmp_path / "s.sqlite3", Interest(lifecycle=frozenset({"at_risk"})))
    stream = [change("c1", s) for s in range(1, 9)]
    inbox = store.inbox()
    inbox.apply(messages(stream))
    assert [c.current.lifecycle for c in stream if c.change_id in store.actions()] == [
        Lifecycle.AT_RISK,
        Lifecycle.AT_RISK,
    ]
    assert inbox.tally.outcomes[Outcome.NOT_OF_INTEREST] == 6


def test_an_invalid_value_is_counted_and_kept_for_an_operator(store: Store) -> None:
    inbox = store.inbox()
    good = change("c1", 1)
    inbox.apply([Message(b'{"schema_version": 3}', Place("changes", 1, 7)), *messages([good])])
    assert (inbox.tally.invalid, inbox.tally.acted, inbox.tally.received) == (1, 1, 2)
    assert store.rows("SELECT kind, partition, offset FROM anomalies") == [("invalid", 1, 7)]
    assert store.reports == ["invalid: changes[1]@7 is not a SegmentChange"]


def test_an_action_row_says_what_to_send(store: Store) -> None:
    acted = change("c7", 2)
    store.inbox().apply(messages([acted]))
    row = store.rows(
        "SELECT change_id, customer_id, sequence, component, previous_segment, segment, origin, "
        "summary, sent_at FROM actions"
    )
    assert row == [
        (acted.change_id, "c7", 2, "lifecycle", "c1/low/active", "c2/medium/at_risk", "live",
         "change 2", None)
    ]  # fmt: skip


def test_a_state_file_belongs_to_one_group_and_topic(store: Store) -> None:
    Ledger(store.path, OWNER).close()
    with pytest.raises(UserError, match=r"belongs to group email \(not push\): pass another"):
        Ledger(store.path, {**OWNER, "group": "push"})
    with pytest.raises(UserError, match=r"changes_topic changes \(not t2\), group email \(not"):
        Ledger(store.path, {**OWNER, "group": "push", "changes_topic": "t2"})


def test_one_process_per_state_file(store: Store) -> None:
    with (
        _locked(store.path),
        pytest.raises(UserError, match="in use by another subscriber"),
        _locked(store.path),
    ):
        pass
    with _locked(store.path):  # free again
        pass


def test_the_default_state_file_is_per_group_and_topic(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path).renamed("demo-1")
    assert default_state_path(settings, "email/win back") == (
        tmp_path / "subscribers" / "email_win_back@demo-1-segment-changes.sqlite3"
    )


def test_describe_is_one_line_an_operator_can_read() -> None:
    assert describe(change("c9", 2)) == (
        "2026-11-01 02:00 c9 #2 lifecycle: c1/low/active -> c2/medium/at_risk [live] change 2"
    )


def test_a_batch_that_fails_leaves_no_trace(store: Store) -> None:
    stream = [change("c1", s) for s in range(1, 4)]
    inbox = crashing(store.inbox(), 3)
    with pytest.raises(CrashError):
        inbox.apply(messages(stream))
    assert (store.actions(), store.outcomes(), inbox.tally.received) == ([], {}, 0)
    assert store.rows("SELECT * FROM customers") == []


class Coordinator:
    """A consumer whose committed offsets fail with ``errors`` first (a broker just started)."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return [TopicPartition(p.topic, p.partition, 7) for p in partitions]


def test_committed_offsets_wait_for_a_loading_coordinator() -> None:
    consumer = Coordinator(KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    offsets = _committed(consumer, [TopicPartition("changes", 0)])
    assert [(o.partition, o.offset) for o in offsets] == [(0, 7)]
    assert consumer.errors == []


def test_a_group_the_broker_refuses_is_one_error() -> None:
    with pytest.raises(UserError, match="cannot read the group's committed offsets: "):
        _committed(Coordinator(KafkaError.GROUP_AUTHORIZATION_FAILED), [TopicPartition("t", 0)])
