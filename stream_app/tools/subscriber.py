"""The reference subscriber for email/push systems: act on every segment change exactly once.

What a downstream system must do, and this does (docs/integration-guide.md explains why):

1. **Bootstrap** once, from the compacted `segment-membership` topic read to its end: each
   customer's current segment and the ``sequence`` of the change that set it.
2. **Follow** `segment-changes`, every partition, from the committed offsets (from the
   beginning for a new group: a change whose ``sequence`` is not above the customer's known one
   is already reflected, and is skipped).
3. **Dedupe and act in one transaction** (a transactional inbox): each batch records every
   change id it saw and queues the actions (rows of the ``actions`` table, what an email or push
   sender reads) in one SQLite transaction. Only once that has committed is the Kafka offset
   committed (``enable.auto.commit`` is off). A crash anywhere repeats nothing and loses nothing:
   a batch not committed in SQLite comes again and is applied then; one committed in SQLite but
   not in Kafka comes again and every change in it is a repeat.
4. **Never act on** ``origin: replay`` (backfill), unless asked to.
5. **Report** per customer a gap (the sequence jumps by more than one: an earlier change is on
   its way or lost), a repeat (a change id seen before: a re-delivery, ignored) and a fork (one
   change id with two contents, or one customer and sequence with two change ids: an error our
   delivery guarantees rule out).

One process per state file: it reads every partition itself (no consumer-group rebalance to wait
for after a crash), and a lock beside the file refuses a second process.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import ValidationError

from stream_app.contracts.events import Origin, SegmentChange, SegmentMembership, encode
from stream_app.errors import UserError
from stream_app.kafka.topics import _LibrdkafkaLog, require_topics
from stream_app.settings import Settings

BATCH_SIZE: Final = 500  # changes per SQLite transaction and offset commit
POLL_S: Final = 0.5  # longest wait for one batch (how quickly a stop request is seen)
METADATA_TIMEOUT_S: Final = 10.0
BOOTSTRAP_TIMEOUT_S: Final = 120.0
COORDINATOR_WAIT_S: Final = 30.0
COORDINATOR_NOT_READY: Final = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError._TIMED_OUT,
    }
)


class Outcome(StrEnum):
    """What the subscriber did with one change it read."""

    ACTED = "acted"  # new and of interest: an action was queued
    NOT_OF_INTEREST = "not_of_interest"  # new, but no entry into a chosen segment
    REPLAY_IGNORED = "replay_ignored"  # new, but origin replay (backfill): never act on it
    SUPERSEDED = "superseded"  # its sequence is not above the customer's known one
    REPEAT = "repeat"  # this change id was seen before, with the same content
    FORK = "fork"  # contradicts what was seen: an error, nothing recorded


RECORDED: Final = frozenset(
    {Outcome.ACTED, Outcome.NOT_OF_INTEREST, Outcome.REPLAY_IGNORED, Outcome.SUPERSEDED}
)


@dataclass(frozen=True)
class Interest:
    """Which changes trigger an action: entries into these lifecycle stages / tiers / clusters
    (every change when none is given). Backfill (origin replay) only with ``include_replay``."""

    lifecycle: frozenset[str] = frozenset()
    propensity_tiers: frozenset[str] = frozenset()
    clusters: frozenset[int] = frozenset()
    include_replay: bool = False

    def matches(self, change: SegmentChange) -> bool:
        if change.origin is Origin.REPLAY and not self.include_replay:
            return False
        cur, prev = change.current, change.previous
        entered_stage = cur.lifecycle.value in self.lifecycle and (
            prev is None or prev.lifecycle is not cur.lifecycle
        )
        entered_tier = cur.propensity_tier.value in self.propensity_tiers and (
            prev is None or prev.propensity_tier is not cur.propensity_tier
        )
        entered_cluster = cur.cluster in self.clusters and (
            prev is None or prev.cluster != cur.cluster
        )
        no_filter = not (self.lifecycle or self.propensity_tiers or self.clusters)
        return no_filter or entered_stage or entered_tier or entered_cluster


# ---------------------------------------------------------------------------------------------
# The decision for one change: pure, from what the store knows when it arrives.


@dataclass(frozen=True)
class Arrival:
    """The parts of a change the dedupe looks at; ``digest`` identifies its whole content."""

    change_id: str
    customer_id: str
    sequence: int
    digest: str

    @classmethod
    def of(cls, change: SegmentChange) -> Arrival:
        digest = hashlib.sha256(encode(change)).hexdigest()
        return cls(change.change_id, change.customer_id, change.sequence, digest)


@dataclass(frozen=True)
class Known:
    """What the store knew about a change's id and its customer before the change arrived."""

    digest_of_id: str | None  # the content recorded under this change id
    id_at_sequence: str | None  # the change id recorded for this customer and sequence
    last_sequence: int  # the customer's highest known sequence, 0 when unknown


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    missing: int = 0  # changes skipped between the customer's known sequence and this one
    detail: str = ""  # for a fork: what it contradicts

    @property
    def is_gap(self) -> bool:
        return self.missing > 0


def judge(arrival: Arrival, known: Known, wanted: Callable[[], Outcome]) -> Verdict:
    """Repeat, fork, superseded, or new (then ``wanted`` says acted, replay or not of interest).

    A gap is a new change more than one above the customer's known sequence. A customer seen for
    the first time may start above 1 (its earlier changes predate the topic's retention, or a
    warm start numbered its history without publishing it): that is no gap.
    """
    if known.digest_of_id is not None:
        if known.digest_of_id == arrival.digest:
            return Verdict(Outcome.REPEAT)
        return Verdict(Outcome.FORK, detail=f"change {arrival.change_id} came with other content")
    if known.id_at_sequence is not None and known.id_at_sequence != arrival.change_id:
        return Verdict(
            Outcome.FORK,
            detail=f"#{arrival.sequence} of customer {arrival.customer_id} was already "
            f"change {known.id_at_sequence}",
        )
    if arrival.sequence <= known.last_sequence:
        return Verdict(Outcome.SUPERSEDED)
    missing = arrival.sequence - known.last_sequence - 1 if known.last_sequence else 0
    return Verdict(wanted(), missing=missing)


def wanted_outcome(interest: Interest, change: SegmentChange) -> Outcome:
    """For a new change: act, or why not."""
    if change.origin is Origin.REPLAY and not interest.include_replay:
        return Outcome.REPLAY_IGNORED
    return Outcome.ACTED if interest.matches(change) else Outcome.NOT_OF_INTEREST


# ---------------------------------------------------------------------------------------------
# The durable store: one SQLite file.

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS customers (
    customer_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL, change_id TEXT NOT NULL,
    segment_name TEXT NOT NULL, source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen_changes (
    change_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, sequence INTEGER NOT NULL,
    digest TEXT NOT NULL, outcome TEXT NOT NULL, topic TEXT NOT NULL,
    partition INTEGER NOT NULL, offset INTEGER NOT NULL, seen_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS seen_by_sequence ON seen_changes (customer_id, sequence);
CREATE TABLE IF NOT EXISTS actions (
    change_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, sequence INTEGER NOT NULL,
    component TEXT NOT NULL, previous_segment TEXT, segment TEXT NOT NULL,
    origin TEXT NOT NULL, event_time TEXT NOT NULL, summary TEXT NOT NULL,
    queued_at TEXT NOT NULL, sent_at TEXT);
CREATE TABLE IF NOT EXISTS anomalies (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, customer_id TEXT, sequence INTEGER,
    change_id TEXT, detail TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
    offset INTEGER NOT NULL, seen_at TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Place:
    """Where a message was read."""

    topic: str
    partition: int
    offset: int


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Ledger:
    """The subscriber's durable state: dedupe, known sequences, queued actions, anomalies.

    ``owner`` (group and topics) is written when the file is created and checked on every open,
    so a state file is never reused for another group or other topics by mistake.
    """

    def __init__(self, path: Path | str, owner: dict[str, str]) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed transaction survives power loss
        self.db.executescript(SCHEMA)
        self._claim(path, owner)

    def _claim(self, path: Path | str, owner: dict[str, str]) -> None:
        with self.transaction():
            for key, value in owner.items():
                self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
        mine = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        other = sorted(k for k in owner if mine[k] != owner[k])
        if other:
            found = ", ".join(f"{k} {mine[k]} (not {owner[k]})" for k in other)
            raise UserError(f"state file {path} belongs to {found}: pass another --state")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    @property
    def bootstrapped(self) -> bool:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'bootstrapped_at'").fetchone()
        return row is not None

    def mark_bootstrapped(self) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('bootstrapped_at', ?)", (_now(),))

    def remember_member(self, member: SegmentMembership) -> None:
        """The customer's sequence as of this membership record, if above what is known."""
        self._advance(
            member.customer_id, member.sequence, member.change_id, member.segment_name, "membership"
        )

    def _advance(
        self, customer: str, sequence: int, change_id: str, segment: str, source: str
    ) -> None:
        self.db.execute(
            "INSERT INTO customers VALUES (?, ?, ?, ?, ?) ON CONFLICT (customer_id) DO UPDATE "
            "SET sequence = excluded.sequence, change_id = excluded.change_id, "
            "segment_name = excluded.segment_name, source = excluded.source "
            "WHERE excluded.sequence > customers.sequence",
            (customer, sequence, change_id, segment, source),
        )

    def known(self, arrival: Arrival) -> Known:
        by_id = self.db.execute(
            "SELECT digest FROM seen_changes WHERE change_id = ?", (arrival.change_id,)
        ).fetchone()
        at_sequence = self.db.execute(
            "SELECT change_id FROM seen_changes WHERE customer_id = ? AND sequence = ? "
            "UNION SELECT change_id FROM customers WHERE customer_id = ? AND sequence = ? "
            "LIMIT 1",
            (arrival.customer_id, arrival.sequence) * 2,
        ).fetchone()
        last = self.db.execute(
            "SELECT sequence FROM customers WHERE customer_id = ?", (arrival.customer_id,)
        ).fetchone()
        return Known(
            digest_of_id=by_id[0] if by_id else None,
            id_at_sequence=at_sequence[0] if at_sequence else None,
            last_sequence=last[0] if last else 0,
        )

    def record(
        self, change: SegmentChange, arrival: Arrival, outcome: Outcome, place: Place
    ) -> None:
        """Remember the change as seen, advance its customer, and queue its action if any."""
        self.db.execute(
            "INSERT INTO seen_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                arrival.change_id,
                arrival.customer_id,
                arrival.sequence,
                arrival.digest,
                outcome.value,
                place.topic,
                place.partition,
                place.offset,
                _now(),
            ),
        )
        self._advance(
            change.customer_id, change.sequence, change.change_id, change.current.name, "change"
        )
        if outcome is Outcome.ACTED:
            self._queue_action(change)

    def _queue_action(self, change: SegmentChange) -> None:
        self.db.execute(
            "INSERT INTO actions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (
                change.change_id,
                change.customer_id,
                change.sequence,
                change.component.value,
                change.previous.name if change.previous else None,
                change.current.name,
                change.origin.value,
                change.event_time.isoformat(),
                change.reason.summary,
                _now(),
            ),
        )

    def note(self, kind: str, detail: str, place: Place, arrival: Arrival | None = None) -> None:
        """An anomaly (gap, fork, invalid value) for an operator to look at later."""
        self.db.execute(
            "INSERT INTO anomalies (kind, customer_id, sequence, change_id, detail, topic, "
            "partition, offset, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                kind,
                arrival.customer_id if arrival else None,
                arrival.sequence if arrival else None,
                arrival.change_id if arrival else None,
                detail,
                place.topic,
                place.partition,
                place.offset,
                _now(),
            ),
        )


# ---------------------------------------------------------------------------------------------
# Applying batches of messages.


@dataclass
class Tally:
    """What one run did (the summary line); the state file holds the whole history."""

    received: int = 0
    outcomes: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    gaps: int = 0
    invalid: int = 0
    bootstrapped_customers: int | None = None  # records read; None: bootstrapped before

    @property
    def acted(self) -> int:
        return self.outcomes[Outcome.ACTED]

    @property
    def repeats(self) -> int:
        return self.outcomes[Outcome.REPEAT]

    @property
    def forks(self) -> int:
        return self.outcomes[Outcome.FORK]

    def summary(self) -> str:
        count = self.outcomes
        boot = (
            "bootstrap: already done"
            if self.bootstrapped_customers is None
            else f"bootstrap: {self.bootstrapped_customers} membership records"
        )
        return (
            f"done: {self.received} changes read, {self.acted} acted on, "
            f"{self.repeats} repeats ignored, {count[Outcome.SUPERSEDED]} already reflected, "
            f"{count[Outcome.REPLAY_IGNORED]} replay ignored, "
            f"{count[Outcome.NOT_OF_INTEREST]} not of interest, {self.gaps} gaps, "
            f"{self.forks} forks, {self.invalid} invalid; {boot}"
        )


@dataclass(frozen=True)
class Message:
    """One message as read from Kafka: its value and where it was."""

    value: bytes | None
    place: Place


Report = Callable[[str], None]
Act = Callable[[SegmentChange], None]


class Inbox:
    """Applies batches of messages to the ledger, one SQLite transaction per batch."""

    def __init__(self, ledger: Ledger, interest: Interest, report: Report) -> None:
        self.ledger, self.interest, self.report = ledger, interest, report
        self.tally = Tally()

    def apply(self, batch: Sequence[Message]) -> list[SegmentChange]:
        """Apply ``batch`` in one transaction; the changes acted on (once it has committed)."""
        acted: list[SegmentChange] = []
        reports: list[str] = []
        before = copy.deepcopy(self.tally)
        try:
            with self.ledger.transaction():
                for message in batch:
                    change = self._take(message, reports)
                    if change is not None:
                        acted.append(change)
        except BaseException:
            self.tally = before  # nothing of the batch happened
            raise
        for line in reports:
            self.report(line)
        return acted

    def _take(self, message: Message, reports: list[str]) -> SegmentChange | None:
        self.tally.received += 1
        try:
            change = SegmentChange.model_validate_json(message.value or b"")
        except ValidationError as exc:
            self._invalid(message.place, f"not a SegmentChange: {exc.error_count()} errors")
            reports.append(f"invalid: {_where(message.place)} is not a SegmentChange")
            return None
        arrival = Arrival.of(change)
        verdict = judge(
            arrival, self.ledger.known(arrival), lambda: wanted_outcome(self.interest, change)
        )
        self.tally.outcomes[verdict.outcome] += 1
        self._note(verdict, arrival, message.place, reports)
        if verdict.outcome in RECORDED:
            self.ledger.record(change, arrival, verdict.outcome, message.place)
        return change if verdict.outcome is Outcome.ACTED else None

    def _invalid(self, place: Place, detail: str) -> None:
        self.tally.invalid += 1
        self.ledger.note("invalid", detail, place)

    def _note(self, verdict: Verdict, arrival: Arrival, place: Place, reports: list[str]) -> None:
        who = f"customer {arrival.customer_id} #{arrival.sequence}"
        if verdict.outcome is Outcome.REPEAT:
            reports.append(f"repeat: {who} change {arrival.change_id} again (ignored)")
        elif verdict.outcome is Outcome.FORK:
            self.ledger.note("fork", verdict.detail, place, arrival)
            reports.append(f"FORK: {who}: {verdict.detail} at {_where(place)}")
        if verdict.is_gap:
            self.tally.gaps += 1
            detail = f"{verdict.missing} earlier change(s) missing (on their way, or lost)"
            self.ledger.note("gap", detail, place, arrival)
            reports.append(f"gap: {who}: {detail}")


def _where(place: Place) -> str:
    return f"{place.topic}[{place.partition}]@{place.offset}"


# ---------------------------------------------------------------------------------------------
# Kafka: the membership bootstrap and the change stream.


def _consumer(settings: Settings, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,  # the offset is committed after the SQLite commit
            "auto.offset.reset": "earliest",
            "log.connection.close": False,
        },
        logger=_LibrdkafkaLog(),  # a lost broker is not a line on stderr every 50 ms
    )


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    try:
        metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
    except KafkaException as exc:
        raise UserError(f"cannot read topic {topic}: {exc.args[0].str()}") from None
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise UserError(f"topic {topic} does not exist (stream-app topics create)")
    return sorted(found.partitions)


def _message(msg: Any) -> Message:
    return Message(msg.value(), Place(msg.topic(), msg.partition(), msg.offset()))


def bootstrap(settings: Settings, ledger: Ledger, group: str, report: Report = print) -> int:
    """Read `segment-membership` to its end into the ledger; the number of records read.

    Marked done in the last transaction: a crash before that bootstraps again (harmless, no
    change was acted on yet). Done only once, because a membership record newer than the changes
    followed so far must not hide those changes.
    """
    consumer = _consumer(settings, f"{group}-bootstrap")  # never commits
    topic = settings.segment_membership_topic
    try:
        ends = _ends(consumer, topic)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        read = _read_members(consumer, ledger, topic, ends, report)
    finally:
        consumer.close()
    with ledger.transaction():
        ledger.mark_bootstrapped()
    return read


def _ends(consumer: Consumer, topic: str) -> dict[int, int]:
    """Each partition's high watermark now: the end the bootstrap reads to."""
    ends = {}
    for partition in _partitions(consumer, topic):
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_S
        )
        if high > low:
            ends[partition] = high
    return ends


def _read_members(
    consumer: Consumer, ledger: Ledger, topic: str, ends: dict[int, int], report: Report
) -> int:
    read, deadline = 0, time.monotonic() + BOOTSTRAP_TIMEOUT_S
    pending = dict(ends)
    while pending:
        if time.monotonic() > deadline:
            raise UserError(f"bootstrap did not reach the end of {topic}: {pending}")
        batch = [_message(m) for m in consumer.consume(BATCH_SIZE, POLL_S) if m.error() is None]
        with ledger.transaction():
            read += sum(_remember(ledger, message, report) for message in batch)
        positions = consumer.position([TopicPartition(topic, p) for p in pending])
        for position in positions:
            if position.offset >= pending[position.partition]:
                del pending[position.partition]
    return read


def _remember(ledger: Ledger, message: Message, report: Report) -> bool:
    """One membership record into the ledger; False for a tombstone or an invalid value."""
    if message.value is None:  # a tombstone: the customer was removed
        return False
    try:
        member = SegmentMembership.model_validate_json(message.value)
    except ValidationError:
        report(f"invalid: {_where(message.place)} is not a SegmentMembership (skipped)")
        return False
    ledger.remember_member(member)
    return True


def _follow_from_committed(consumer: Consumer, topic: str) -> None:
    """Assign every partition of ``topic`` at the group's committed offset (or its start)."""
    partitions = [TopicPartition(topic, p) for p in _partitions(consumer, topic)]
    committed = _committed(consumer, partitions)
    consumer.assign(
        [
            TopicPartition(topic, c.partition, c.offset if c.offset >= 0 else OFFSET_BEGINNING)
            for c in committed
        ]
    )


def _committed(consumer: Consumer, partitions: list[TopicPartition]) -> list[TopicPartition]:
    """The group's committed offsets, retried while the broker's group coordinator is still
    loading (a fresh broker answers NOT_COORDINATOR for a few seconds)."""
    deadline = time.monotonic() + COORDINATOR_WAIT_S
    while True:
        try:
            return list(consumer.committed(partitions, timeout=METADATA_TIMEOUT_S))
        except KafkaException as exc:
            error = exc.args[0]
            retriable = error.retriable() or error.code() in COORDINATOR_NOT_READY
            if not retriable or time.monotonic() > deadline:
                raise UserError(
                    f"cannot read the group's committed offsets: {error.str()}"
                ) from None
            time.sleep(0.5)


def _commit_after(consumer: Consumer, batch: Sequence[Message], report: Report) -> None:
    """Commit the offsets past ``batch`` (after its SQLite transaction has committed)."""
    last: dict[tuple[str, int], int] = {}
    for message in batch:
        last[(message.place.topic, message.place.partition)] = message.place.offset
    offsets = [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as exc:  # the next batch commits past these too; a crash repeats them
        report(f"offset commit failed (its changes come again, as repeats): {exc.args[0].str()}")


@dataclass(frozen=True)
class Options:
    """How a run follows the changes: when it stops, where its reports go, its batch size."""

    idle_timeout_s: float | None = 10.0  # None: follow until ``stop`` says so
    stop: Callable[[], bool] = lambda: False
    report: Report = print
    batch_size: int = BATCH_SIZE


def default_state_path(settings: Settings, group: str) -> Path:
    """``<state_dir>/subscribers/<group>@<changes topic>.sqlite3``: one file per group and
    topic, so a demo with topics of its own never meets another run's dedupe."""
    group_part, topic_part = (
        re.sub(r"[^A-Za-z0-9._-]", "_", name) for name in (group, settings.segment_changes_topic)
    )
    return settings.state_dir / "subscribers" / f"{group_part}@{topic_part}.sqlite3"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the state file: one subscriber process per file."""
    lock_path = path.with_name(path.name + ".lock")
    handle: IO[str] = lock_path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"state file {path} is in use by another subscriber") from None
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def run_subscriber(
    settings: Settings,
    group: str,
    interest: Interest,
    act: Act,
    *,
    state_path: Path | None = None,
    idle_timeout_s: float | None = 10.0,
    stop: Callable[[], bool] = lambda: False,
    report: Report = print,
    batch_size: int = BATCH_SIZE,
) -> Tally:
    """Bootstrap (once), then follow the changes until idle for ``idle_timeout_s`` (or ``stop``).

    ``act`` is called for each change acted on, after the transaction that queued its action
    has committed: for display. The action of record is the row in the ``actions`` table.
    """
    path = state_path or default_state_path(settings, group)
    options = Options(idle_timeout_s, stop, report, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        ledger = Ledger(path, _owner(settings, group))
        try:
            return _run(settings, group, interest, act, ledger, options)
        finally:
            ledger.close()


def _owner(settings: Settings, group: str) -> dict[str, str]:
    return {
        "group": group,
        "changes_topic": settings.segment_changes_topic,
        "membership_topic": settings.segment_membership_topic,
    }


def _run(
    settings: Settings, group: str, interest: Interest, act: Act, ledger: Ledger, options: Options
) -> Tally:
    require_topics(
        settings, [settings.segment_changes_topic, settings.segment_membership_topic]
    )  # the broker answers and has them, or one clear error
    inbox = Inbox(ledger, interest, options.report)
    if not ledger.bootstrapped:
        inbox.tally.bootstrapped_customers = bootstrap(settings, ledger, group, options.report)
    consumer = _consumer(settings, group)
    try:
        _follow_from_committed(consumer, settings.segment_changes_topic)
        _follow(consumer, inbox, act, options)
    finally:
        consumer.close()
    return inbox.tally


def _follow(consumer: Consumer, inbox: Inbox, act: Act, options: Options) -> None:
    idle_since = time.monotonic()
    while not options.stop():
        polled = consumer.consume(options.batch_size, POLL_S)
        batch = [_message(m) for m in polled if m.error() is None]
        if not batch:
            idle = time.monotonic() - idle_since
            if options.idle_timeout_s is not None and idle >= options.idle_timeout_s:
                return
            continue
        acted = inbox.apply(batch)
        for change in acted:
            act(change)
        _commit_after(consumer, batch, options.report)
        idle_since = time.monotonic()


def describe(change: SegmentChange) -> str:
    before = change.previous.name if change.previous else "-"
    return (
        f"{change.event_time:%Y-%m-%d %H:%M} {change.customer_id} #{change.sequence} "
        f"{change.component.value}: {before} -> {change.current.name} "
        f"[{change.origin.value}] {change.reason.summary}"
    )
