"""The live step, free of Faust: raw message -> decode -> Processor -> outputs.

The Faust agent hands every message to :meth:`LivePipeline.handle`; tests drive it directly with
in-memory sinks. One :class:`Processor` per input partition (each with its own due-time index and
watermark) shares the worker's single model set, because Faust only lets a stream write table keys
of the partition it is iterating, and a customer's events all live in one partition.

Delivery (at-least-once, every duplicate detectable): a change goes into the customer's outbox in
the same state write that records the event's offset, and is then sent; the broker's
acknowledgement empties the outbox on the customer's next update. After a crash, a re-delivered
event is recognised by its offset and the customer's unacknowledged changes are sent again, with
the same change ids and sequence numbers.

Batches (:meth:`LivePipeline.handle_batch`): the agent hands over every message Faust has already
buffered, up to ``batch_max_events``. Each event is processed in order as before, but the state
writes go to a :class:`TableStore` buffer and reach the table once per customer at the end of the
batch, and only then are the batch's changes sent, in processing order. So the order "state with
outbox written, then change sent, then offset acked" holds per batch exactly as it did per event,
with one table write and changelog record per customer per batch instead of one per event.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import orjson

from stream_app.contracts.events import (
    ClickType,
    Component,
    DeadLetter,
    DeadLetterReason,
    Event,
    EventKind,
    MessageOrigin,
    Origin,
    SegmentChange,
    TransactionType,
    dead_letter,
    decode_event,
    encode,
)
from stream_app.core.learning import (
    EXAMPLES_FORMAT,
    EXAMPLES_VERSION,
    CollectedLearning,
    Example,
    ExampleBatch,
    ModelShelf,
    RecordingLearning,
    TrainerProgress,
    example_from_record,
    learn_example,
)
from stream_app.core.models import SegmentModels
from stream_app.core.processor import Position, Processor, Status
from stream_app.live.metrics import Metrics
from stream_app.live.store import (
    AckTracker,
    DeliveryMarker,
    LiveLedger,
    TableStore,
    outbox_sequence,
    partition_of,
)
from stream_app.settings import Settings

log = logging.getLogger(__name__)

DEAD_LETTER_RETRY_MAX_S: Final = 5.0
# A dead letter's Kafka key is the original's, unless that is too big to publish (the letter
# itself then carries the key's start, size and sha256); then it is the key's sha256.
MAX_DEAD_LETTER_KEY_BYTES: Final = 1024
INPUT_STALL_S: Final = 5.0  # unread messages but none handed over: read them from the log
SKIPPED_READ_CHUNK: Final = 2000  # messages read from the log at a time
# Examples per example record: ~184 B each as JSON, so ~184 KB, well under the broker's 1 MB
# (the record is also a state-table value, so a changelog record).
EXAMPLES_PER_RECORD: Final = 1000
YIELD_EVERY: Final = 200  # events processed between two turns given to the event loop
VERSIONS_KEPT_EPOCHS: Final = 32  # shared learning: versions kept behind the slowest partition
# One raw input message: key, value, where it was read, and the token the caller acks.
RawMessage = tuple[bytes | None, bytes | None, MessageOrigin, Any]


# Shared learning's sink: (key, encoded example batch) -> the broker's acknowledgement.
ExamplesSink = Callable[[bytes, bytes], Awaitable["asyncio.Future[Any] | None"]]


class Sinks(Protocol):
    """Where the pipeline's output goes (Faust topics live, lists in tests)."""

    async def change(self, customer_id: str, value: bytes) -> asyncio.Future[Any] | None:
        """Send a change; return the future the broker's acknowledgement completes, or None
        when the sink acknowledges at once."""
        ...

    async def membership(self, customer_id: str, value: bytes) -> None: ...

    async def dead_letter(self, key: bytes | None, value: bytes) -> None: ...

    async def reroute(self, topic: str, key: bytes, value: bytes) -> None:
        """Send a message again to `topic` under `key` (it arrived on the wrong partition)."""
        ...


@dataclass
class WorkerCounts:
    """What this worker has seen since it started (per process), served on ``/counts``."""

    events: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    unsent_dead_letters: int = 0
    rerouted: int = 0
    # Stretches of input Faust never handed over (LivePipeline._fill_skipped), the messages
    # then read from the log, and reads that failed (their acks wait for a restart).
    input_gaps: int = 0
    input_gap_messages: int = 0
    input_gaps_unread: int = 0
    example_batches_sent: int = 0
    model_switches: int = 0
    # Shared learning: events held until the version that scores them was final, and those
    # released after `model_wait_max_s` without it (scored with the newest version at hand).
    model_waits: int = 0
    model_waits_expired: int = 0

    def snapshot(self) -> dict[str, Any]:
        counts: dict[str, Any] = {
            "events": dict(sorted(self.events.items())),
            "dead_letters": dict(sorted(self.dead_letters.items())),
            "unsent_dead_letters": self.unsent_dead_letters,
        }
        if self.rerouted:
            counts["rerouted"] = self.rerouted
        if self.input_gaps:
            counts["input_gaps"] = self.input_gaps
            counts["input_gap_messages"] = self.input_gap_messages
            counts["input_gaps_unread"] = self.input_gaps_unread
        if self.example_batches_sent or self.model_switches:
            counts["example_batches_sent"] = self.example_batches_sent
            counts["model_switches"] = self.model_switches
            counts["model_waits"] = self.model_waits
            counts["model_waits_expired"] = self.model_waits_expired
        return counts


async def _nothing_to_wait_for() -> None:
    """Stores that write synchronously (dicts in tests) are durable once written."""


def membership_record(change: SegmentChange) -> bytes:
    """The compacted `segment-membership` value, a :class:`SegmentMembership` (built without
    validating again: every part comes from a validated change; a test checks the contract)."""
    return orjson.dumps(
        {
            "schema_version": 1,
            "customer_id": change.customer_id,
            "segment": change.current.model_dump(mode="json"),
            "segment_name": change.current.name,
            "sequence": change.sequence,
            "change_id": change.change_id,
            "event_time": change.event_time.isoformat(),
            "origin": change.origin.value,
            "model_version": change.model_version,
        }
    )


@dataclass(order=True)
class _Held:
    order: tuple[float, str]
    arrival: float = field(compare=False)
    item: Any = field(compare=False)


class OrderedMerge:
    """Merges one partition of each input topic into (event time, event id) order.

    The two inputs interleave arbitrarily when consumed; the models learn from every event, so
    the order matters. Like Kafka Streams' timestamp-ordered merge: the earliest buffered event
    goes first, but only once every topic either has a buffered event too, or has nothing more to
    read right now (caught up to its highwater). A topic that is caught up never delays anything,
    so live traffic is not held; a replayed backlog comes out in exactly the offline order. An
    event held longer than ``max_wait_s`` is released anyway (a stalled fetch must not block).
    """

    def __init__(
        self,
        topics: tuple[str, ...],
        partition: int,
        has_more: Callable[[str, int], bool],
        max_wait_s: float,
    ) -> None:
        self.partition = partition
        self.queues: dict[str, deque[_Held]] = {topic: deque() for topic in topics}
        self._has_more = has_more
        self._max_wait_s = max_wait_s
        self._last_arrival: dict[str, float] = {}
        self._started: float | None = None

    def push(self, topic: str, order: tuple[float, str], item: Any, now: float) -> None:
        if self._started is None:
            self._started = now
        self.queues[topic].append(_Held(order, now, item))
        self._last_arrival[topic] = now

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.queues.values())

    def pop_ready(self, now: float) -> list[Any]:
        released: list[Any] = []
        while self.ready_head(now) is not None:
            released.append(self.pop_head().item)
        return released

    def ready_head(self, now: float) -> _Held | None:
        """The next event in order, if it may go now."""
        heads = [queue[0] for queue in self.queues.values() if queue]
        if not heads or self._must_wait(now):
            return None
        return min(heads)

    def pop_head(self) -> _Held:
        head, topic = min((queue[0], topic) for topic, queue in self.queues.items() if queue)
        self.queues[topic].popleft()
        return head

    def _must_wait(self, now: float) -> bool:
        """Wait while a topic with nothing buffered still has unread messages, unless it has
        delivered nothing for `max_wait_s` (stalled)."""
        for topic, queue in self.queues.items():
            if queue or not self._has_more(topic, self.partition):
                continue
            quiet_since = self._last_arrival.get(topic, self._started or now)
            if now - quiet_since < self._max_wait_s:
                return True
        return False


@dataclass(slots=True)
class _Ticket:
    """One admitted message's place in its input partition's ack order."""

    source: tuple[str, int]
    offset: int
    token: Any


@dataclass(slots=True)
class _PartitionAcks:
    next: int  # the lowest offset not handed back yet
    open: Counter[int] = field(default_factory=Counter)  # admitted copies not finished
    finished: dict[int, list[Any]] = field(default_factory=dict)  # tokens waiting for `next`
    # Ranges [start, end) read from the log, by start: an offset in one that was not admitted
    # holds no message.
    read: dict[int, int] = field(default_factory=dict)

    def hand_back(self, done: list[Any]) -> None:
        while True:
            if self.next in self.finished and self.next not in self.open:
                done.extend(self.finished.pop(self.next))
                self.next += 1
            elif self.next in self.open:
                return
            elif (end := self._read_through(self.next)) is not None:
                admitted = [o for o in (*self.open, *self.finished) if self.next < o < end]
                self.next = min(admitted, default=end)  # nothing there up to it
            else:
                return

    def _read_through(self, offset: int) -> int | None:
        """The end of the range read from the log that `offset` lies in, if any."""
        for start, end in list(self.read.items()):
            if end <= offset:
                del self.read[start]  # passed
            elif start <= offset:
                return end
        return None


class OffsetOrderAcks:
    """Hands back the tokens of finished messages in offset order per input partition, and
    never past an offset that was not read.

    Faust commits an offset once the messages before it are acked, but its gap check lets one
    unacked offset through (``Consumer._new_offset``: ``min(acked) - committed > 1``, and no
    check at all while the committed offset is 0); and after dropping records at a rebalance it
    marks what it never delivered as acknowledged (``Consumer._add_gap``). So a token is handed
    back only when every offset from where reading began on its partition up to it is finished,
    or known to hold no message (:meth:`absent`): a message never handed to the worker holds
    the acks after it until the pipeline has read it itself. A copy of an offset read again
    finishes at once if that offset was handed back already (Faust ignores a second ack of an
    offset)."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], _PartitionAcks] = {}

    def begin(self, topic: str, partition: int, offset: int) -> None:
        """Reading of the partition begins at `offset` (its committed offset): nothing after it
        is handed back before it is read and finished."""
        self._parts.setdefault((topic, partition), _PartitionAcks(offset))

    def admit(self, topic: str, partition: int, offset: int, token: Any) -> _Ticket:
        source = (topic, partition)
        part = self._parts.get(source)
        if part is None:
            part = self._parts[source] = _PartitionAcks(offset)  # where reading began
        part.open[offset] += 1
        return _Ticket(source, offset, token)

    def finish(self, ticket: _Ticket, done: list[Any]) -> None:
        part = self._parts.get(ticket.source)
        if part is None:
            return  # revoked since: the next owner reads it again
        part.open[ticket.offset] -= 1
        if part.open[ticket.offset] <= 0:
            del part.open[ticket.offset]
        if ticket.offset < part.next:
            done.append(ticket.token)  # handed back before (this is a copy read again)
            return
        part.finished.setdefault(ticket.offset, []).append(ticket.token)
        part.hand_back(done)

    def absent(self, topic: str, partition: int, start: int, end: int, done: list[Any]) -> None:
        """Offsets [start, end) of the partition were read from the log, and every one not
        admitted holds no message (removed by retention, or a transaction marker): nothing
        waits for those."""
        part = self._parts.get((topic, partition))
        if part is None or end <= max(start, part.next):
            return
        part.read[start] = max(end, part.read.get(start, end))
        part.hand_back(done)

    def held_back(self) -> int:
        """Finished messages whose ack waits for an earlier offset of their partition."""
        return sum(len(t) for part in self._parts.values() for t in part.finished.values())

    def forget(self, partitions: set[int]) -> None:
        """Revoked: what is open there is read again by the partitions' next owner."""
        for source in [s for s in self._parts if s[1] in partitions]:
            del self._parts[source]


@dataclass(slots=True)
class _InputReading:
    """Per input partition read since it was (re)assigned here: the next offset expected, and
    when (on the input clock) a message of it was last read; per assigned partition, when
    Faust resumed reading it (after the rebalance's table recovery)."""

    next_offset: dict[tuple[str, int], int] = field(default_factory=dict)
    read_at: dict[tuple[str, int], float] = field(default_factory=dict)
    began: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Pending:
    event: Event
    key: bytes | None
    payload: bytes
    origin: MessageOrigin
    ticket: _Ticket

    @property
    def token(self) -> Any:
        return self.ticket.token


@dataclass(slots=True)
class _Delivery:
    """What one processed event has to send once its batch's state writes are done: the
    customer's outbox as it was then (changes a previous process may not have delivered) and
    the fresh changes."""

    customer_id: str
    outbox: list[str] | None
    changes: list[SegmentChange]
    now: datetime
    partition: int = 0


@dataclass(slots=True)
class _PartitionDelivery:
    """The live side of a partition's :class:`DeliveryMarker`: batches whose changes still
    await the broker's acknowledgement."""

    marker: DeliveryMarker
    unacked: Counter[int] = field(default_factory=Counter)

    def delivered(self) -> int:
        waiting = [batch for batch, n in self.unacked.items() if n > 0]
        return min(waiting) - 1 if waiting else self.marker.written


class ReadSkipped(Protocol):
    """Reads offsets [start, end) of an input partition from the log itself, for messages Faust
    never handed over. Returns the messages found, in offset order, with tokens the caller acks
    like Faust's, and where the read ended (``end``, or the partition's end if that comes
    first): every other offset before it holds no message. Raises if it could not read the
    range (then nothing of it counts as absent)."""

    async def __call__(
        self, topic: str, partition: int, start: int, end: int
    ) -> tuple[list[RawMessage], int]: ...


class LivePipeline:
    def __init__(
        self,
        settings: Settings,
        store_for_partition: Callable[[int], TableStore],
        sinks: Sinks,
        metrics: Metrics | None = None,
        models: SegmentModels | None = None,
        clock: Callable[[], datetime] | None = None,
        has_more: Callable[[str, int], bool] | None = None,
        as_current: Callable[[Any], AbstractContextManager[Any]] | None = None,
        merge_max_wait_s: float = 1.0,
        partitions: Callable[[str], int] | None = None,
        durable: Callable[[], Awaitable[None]] | None = None,
        examples_sink: ExamplesSink | None = None,
        committed_offset: Callable[[str, int], int | None] | None = None,
        read_skipped: ReadSkipped | None = None,
    ) -> None:
        self.settings = settings
        # Where reading of an input partition began in this assignment (its committed offset),
        # if the caller knows: a first message after it means Faust skipped the ones between,
        # which `read_skipped` reads from the log (without it their acks wait for a restart).
        self._committed_offset = committed_offset or (lambda topic, partition: None)
        self.models = models or SegmentModels(settings.segmentation)
        # Shared learning: examples go to the trainer through this sink (None: in-process).
        self._examples_sink = examples_sink
        # Without a sink there is no trainer to feed: the models learn in process (as the
        # learning objects below do), and nothing waits for versions no one would cut.
        self._shared = settings.learning == "shared" and examples_sink is not None
        # Deterministic mode: how far this worker's own models have learned (each partition's
        # newest batch, and the examples log's offset after the newest acknowledged batch).
        self.progress = TrainerProgress.of(self.models)
        # Offered by the version follower's thread (list.append is atomic), taken at the next
        # batch: (version, pinned).
        self._offered: list[tuple[SegmentModels | None, bool]] = []
        # Shared learning: every version by its epoch boundary; an event waits in its
        # partition's merge until the version that scores it is final (issue 14).
        self._shelf = ModelShelf(self.models, settings.epochs()) if self._shared else None
        self._promised: dict[int, float] = {}  # per partition, the promise the trainer has
        self._waiting: dict[int, float] = {}  # per partition, when its head began to wait
        self._unaligned: dict[int, float] = {}  # partitions that waited too long: no waiting
        self._revoked: set[int] = set()  # revoked by a rebalance, not assigned again yet
        self._assigned: set[int] = set()  # input partitions assigned now (live only)
        # Shared learning, idleness: partitions the trainer was told are idle, those to tell in
        # the next batch, those that got events again (their next record says so), and since
        # when each partition has had nothing unread and nothing held.
        self._idle: set[int] = set()
        self._announce_idle: set[int] = set()
        self._waking: set[int] = set()
        self._quiet_since: dict[int, float] = {}
        self._dropped: set[tuple[str, int]] = set()  # revoked partitions with messages dropped
        self._ack_order = OffsetOrderAcks()
        self._reading = _InputReading()
        self._read_skipped = read_skipped
        self._example_sends: list[tuple[int, int, str]] = []  # (partition, batch, encoded)
        self.metrics = metrics or Metrics()
        self.sinks = sinks
        self.acks = AckTracker()
        self.counts = WorkerCounts()
        self.last_offsets: dict[tuple[str, int], int] = {}
        self._store_for = store_for_partition
        self._clock = clock or (lambda: datetime.now(UTC))
        self.processors: dict[int, Processor] = {}
        self.merges: dict[int, OrderedMerge] = {}
        self._has_more = has_more or (lambda topic, partition: False)
        self._as_current = as_current or (lambda token: nullcontext())
        self._merge_max_wait_s = merge_max_wait_s
        self._partitions = partitions or (lambda topic: settings.partitions)
        self._durable = durable or _nothing_to_wait_for
        self.delivery: dict[int, _PartitionDelivery] = {}
        self._last_token: dict[int, Any] = {}  # per partition, for writes outside a batch
        self._kinds: dict[str, EventKind] = {
            settings.clickstream_topic: "click",
            settings.transactions_topic: "transaction",
        }
        # The batch in progress: deliveries in processing order, and per partition the token of
        # an event processed on it (table writes need one as Faust's current event).
        self._deliveries: list[_Delivery] = []
        self._tokens: dict[int, Any] = {}
        self._stores: dict[int, TableStore] = {}
        self._since_yield = 0
        # Events a batch may still release from the merges: held events released together
        # would make one batch (and one example batch) of any size.
        self._budget = 0
        self._busy_s = 0.0  # time spent processing, excluded from the input clock
        # The agent and the merge timer both process; a batch is processed and delivered whole.
        self._lock = asyncio.Lock()
        m = self.metrics
        self._events_in = {
            kind.value: m.events_in.labels(kind.value) for kind in (*ClickType, *TransactionType)
        }
        self._changes_out = {
            (component.value, origin.value): m.segment_changes.labels(component.value, origin.value)
            for component in Component
            for origin in Origin
        }

    def processor(self, partition: int) -> Processor:
        proc = self.processors.get(partition)
        if proc is None:
            store = self._store_for(partition)
            proc = Processor(
                self.settings.segmentation,
                self.models,
                store,
                ledger=LiveLedger(store, self.acks),
                learning=self._learning(),
            )
            if self._shelf is not None:
                proc.model_at = self._shelf.at
                proc.use_models(self._shelf.newest)
            self.processors[partition] = proc
            learning = proc.learning
            if isinstance(learning, CollectedLearning | RecordingLearning):
                store.keep_examples_of(lambda: learning.examples)
            self._recover(partition, proc, store)
        return proc

    def _learning(self) -> CollectedLearning | RecordingLearning | None:
        if self._examples_sink is None:
            return None  # in-process learning, nothing recorded
        if self._shared:
            return CollectedLearning(self.models)
        return RecordingLearning(self.models)

    def _relearn_pending(self, partition: int, marker: DeliveryMarker) -> None:
        """Deterministic mode, at recovery: example batches durable in the marker but not in
        the restored models (a crash before they reached the examples log) are learned now,
        before any new event, in batch order: the models are again exactly as they were."""
        if self._shared or self._examples_sink is None:
            return
        source = f"p{partition}"
        for _, number, encoded in sorted(marker.examples, key=lambda entry: entry[1]):
            if number > self.progress.sources.get(source, -1):
                for example in ExampleBatch.from_bytes(encoded.encode()).examples:
                    learn_example(self.models, example)
                self.progress.sources[source] = number

    def _recover_examples(
        self,
        partition: int,
        proc: Processor,
        marker: DeliveryMarker,
        batch: int,
        found: list[tuple[float, str, int, dict[str, Any]]],
    ) -> None:
        """A batch whose states were partly durable when the worker died, but not its marker:
        its durable customers' events are duplicates now (never processed again), so their
        examples, stored with their states, go out as records of their own (and are learned
        now, in deterministic mode)."""
        examples = [example_from_record(record) for _, _, _, record in found]
        if not self._shared:
            for example in examples:
                learn_example(self.models, example)
        self._add_records(partition, marker, batch, examples, None, False)
        log.warning(
            "partition %d: batch %d was half written when the worker stopped; %d examples of "
            "its durable states recovered",
            partition,
            batch,
            len(examples),
        )

    async def snapshot_models(self, signing_key: bytes | None) -> bytes:
        """A model record between batches (every durable batch learned, nothing else), with
        how far it has learned, so a restart re-learns exactly what it lacks."""
        async with self._lock:
            self.models.trainer = self.progress.to_params()
            return self.models.snapshot(signing_key)

    def _recover(self, partition: int, proc: Processor, store: TableStore) -> None:
        """A partition (re)assigned: rebuild its due-time index and queue, for sending after this
        batch's states are durable, the outboxes of states written after the last batch known
        delivered (a crash may have cut their sends short)."""
        self._stores[partition] = store
        marker = store.marker()
        newest = marker.written
        now = self._clock()
        due: list[tuple[float, str]] = []
        half_written: list[tuple[float, str, int, dict[str, Any]]] = []
        for state, envelope in store.records():
            if state.due_at is not None:
                due.append((state.due_at, state.customer_id))
            newest = max(newest, envelope.written_batch)
            if envelope.written_batch > marker.written:
                # Durable, but its batch's marker is not: nothing else has these examples.
                for i, example in enumerate(envelope.examples):
                    half_written.append((float(example["at"]), state.customer_id, i, example))
            if not envelope.outbox:
                continue
            if envelope.written_batch > marker.delivered:
                outbox = list(envelope.outbox)
                self._deliveries.append(_Delivery(state.customer_id, outbox, [], now, partition))
            else:  # all delivered: never re-send these entries, and drop them at the next write
                delivered = outbox_sequence(envelope.outbox[-1])
                self.acks.sent[state.customer_id] = delivered
                self.acks.on_ack(state.customer_id, delivered)
        proc.set_due_index(due)
        if self._shelf is not None and marker.max_event_time is not None:
            proc.progress.max_event_time = marker.max_event_time  # what it promised from
        self._relearn_pending(partition, marker)
        for batch, _, encoded in marker.examples:  # the trainer drops those it has learned
            if batch > marker.delivered:
                self._example_sends.append((partition, batch, encoded))
        if half_written:
            self._recover_examples(partition, proc, marker, newest, sorted(half_written))
        # Batches after the newest one seen, so a half-written batch's number is never reused.
        marker.written = newest
        store.batch = newest + 1
        self.delivery[partition] = _PartitionDelivery(marker)
        log.info(
            "partition %d recovered: %d customers due, batches written to %d, delivered to %d",
            partition,
            len(due),
            newest,
            marker.delivered,
        )

    async def seal(self, outputs_flushed: Callable[[], Awaitable[None]]) -> int:
        """At a graceful stop: once every change sent is acknowledged (`outputs_flushed`), mark
        each partition's batches delivered, so the next owner re-sends nothing. Returns how many
        partitions were sealed."""
        async with self._lock:
            await outputs_flushed()
            await asyncio.sleep(0)  # let the acknowledgement callbacks run
            sealed = 0
            for partition, tracker in self.delivery.items():
                store, token = self._stores.get(partition), self._last_token.get(partition)
                if store is None or token is None or tracker.delivered() < tracker.marker.written:
                    continue
                tracker.marker.delivered = tracker.marker.written
                with self._as_current(token):
                    store.flush(tracker.marker)
                sealed += 1
            await self._durable()
            return sealed

    async def revoke(self, partitions: set[int]) -> None:
        """On revocation, from the event loop: let a batch in progress finish (its states
        written, its changes sent) before forgetting the partitions, so a change is never sent
        for a state that was not written. What was read but not processed is not acked, and the
        partitions' next owner reads it again."""
        async with self._lock:
            self.forget_partitions(partitions)
            # Until the rebalance hands them back, messages of these partitions read before it
            # (Faust's generation changes only at the assignment) are not processed: their next
            # owner reads them again. Processing them made a second owner of the partition.
            self._revoked |= partitions
        log.info("partitions %s revoked", sorted(partitions))

    def held(self) -> int:
        """Events read but not processed yet (in the ordered merges: waiting for the other
        topic, or for the version that scores them)."""
        return sum(len(merge) for merge in self.merges.values())

    def assign(self, partitions: set[int]) -> None:
        """On assignment: these partitions are this worker's (again)."""
        self._revoked -= partitions
        self._assigned |= partitions
        self._dropped = {tp for tp in self._dropped if tp[1] not in partitions}
        log.info("partitions %s assigned", sorted(partitions))

    def reading_began(self, at: float | None = None) -> None:
        """Faust resumed the input streams after a rebalance (its table recovery is done): the
        assigned partitions are read from now (``at`` on the input clock; default: now)."""
        since = self.input_clock() if at is None else at
        self._reading.began = dict.fromkeys(self._assigned, since)

    def forget_partitions(self, partitions: set[int]) -> None:
        """On revocation: another worker owns these customers (and their held events) now."""
        self._ack_order.forget(partitions)
        self._assigned -= partitions
        for marks in (self._idle, self._announce_idle, self._waking):
            marks.difference_update(partitions)
        for source in [s for s in self._reading.next_offset if s[1] in partitions]:
            del self._reading.next_offset[source]  # another worker reads on from here
            self._reading.read_at.pop(source, None)
        for partition in partitions:
            self._reading.began.pop(partition, None)
            self.processors.pop(partition, None)
            self._stores.pop(partition, None)
            self.merges.pop(partition, None)
            self._tokens.pop(partition, None)
            self.delivery.pop(partition, None)
            self._last_token.pop(partition, None)
            for waits in (self._promised, self._waiting, self._unaligned, self._quiet_since):
                waits.pop(partition, None)

    async def handle(
        self, key: bytes | None, value: bytes | None, origin: MessageOrigin, token: Any = None
    ) -> list[Any]:
        """Take one raw message; return the tokens of every message now completely processed
        (the caller acks those). Never raises: anything wrong becomes a dead letter."""
        return await self.handle_batch([(key, value, origin, token)])

    async def handle_batch(
        self, messages: Sequence[RawMessage], arrived: Sequence[float] | None = None
    ) -> list[Any]:
        """Take raw messages in consumption order; return the tokens of every message now
        completely processed: its state written and its outputs handed to the producer (the
        caller acks those). Anything wrong with a message becomes a dead letter; only a failing
        state table itself raises (and then nothing of the batch is acked).

        ``arrived``: when each message was read, on :meth:`input_clock` (the ordered merge's
        clock). Timing a message by when its batch got to it would count the time spent on the
        previous batch as silence of the other topic. Without it, the time of processing is
        used."""
        self.metrics.batch_events.observe(len(messages))
        async with self._lock:
            started = time.monotonic()
            try:
                self._switch_models()
                done: list[Any] = []
                self._budget = max(len(messages), self.settings.batch_max_events)
                for i, (key, value, origin, token) in enumerate(messages):
                    at = self.input_clock() if arrived is None else arrived[i]
                    await self._admit(key, value, origin, token, at, done)
                await self._complete()
                return done
            finally:
                self._busy_s += time.monotonic() - started

    async def _notice_idle(self, now: float) -> None:
        """Shared learning: partitions with nothing unread and nothing held for
        `model_idle_after_s` are announced idle in the next batch (one they have seen events
        of), or at once (an assigned partition this worker has read nothing of)."""
        if self._shelf is None or self._examples_sink is None:
            return
        for partition in sorted(set(self.processors) | self._assigned):
            if partition in self._idle or partition in self._announce_idle:
                continue
            merge = self.merges.get(partition)
            topics = self.settings.input_topics
            if (merge is not None and len(merge)) or any(
                self._has_more(topic, partition) for topic in topics
            ):
                self._quiet_since.pop(partition, None)
                continue
            since = self._quiet_since.setdefault(partition, now)
            if now - since < self.settings.model_idle_after_s:
                continue
            token = self._last_token.get(partition)
            if partition in self.processors and token is not None:
                self._announce_idle.add(partition)
                self._tokens[partition] = token  # its marker is written with the record
            elif partition not in self.processors:
                await self._announce_unseen_idle(partition)

    async def _announce_unseen_idle(self, partition: int) -> None:
        """A partition this worker has read nothing of (all of it read before, or empty): an
        idle record under batch 0, which the trainer drops if the source ever sent a batch."""
        assert self._examples_sink is not None
        record = ExampleBatch(source=f"p{partition}", batch=0, examples=[], idle=True)
        await self._examples_sink(record.source.encode(), record.to_bytes())
        self._idle.add(partition)
        log.info("partition %d (none of it read here) is idle: versions do not wait", partition)

    async def _fill_skipped(
        self, topic: str, partition: int, start: int, end: int | None, at: float, done: list[Any]
    ) -> None:
        """Offsets [start, end) of an input partition were never handed to this worker (``end``
        None: Faust stopped delivering a partition with unread messages). Input topics are not
        compacted, so Faust skipped them, and would commit past them: the worker reads them
        from the log itself, in chunks, and processes them before anything after them."""
        self.counts.input_gaps += 1
        log.warning(
            "%s[%d]: offsets from %d%s were never handed to the worker: reading them from the log",
            topic,
            partition,
            start,
            "" if end is None else f" to {end - 1}",
        )
        if self._read_skipped is None:
            return  # their acks wait (OffsetOrderAcks): a restart reads them from the commit
        source = (topic, partition)
        while end is None or start < end:
            want = start + SKIPPED_READ_CHUNK
            try:
                found, stop = await self._read_skipped(
                    topic, partition, start, want if end is None else min(end, want)
                )
            except Exception:
                self.counts.input_gaps_unread += 1
                log.exception(
                    "%s[%d]: could not read offsets from %d: their acks wait, and the next "
                    "rebalance or restart reads them from the committed offset",
                    topic,
                    partition,
                    start,
                )
                return
            for key, value, origin, token in found:
                self._reading.next_offset[source] = origin.offset + 1
                self.counts.input_gap_messages += 1
                await self._accept(key, value, origin, token, at, done)
            self._ack_order.absent(topic, partition, start, stop, done)  # all else: no message
            self._reading.next_offset[source] = max(
                stop, self._reading.next_offset.get(source, stop)
            )
            if end is None or stop <= start:
                return  # a stalled partition: one chunk at a time
            start = stop

    async def _read_stalled(self, now: float, done: list[Any]) -> None:
        """Input partitions with unread messages that got none for INPUT_STALL_S: Faust
        stopped handing them over (or never began: seen with a partition's only message);
        read what follows from the log."""
        if self._read_skipped is None:
            return
        await self._read_never_handed_over(now, done)
        for (topic, partition), next_read in list(self._reading.next_offset.items()):
            if partition in self._revoked or not self._has_more(topic, partition):
                continue
            if now - self._reading.read_at.get((topic, partition), now) < INPUT_STALL_S:
                continue
            self._reading.read_at[(topic, partition)] = now
            await self._fill_skipped(topic, partition, next_read, None, now, done)

    async def _read_never_handed_over(self, now: float, done: list[Any]) -> None:
        """Assigned input partitions of which nothing was read INPUT_STALL_S after reading
        began (`reading_began`): reading begins at the committed offset, as Faust's would
        have. Until then nothing is known to be read of them, so what is before that offset is
        marked read (the lag and `has_more` count from there, not from the partition's start)."""
        for partition in sorted(self._assigned - self._revoked):
            if now - self._reading.began.get(partition, now) < INPUT_STALL_S:
                continue
            for topic in self.settings.input_topics:
                source = (topic, partition)
                if source in self._reading.next_offset:
                    continue
                start = self._committed_offset(topic, partition) or 0
                self._ack_order.begin(topic, partition, start)
                self._reading.next_offset[source] = start
                self._reading.read_at[source] = now
                if start > 0:
                    self.last_offsets.setdefault(source, start - 1)
                if self._has_more(topic, partition):
                    await self._fill_skipped(topic, partition, start, None, now, done)

    def idle_partitions(self) -> list[int]:
        return sorted(self._idle)

    async def flush_idle(self) -> list[Any]:
        """Release events held longer than the merge's wait bound (called from a timer)."""
        async with self._lock:
            started = time.monotonic()
            try:
                self._switch_models()  # an idle worker follows a new version too
                done: list[Any] = []
                now = self.input_clock()
                await self._notice_idle(now)
                self._budget = self.settings.batch_max_events
                await self._read_stalled(now, done)
                while True:  # in batches of at most batch_max_events
                    self._budget = self.settings.batch_max_events
                    for merge in list(self.merges.values()):
                        await self._release(merge, done, now)
                    await self._complete()
                    if self._budget > 0:
                        return done
            finally:
                self._busy_s += time.monotonic() - started

    def input_clock(self) -> float:
        """The ordered merge's clock: monotonic time that stands still while this pipeline
        processes. A topic is stalled after ``merge_max_wait_s`` of *waiting for input* without
        a message from it; time spent processing a batch is not silence on its part (counting
        it released held events too early, and the events read next were late)."""
        return time.monotonic() - self._busy_s

    async def _admit(
        self,
        key: bytes | None,
        value: bytes | None,
        origin: MessageOrigin,
        token: Any,
        arrived: float,
        done: list[Any],
    ) -> None:
        if origin.partition in self._revoked:
            # Read before a rebalance took the partition: its next owner reads it again.
            if (origin.topic, origin.partition) not in self._dropped:
                self._dropped.add((origin.topic, origin.partition))
                log.info(
                    "%s[%d] is revoked: not processing what was read of it",
                    origin.topic,
                    origin.partition,
                )
            return
        source = (origin.topic, origin.partition)
        expected = self._reading.next_offset.get(source)
        if expected is None:  # the first message of this assignment: reading began here
            expected = self._committed_offset(origin.topic, origin.partition)
            if expected is None:
                expected = origin.offset  # (not known: trust the first one)
            self._ack_order.begin(origin.topic, origin.partition, expected)
        self._reading.read_at[source] = arrived
        if origin.offset < expected:
            # A copy of a message this assignment has read already (and processed, or holds):
            # its ack waits for the original's.
            ticket = self._ack_order.admit(origin.topic, origin.partition, origin.offset, token)
            self._ack_order.finish(ticket, done)
            return
        if origin.offset > expected:
            await self._fill_skipped(
                origin.topic, origin.partition, expected, origin.offset, arrived, done
            )
        self._reading.next_offset[source] = origin.offset + 1
        await self._accept(key, value, origin, token, arrived, done)

    async def _accept(
        self,
        key: bytes | None,
        value: bytes | None,
        origin: MessageOrigin,
        token: Any,
        arrived: float,
        done: list[Any],
    ) -> None:
        """Take a message read in order: decode it, then process it or hold it in the ordered
        merge (anything wrong with it becomes a dead letter)."""
        self.last_offsets[(origin.topic, origin.partition)] = origin.offset
        ticket = self._ack_order.admit(origin.topic, origin.partition, origin.offset, token)
        self._quiet_since.pop(origin.partition, None)
        if origin.partition in self._idle:
            # Tell the trainer in this very batch (its marker is written with this event).
            self._idle.discard(origin.partition)
            self._waking.add(origin.partition)
            self._tokens[origin.partition] = token
            self._last_token[origin.partition] = token
        # A tombstone (None) is not an event; it dead-letters as empty, invalid JSON.
        payload = value if isinstance(value, bytes) else b""
        try:
            decoded = decode_event(
                payload,
                self._kinds[origin.topic],
                origin,
                key=key,
                max_bytes=self.settings.max_event_bytes,
            )
        except Exception as exc:
            await self._failed(key, payload, origin, exc)
            self._ack_order.finish(ticket, done)
            return
        if isinstance(decoded, DeadLetter):
            await self._reject(key, decoded)
            self._ack_order.finish(ticket, done)
            return
        partitions = self._partitions(origin.topic)
        owner = 0 if partitions == 1 else partition_of(decoded.customer_id, partitions)
        if owner != origin.partition:
            # Keyed by something else (e.g. a session id): the customer's state lives on another
            # partition. Re-key it like Faust's group_by would, and let that partition process it.
            await self.sinks.reroute(origin.topic, decoded.customer_id.encode(), payload)
            self.counts.rerouted += 1
            self.metrics.rerouted.inc()
            self._ack_order.finish(ticket, done)
            return
        merge = self._merge(origin.partition)
        order = (decoded.event_time.timestamp(), decoded.event_id)
        merge.push(origin.topic, order, _Pending(decoded, key, payload, origin, ticket), arrived)
        await self._release(merge, done, arrived)

    def _merge(self, partition: int) -> OrderedMerge:
        merge = self.merges.get(partition)
        if merge is None:
            merge = self.merges[partition] = OrderedMerge(
                self.settings.input_topics, partition, self._has_more, self._merge_max_wait_s
            )
        return merge

    async def _release(self, merge: OrderedMerge, done: list[Any], now: float) -> None:
        while self._budget > 0 and (head := merge.ready_head(now)) is not None:
            if self._shelf is not None:
                # Table reads and writes pick the partition's store by Faust's current event.
                with self._as_current(head.item.token):
                    if not self._may_score(merge.partition, head, now):
                        return
            merge.pop_head()
            self._budget -= 1
            pending = head.item
            with self._as_current(pending.token):
                await self._process(pending)
            self._ack_order.finish(pending.ticket, done)
            self._since_yield += 1
            if self._since_yield >= YIELD_EVERY:
                # A batch takes ~0.1 s per 500 events: let the producer's sender, the fetcher
                # and the web server run in between (nothing else can touch the pipeline: lock).
                self._since_yield = 0
                await asyncio.sleep(0)

    def _may_score(self, partition: int, head: _Held, now: float) -> bool:
        """Shared learning: may the partition's next event (`head`) be scored now? Its time
        becomes the partition's clock, and the time-driven work before it fires as far as the
        versions that score it are final; the event itself waits until its own version is (at
        most `model_wait_max_s`). While it waits, the partition's promise goes to the trainer
        with the batch, so the versions it waits for get cut."""
        shelf, proc, t = self._shelf, self.processor(partition), head.order[0]
        assert shelf is not None
        if t < proc.watermark or proc.is_future(t, self._clock().timestamp()):
            return True  # late or far in the future: refused without scoring, clock unmoved
        proc.declare(t)
        fired = proc.advance(min(proc.watermark, shelf.scoreable_until()))
        self._tokens[partition] = head.item.token
        self._last_token[partition] = head.item.token
        if fired:
            self._deliveries.append(_Delivery("", None, fired, self._clock(), partition))
        if shelf.ready(t) and proc.promise >= proc.watermark:
            self._waiting.pop(partition, None)
            if self._unaligned.pop(partition, None) is not None:
                log.info("partition %d: scoring with final versions again", partition)
            return True
        if partition not in self._unaligned:
            since = self._waiting.setdefault(partition, now)
            if since == now:
                self.counts.model_waits += 1
            if now - since < self.settings.model_wait_max_s:
                return False
            self._waiting.pop(partition, None)
            self._unaligned[partition] = t
            log.warning(
                "partition %d: the version for %s was not final after %.0f s (is the trainer "
                "running, does every partition get events?); scoring with the newest at hand "
                "until it is (segments may then differ from a run with another number of "
                "workers; counted in model_waits_expired)",
                partition,
                datetime.fromtimestamp(t, UTC).isoformat(),
                self.settings.model_wait_max_s,
            )
        self.counts.model_waits_expired += 1
        fired = proc.advance(proc.watermark)
        if fired:
            self._deliveries.append(_Delivery("", None, fired, self._clock(), partition))
        return True

    async def _process(self, pending: _Pending) -> None:
        started = time.perf_counter()
        decoded, key, origin = pending.event, pending.key, pending.origin
        partition = origin.partition
        processor = self.processor(partition)
        self._tokens[partition] = pending.token  # any event of the partition will do
        self._last_token[partition] = pending.token
        learning = processor.learning
        collected = len(learning.examples) if isinstance(learning, CollectedLearning) else 0
        # (Deterministic mode keeps a failed event's examples: its models learned them.)
        try:
            self._events_in[decoded.event_type.value].inc()
            self.counts.events[decoded.event_type.value] += 1
            now = self._clock()
            outcome = processor.process(
                decoded, processed_at=now, position=Position(origin.topic, origin.offset)
            )
            if outcome.status in (Status.LATE, Status.FUTURE):
                await self._reject(key, self._refused(pending, outcome.status, now))
                return
            if outcome.status is Status.DUPLICATE:
                self.metrics.duplicates.inc()
            envelope = self._stores[partition].delivery(decoded.customer_id)
            if outcome.changes or (envelope is not None and envelope.outbox):
                outbox = None if envelope is None else list(envelope.outbox)
                self._deliveries.append(
                    _Delivery(decoded.customer_id, outbox, outcome.changes, now, partition)
                )
        except Exception as exc:
            buffered = self._stores.get(origin.partition)
            if buffered is not None:
                buffered.discard_cached()  # a state may be half-updated in memory
            if isinstance(processor.learning, CollectedLearning):
                del processor.learning.examples[collected:]  # nothing learned from a failure
            await self._failed(key, pending.payload, origin, exc)
        finally:
            self.metrics.processing_seconds.observe(time.perf_counter() - started)

    def _refused(self, pending: _Pending, status: Status, now: datetime) -> DeadLetter:
        event, s = pending.event, self.settings.segmentation
        if status is Status.LATE:
            reason = DeadLetterReason.LATE_EVENT
            detail = (
                f"event_time {event.event_time.isoformat()} is before the watermark "
                f"(allowed lateness {s.allowed_lateness_seconds:.0f}s)"
            )
        else:
            reason = DeadLetterReason.FUTURE_EVENT
            detail = (
                f"event_time {event.event_time.isoformat()} is more than "
                f"{s.max_future_skew_seconds:.0f}s ahead of the worker's clock ({now.isoformat()})"
            )
        return dead_letter(pending.payload, reason, detail, pending.origin, pending.key)

    async def _complete(self) -> None:
        """End of a batch: write the buffered states (one write per customer) with each
        partition's delivery marker, wait until the broker has acknowledged those writes, and
        only then send the batch's changes in processing order. A change therefore never leaves
        before the state that records it (and its sequence number) is durable: after any crash
        the event is recognised as applied and the outbox re-sends the very same bytes."""
        for partition, token in self._tokens.items():
            store = self._stores.get(partition)
            if store is not None and (store.dirty or self._has_news(partition)):
                tracker = self.delivery[partition]
                tracker.marker.delivered = tracker.delivered()  # before this batch counts
                tracker.marker.written = store.batch
                processor = self.processors.get(partition)
                if self._shelf is not None and processor is not None:
                    clock = processor.progress.max_event_time
                    tracker.marker.max_event_time = None if clock == -math.inf else clock
                self._collect_examples(partition, tracker.marker)
                with self._as_current(token):
                    store.flush(tracker.marker)
                store.batch += 1
        self._tokens.clear()
        await self._durable()
        sends, self._example_sends = self._example_sends, []
        for partition, batch, encoded in sends:
            await self._send_examples(partition, batch, encoded)
        deliveries, self._deliveries = self._deliveries, []
        for delivery in deliveries:
            await self._deliver(delivery)

    def _has_news(self, partition: int) -> bool:
        """Anything for the partition's marker besides states: examples, a new promise or
        clock, idleness. (A partition whose next event waits for its version is visited every
        0.1 s, and wrote a marker each time.)"""
        processor = self.processors.get(partition)
        if processor is None:
            return False
        learning = processor.learning
        if isinstance(learning, CollectedLearning | RecordingLearning) and learning.examples:
            return True
        if partition in self._announce_idle or partition in self._waking:
            return True
        if self._shelf is None:
            return False
        promise = processor.promise
        if promise != -math.inf and promise > self._promised.get(partition, -math.inf):
            return True
        clock = processor.progress.max_event_time
        return (None if clock == -math.inf else clock) != self.delivery[
            partition
        ].marker.max_event_time

    def _collect_examples(self, partition: int, marker: DeliveryMarker) -> None:
        """Shared learning: the batch's examples of this partition join its marker (written
        with the batch's states, so they survive a crash) and are sent once those are durable;
        entries of batches known delivered are dropped from the marker."""
        processor = self.processors.get(partition)
        learning = None if processor is None else processor.learning
        if not isinstance(learning, CollectedLearning | RecordingLearning):
            return
        marker.examples = [entry for entry in marker.examples if entry[0] > marker.delivered]
        examples = learning.drain()
        promise = None
        if self._shelf is not None and processor is not None:
            promise = processor.promise
            if promise == -math.inf or promise <= self._promised.get(partition, -math.inf):
                promise = None  # nothing new to promise
        idle = partition in self._announce_idle
        waking = partition in self._waking
        if examples or promise is not None or idle or waking:
            if promise is not None:
                self._promised[partition] = promise
            self._announce_idle.discard(partition)
            self._waking.discard(partition)
            if idle and not examples:
                self._idle.add(partition)
                log.info("partition %d is idle: versions no longer wait for it", partition)
            idle_now = partition in self._idle
            self._add_records(partition, marker, marker.written, examples, promise, idle_now)

    def _add_records(
        self,
        partition: int,
        marker: DeliveryMarker,
        batch: int,
        examples: list[Example],
        promise: float | None,
        idle: bool,
    ) -> None:
        """The examples as records of bounded size, numbered on from the marker's newest, kept
        in the marker until `batch` is delivered and sent once its states are durable. (A
        watermark jump can fire thousands of due checks in one batch; one record of them would
        exceed the broker's 1 MB.) The promise and idleness go with the last record."""
        source = f"p{partition}"
        step = EXAMPLES_PER_RECORD
        parts = [examples[i : i + step] for i in range(0, len(examples), step)] or [[]]
        for i, part in enumerate(parts):
            marker.records += 1
            last = i == len(parts) - 1
            record = ExampleBatch.model_construct(
                format=EXAMPLES_FORMAT,
                version=EXAMPLES_VERSION,
                source=source,
                batch=marker.records,
                examples=part,
                promise=promise if last else None,
                idle=idle if last else False,
            )
            encoded = record.to_bytes().decode()
            marker.examples.append((batch, marker.records, encoded))
            self._example_sends.append((partition, batch, encoded))
        if not self._shared:
            self.progress.sources[source] = marker.records

    async def _send_examples(self, partition: int, batch: int, encoded: str) -> None:
        assert self._examples_sink is not None
        acked = await self._examples_sink(f"p{partition}".encode(), encoded.encode())
        self.counts.example_batches_sent += 1
        tracker = self.delivery.get(partition)
        if not isinstance(acked, asyncio.Future) or tracker is None:
            return
        tracker.unacked[batch] += 1

        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                log.error(
                    "example batch p%d#%d was not acknowledged by the broker", partition, batch
                )
                return  # the batch stays undelivered: after a restart it is sent again
            tracker.unacked[batch] -= 1
            if tracker.unacked[batch] <= 0:
                del tracker.unacked[batch]
            offset = getattr(fut.result(), "offset", None)  # Kafka's RecordMetadata
            if isinstance(offset, int) and offset >= self.progress.next_offset:
                self.progress.next_offset = offset + 1  # where a restart re-learns from

        acked.add_done_callback(done)

    def offer_models(self, models: SegmentModels | None, pinned: bool = False) -> None:
        """A model record to score with from the next batch on (any thread may call): with
        shared learning every version the trainer publishes, in order; `pinned`: score with
        this one alone, until ``offer_models(None)`` unpins."""
        self._offered.append((models, pinned))

    def _switch_models(self) -> None:
        offered, self._offered = self._offered[:], []
        if not offered:
            return
        shelf = self._shelf
        for models, pinned in offered:
            if shelf is None:
                self.models = models or self.models
            elif pinned or models is None:
                shelf.pinned = models
            else:
                shelf.offer(models)
        if shelf is not None:
            self.models = shelf.newest
            self._forget_old_versions(shelf)
        for processor in self.processors.values():
            processor.use_models(self.models)  # shared: `model_at` picks per event from here
        self.counts.model_switches += 1

    def _forget_old_versions(self, shelf: ModelShelf) -> None:
        # The promise, not the watermark: due work held behind the watermark (its versions were
        # not final yet) still fires, and is scored with the version of its own time.
        clocks = [proc.promise for proc in self.processors.values()]
        if clocks and min(clocks) > -math.inf:
            # With a margin: a partition handed back by a rebalance may be a little behind.
            shelf.forget_before(min(clocks) - VERSIONS_KEPT_EPOCHS * shelf.epochs.epoch_s)

    async def _failed(
        self, key: bytes | None, payload: bytes, origin: MessageOrigin, exc: Exception
    ) -> None:
        log.exception(
            "processing failed at %s[%s]@%s", origin.topic, origin.partition, origin.offset
        )
        detail = f"{type(exc).__name__}: {exc}"
        letter = dead_letter(payload, DeadLetterReason.PROCESSING_ERROR, detail, origin, key)
        await self._reject(key, letter)

    async def _deliver(self, delivery: _Delivery) -> None:
        """Send, in sequence order, what this process has not sent yet: first changes left in the
        customer's outbox by a previous process (possibly undelivered), then the fresh ones."""
        changes = delivery.changes
        if delivery.outbox:
            fresh = {change.change_id for change in changes}
            sent = self.acks.sent.get(delivery.customer_id, 0)
            for entry in delivery.outbox:
                head = orjson.loads(entry)
                if head["sequence"] > sent and head["change_id"] not in fresh:
                    self.metrics.resent_changes.inc()
                    # Sent again as the very bytes stored, never re-encoded.
                    change = SegmentChange.model_validate_json(entry)
                    await self._send(change, delivery.partition, entry.encode())
        for change in changes:
            if change.sequence > self.acks.sent.get(change.customer_id, 0):
                await self._send(change, delivery.partition)
                if change.origin is Origin.LIVE:
                    latency = (delivery.now - change.event_time).total_seconds()
                    self.metrics.event_to_emit_seconds.observe(max(latency, 0.0))

    async def _send(
        self, change: SegmentChange, partition: int, value: bytes | None = None
    ) -> None:
        customer = change.customer_id
        acked = await self.sinks.change(customer, encode(change) if value is None else value)
        self.acks.sent[customer] = change.sequence
        sequence = change.sequence
        tracker = self.delivery.get(partition)
        batch = 0 if tracker is None else tracker.marker.written
        if isinstance(acked, asyncio.Future):
            if tracker is not None:
                tracker.unacked[batch] += 1
            acked.add_done_callback(
                lambda fut: self._acked(fut, customer, sequence, tracker, batch)
            )
        else:
            self.acks.on_ack(customer, sequence)
        await self.sinks.membership(customer, membership_record(change))
        self._changes_out[(change.component.value, change.origin.value)].inc()

    def _acked(
        self,
        fut: asyncio.Future[Any],
        customer: str,
        sequence: int,
        tracker: _PartitionDelivery | None,
        batch: int,
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            # The batch stays undelivered: after a restart its outboxes are sent again.
            log.error("segment change %s#%d was not acknowledged by the broker", customer, sequence)
            return
        self.acks.on_ack(customer, sequence)
        if tracker is not None:
            tracker.unacked[batch] -= 1
            if tracker.unacked[batch] <= 0:
                del tracker.unacked[batch]

    async def _reject(self, key: bytes | None, letter: DeadLetter) -> None:
        self.metrics.dead_letters.labels(letter.reason.value).inc()
        log.info(
            "dead letter %s from %s[%s]@%s: %s",
            letter.reason.value,
            letter.source_topic,
            letter.source_partition,
            letter.source_offset,
            letter.detail[:200],
        )
        self.counts.dead_letters[letter.reason.value] += 1
        value = encode(letter)
        if key is not None and len(key) > MAX_DEAD_LETTER_KEY_BYTES:
            key = hashlib.sha256(key).hexdigest().encode()  # the letter carries its start
        wait = 0.1
        while True:
            # Nothing is acked that was neither applied nor dead-lettered: keep trying (the
            # batch, and so its acks, waits), and say so once per attempt with growing pauses.
            try:
                await self.sinks.dead_letter(key, value)
                return
            except Exception:
                self.counts.unsent_dead_letters += 1
                log.exception(
                    "could not send a dead letter for %s; retrying in %.1fs",
                    letter.source_topic,
                    wait,
                )
            await asyncio.sleep(wait)
            wait = min(wait * 2, DEAD_LETTER_RETRY_MAX_S)

    def update_quality_metrics(self) -> None:
        for name, model in (("purchase", self.models.purchase), ("churn", self.models.churn)):
            quality = model.quality()
            for metric in ("roc_auc", "log_loss", "ece"):
                if quality[metric] is not None:
                    self.metrics.model_quality.labels(name, metric).set(quality[metric])
