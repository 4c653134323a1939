"""Customer state as the live worker stores it: the domain's record inside a delivery envelope.

A stored value is ``{"format": ..., "version": 2, ...the customer state..., "delivery":
{"offsets": ..., "outbox": [...], "written_batch": n}}``: the domain state (``core.state``) plus
what only the live layer needs to deliver exactly what it recorded, never anything else:
* ``offsets``: the last applied offset per input topic, so a message re-delivered after a crash
  is recognised and not applied twice;
* ``outbox``: the customer's changes not known to be acknowledged by the broker, sent again as
  the very bytes stored after a crash;
* ``written_batch``: the partition's batch that wrote this record (see :class:`DeliveryMarker`).

:class:`TableStore` is the Processor's StateStore over the Faust table (a dict in tests), and
:class:`LiveLedger` the Processor's Ledger over the same envelopes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import orjson
from aiokafka.partitioner import murmur2

from stream_app.contracts.events import SegmentChange, encode
from stream_app.core.learning import Example, example_record
from stream_app.core.processor import Position
from stream_app.core.state import STATE_FORMAT, STATE_VERSION, CustomerState, read_record

log = logging.getLogger(__name__)

OUTBOX_LIMIT: Final = 256
DELIVERY_KEY_PREFIX: Final = b"\x00delivery:"  # not a customer id: ids are validated text
STATE_CACHE_SIZE: Final = 20_000


@dataclass(slots=True)
class Delivery:
    """The live layer's envelope around one customer's state."""

    offsets: dict[str, int] = field(default_factory=dict)
    outbox: list[str] = field(default_factory=list)
    written_batch: int = 0
    # What the models learn from this customer's processing in `written_batch` (example
    # fields, `core.learning.example_record`): written with the state, so after a crash that
    # left the state durable but not its batch's marker, the examples are not lost.
    examples: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_record(cls, r: dict[str, Any] | None) -> Delivery:
        if not r:
            return cls()
        return cls(
            offsets=dict(r.get("offsets", {})),
            outbox=list(r.get("outbox", [])),
            written_batch=int(r.get("written_batch", 0)),
            examples=list(r.get("examples", [])),
        )


def encode_record(state: CustomerState, delivery: Delivery) -> bytes:
    envelope: dict[str, Any] = {
        "offsets": delivery.offsets,
        "outbox": delivery.outbox,
        "written_batch": delivery.written_batch,
    }
    if delivery.examples:
        envelope["examples"] = delivery.examples
    return orjson.dumps(
        {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            **state.to_record(),
            "delivery": envelope,
        }
    )


def decode_record(raw: bytes) -> tuple[CustomerState, Delivery]:
    """A stored value -> state and envelope; version 1 records are migrated, others refused
    (:class:`stream_app.core.state.StateRecordError`)."""
    state, rest = read_record(orjson.loads(raw))
    migrated_v1 = "format" not in rest  # version 1 kept these fields beside the state
    return state, Delivery.from_record(rest if migrated_v1 else rest.get("delivery"))


def outbox_sequence(entry: str) -> int:
    sequence: int = orjson.loads(entry)["sequence"]
    return sequence


class Acknowledgements(Protocol):
    limit: int

    def acknowledged(self, customer_id: str) -> int: ...


def partition_of(customer_id: str, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives a key: Java, aiokafka, Faust and
    our confluent-kafka producers (partitioner=murmur2_random) all agree on it."""
    return int(murmur2(customer_id.encode()) & 0x7FFFFFFF) % partitions


@dataclass(slots=True)
class DeliveryMarker:
    """Per partition, stored in the state table beside its customers (so it moves with the
    partition): the newest batch whose states were written, and the newest batch all of whose
    changes the broker has acknowledged. After a crash only the outboxes of states written after
    `delivered` are sent again, instead of every customer's last changes."""

    written: int = 0
    delivered: int = 0
    # Example records (batch, record number, encoded ExampleBatch) of batches written but not
    # known delivered, sent again after a crash; the trainer drops repeats by record number.
    # Each is stored under its own table key (:meth:`TableStore.flush`), the marker holds only
    # their numbers: a batch's examples may be split into many records of bounded size.
    examples: list[tuple[int, int, str]] = field(default_factory=list)
    # The newest example record number this partition has used (numbers only grow, across
    # owners: they are the trainer's duplicate check).
    records: int = 0
    # Shared learning: the partition's clock (newest event time accepted, or declared) as of
    # `written`. The trainer holds the partition to the promises sent with those batches, so a
    # new owner must not accept, as on time, events its previous owner had made late.
    max_event_time: float | None = None

    def to_bytes(self) -> bytes:
        record: dict[str, Any] = {
            "written": self.written,
            "delivered": self.delivered,
            "records": self.records,
            "example_records": [[batch, number] for batch, number, _ in self.examples],
        }
        if self.max_event_time is not None:
            record["max_event_time"] = self.max_event_time
        return orjson.dumps(record)

    @classmethod
    def from_bytes(
        cls, raw: bytes | None, load: Callable[[int], bytes | None] = lambda number: None
    ) -> DeliveryMarker:
        """`load(number)`: the stored example record of that number (None if absent)."""
        if raw is None:
            return cls()
        v = orjson.loads(raw)
        written = int(v["written"])
        # Markers written before example records had numbers of their own kept them inline,
        # numbered by their batch.
        examples = [(int(batch), int(batch), str(value)) for batch, value in v.get("examples", [])]
        for batch, number in v.get("example_records", []):
            stored = load(int(number))
            if stored is None:
                log.error("example record %d of the delivery marker is missing", number)
                continue
            examples.append((int(batch), int(number), stored.decode()))
        newest = max((number for _, number, _ in examples), default=0)
        clock = v.get("max_event_time")
        return cls(
            written=written,
            delivered=int(v["delivered"]),
            examples=examples,
            records=max(int(v.get("records", written)), newest),
            max_event_time=None if clock is None else float(clock),
        )


class TableStore:
    """A Processor's StateStore over a table of raw bytes (the Faust table live, a dict in tests),
    restricted to one partition's customers, keeping each customer's delivery envelope beside
    their state.

    * ``put`` serialises at once (so the buffered bytes are exactly the state the processor
      finished with, with its envelope as the ledger left it) but writes the table only in
      :meth:`flush`: one write, so one RocksDB put and one changelog record, per customer per
      batch, then the partition's :class:`DeliveryMarker`.
    * The states the processor finished with stay in memory (up to ``cache_size``), so a
      customer's next event needs no table read and no decoding. Only this worker writes its
      partitions' keys, so the cache cannot go stale; it is dropped with the partition.
    * After a failed update, :meth:`discard_cached` forgets the in-memory objects (the processor
      may have half-mutated one); the next read decodes the last buffered or stored bytes.

    Table writes must happen while an event of this partition is Faust's current event: Faust
    sends the changelog record (and picks the RocksDB instance) by its partition.
    """

    def __init__(
        self,
        table: MutableMapping[bytes, bytes],
        partition: int,
        partitions: int,
        cache_size: int = STATE_CACHE_SIZE,
    ) -> None:
        self.table = table
        self.partition = partition
        self.partitions = partitions
        self.cache_size = cache_size
        self._cache: dict[str, tuple[CustomerState, Delivery]] = {}
        self._pending: dict[str, bytes | None] = {}  # None: delete
        self.batch = 1  # stamped on every state written until the next flush
        self._marker_key = DELIVERY_KEY_PREFIX + str(partition).encode()
        self._working: dict[str, Delivery] = {}  # envelopes filled for the coming put
        self._stored_records: set[int] = set()  # example records under their own keys
        # The examples the models are given, in order (the partition's Learning), and how many
        # of them earlier puts of this batch took: each put takes the rest (the processor
        # learns from a customer just before it puts their state).
        self._produced: Callable[[], list[Example]] | None = None
        self._taken = 0

    def _load(self, customer_id: str) -> tuple[CustomerState, Delivery] | None:
        cached = self._cache.get(customer_id)
        if cached is not None:
            return cached
        if customer_id in self._pending:
            raw = self._pending[customer_id]
        else:
            raw = self.table.get(customer_id.encode())
        if raw is None:
            return None
        loaded = decode_record(raw)
        self._remember(customer_id, loaded)
        return loaded

    def get(self, customer_id: str) -> CustomerState | None:
        loaded = self._load(customer_id)
        return None if loaded is None else loaded[0]

    def delivery(self, customer_id: str) -> Delivery | None:
        """The customer's envelope (None if nothing is stored for them)."""
        envelope = self._working.get(customer_id)
        if envelope is not None:
            return envelope
        loaded = self._load(customer_id)
        return None if loaded is None else loaded[1]

    def delivery_for(self, customer_id: str) -> Delivery:
        """The envelope the ledger fills for a state about to be written; the coming
        :meth:`put` stores it (a new one for a new customer)."""
        envelope = self._working.get(customer_id)
        if envelope is None:
            loaded = self._load(customer_id)
            envelope = Delivery() if loaded is None else loaded[1]
            self._working[customer_id] = envelope
        return envelope

    def keep_examples_of(self, produced: Callable[[], list[Example]]) -> None:
        """Store with each customer's state the examples learned from them in its batch."""
        self._produced = produced

    def put(self, state: CustomerState) -> None:
        customer = state.customer_id
        envelope = self._working.pop(customer, None) or self.delivery_for(customer)
        self._working.pop(customer, None)
        if self._produced is not None:
            produced = self._produced()
            start = min(self._taken, len(produced))
            if envelope.written_batch == self.batch:  # written before in this batch: add
                envelope.examples.extend(example_record(e) for e in produced[start:])
            else:
                envelope.examples = [example_record(e) for e in produced[start:]]
            self._taken = len(produced)
        envelope.written_batch = self.batch
        self._pending[customer] = encode_record(state, envelope)
        self._remember(customer, (state, envelope))

    def delete(self, customer_id: str) -> None:
        self._pending[customer_id] = None
        self._cache.pop(customer_id, None)
        self._working.pop(customer_id, None)

    def marker(self) -> DeliveryMarker:
        marker = DeliveryMarker.from_bytes(
            self.table.get(self._marker_key), lambda n: self.table.get(self._record_key(n))
        )
        self._stored_records = {number for _, number, _ in marker.examples}
        return marker

    def _record_key(self, number: int) -> bytes:
        return b"%s%d/examples/%d" % (DELIVERY_KEY_PREFIX, self.partition, number)

    def _remember(self, customer_id: str, loaded: tuple[CustomerState, Delivery]) -> None:
        cache = self._cache
        cache.pop(customer_id, None)
        cache[customer_id] = loaded
        if len(cache) > self.cache_size:
            del cache[next(iter(cache))]

    @property
    def dirty(self) -> int:
        return len(self._pending)

    def flush(self, marker: DeliveryMarker | None = None) -> int:
        """Write every buffered state to the table, then the partition's delivery marker;
        returns how many customer keys were written."""
        pending, self._pending = self._pending, {}
        table = self.table
        for customer_id, raw in pending.items():
            if raw is None:
                table.pop(customer_id.encode(), None)
            else:
                table[customer_id.encode()] = raw
        if marker is not None:
            self._write_example_records(marker)
            table[self._marker_key] = marker.to_bytes()
        self._taken = 0  # the batch's examples were taken into its records
        return len(pending)

    def _write_example_records(self, marker: DeliveryMarker) -> None:
        """Each example record the marker keeps under its own key (a table value, so one
        changelog record, of bounded size), written once; those it no longer keeps deleted."""
        kept: set[int] = set()
        for _, number, encoded in marker.examples:
            kept.add(number)
            if number not in self._stored_records:
                self.table[self._record_key(number)] = encoded.encode()
        for number in self._stored_records - kept:
            self.table.pop(self._record_key(number), None)
        self._stored_records = kept

    def discard_cached(self) -> None:
        self._cache.clear()
        self._working.clear()

    def records(self) -> Iterator[tuple[CustomerState, Delivery]]:
        """Every stored customer of this partition with their envelope (recovery scans it)."""
        seen: set[str] = set()
        for key in list(self.table.keys()):
            if key.startswith(DELIVERY_KEY_PREFIX):
                continue
            customer = key.decode()
            if partition_of(customer, self.partitions) == self.partition:
                seen.add(customer)
                loaded = self._load(customer)
                if loaded is not None:
                    yield loaded
        for customer in [c for c in self._pending if c not in seen]:
            loaded = self._load(customer)
            if loaded is not None:
                yield loaded

    def __iter__(self) -> Iterator[CustomerState]:
        return (state for state, _ in self.records())


class LiveLedger:
    """The Processor's Ledger over a :class:`TableStore`'s envelopes: applied offsets, and the
    outbox trimmed to the changes the broker has not acknowledged (up to ``OUTBOX_LIMIT``)."""

    def __init__(self, store: TableStore, acks: Acknowledgements) -> None:
        self.store = store
        self.acks = acks

    def applied(self, customer_id: str, position: Position) -> bool:
        envelope = self.store.delivery(customer_id)
        return envelope is not None and envelope.offsets.get(position.topic, -1) >= position.offset

    def record(
        self, customer_id: str, changes: list[SegmentChange], position: Position | None
    ) -> None:
        envelope = self.store.delivery_for(customer_id)
        acked = self.acks.acknowledged(customer_id)
        kept = [entry for entry in envelope.outbox if outbox_sequence(entry) > acked]
        kept.extend(encode(change).decode() for change in changes)
        envelope.outbox = kept[-self.acks.limit :]
        if position is not None:
            envelope.offsets[position.topic] = position.offset


class AckTracker:
    """Per-customer sequence numbers sent and acknowledged by this process (not persisted)."""

    limit = OUTBOX_LIMIT

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.acked: dict[str, int] = {}

    def acknowledged(self, customer_id: str) -> int:
        return self.acked.get(customer_id, 0)

    def on_ack(self, customer_id: str, sequence: int) -> None:
        if sequence > self.acked.get(customer_id, 0):
            self.acked[customer_id] = sequence
