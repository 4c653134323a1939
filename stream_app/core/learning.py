"""Learning as a stream: what the models learn from, as records, and the trainer that learns them.

The processor never decides *where* learning happens; it hands every learning moment to a
:class:`Learning`:

* :class:`InProcessLearning` learns at once, in processing order (the offline replay, bootstrap,
  and a live worker's deterministic mode). This is exactly what the processor did before
  learning became a stream, so an offline replay stays byte-identical.
* :class:`CollectedLearning` scores with the model version it is given and only *collects* the
  examples; the live layer publishes them, batch by batch, once the batch's customer states are
  durable, and one :class:`Trainer` learns them, in order, for every worker.

An example is a cluster observation (the cluster features at an event, float64, exact) or a
matured propensity label (the snapshot's packed float32 features, the outcome, and the score
predicted back then). Examples travel in :class:`ExampleBatch` records identified by
(source, batch): a source's batch numbers only grow (the live layer never reuses a number, see
``live.pipeline``), so the trainer drops a batch sent twice by its high-water mark per source,
and a version records the input offset it has learned up to: after any crash nothing is learned
twice or lost.
"""

from __future__ import annotations

import base64
import bisect
import heapq
import math
import operator
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field

from stream_app.contracts.model_record import TrainerParams
from stream_app.core.features import FEATURES
from stream_app.core.models import CLUSTER_FEATURES, SegmentModels

_CLUSTER_PACK: Final = struct.Struct(f"<{len(CLUSTER_FEATURES)}d")
_LABEL_PACK: Final = struct.Struct(f"<{len(FEATURES)}f")
_LABEL_PACK_V1: Final = struct.Struct(f"<{len(FEATURES) - 1}f")  # before the gap input existed
EXAMPLES_FORMAT: Final = "stream_app.examples"
# 2: a batch says how far its source has got (`promise`); 3: and whether it is idle.
EXAMPLES_VERSION: Final = 3
EXAMPLES_VERSIONS_READ: Final = (1, 2, 3)


class ExampleKind(StrEnum):
    CLUSTER = "cluster"
    PURCHASE = "purchase"
    CHURN = "churn"


class Example(BaseModel):
    """One thing a model learns from. `features`: base64 of little-endian floats, float64 in
    CLUSTER_FEATURES order for a cluster observation, float32 in FEATURES order for a label."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ExampleKind
    at: float  # event time: of the observation, or of the snapshot a label belongs to
    features: str
    outcome: bool | None = None
    predicted: float | None = Field(None, ge=0, le=1)

    def cluster_features(self) -> dict[str, float]:
        values = _CLUSTER_PACK.unpack(base64.b64decode(self.features, validate=True))
        return dict(zip(CLUSTER_FEATURES, values, strict=True))

    def label_features(self) -> dict[str, float]:
        return unpack_label(self.features)


class ExampleBatch(BaseModel):
    """The examples one processing batch of one source (an input partition) produced."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = EXAMPLES_FORMAT
    version: int = EXAMPLES_VERSION
    source: str = Field(min_length=1, max_length=200)
    batch: int = Field(ge=0)
    examples: list[Example]
    # Shared learning: the source sends no example with an event time (`learned_at`) below this
    # any more (its watermark, or less while time-driven work below it waits for a version).
    promise: float | None = Field(None, allow_inf_nan=False)
    # The source has nothing unread and nothing held (Flink's idleness): versions stop waiting
    # for it until it sends a batch that is not idle. Its examples that then come after a
    # version closed past them are late (dropped, counted).
    idle: bool = False

    def to_bytes(self) -> bytes:
        record: dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "source": self.source,
            "batch": self.batch,
            "examples": [example_record(e) for e in self.examples],
            "promise": self.promise,
        }
        if self.idle:
            record["idle"] = True
        return orjson.dumps(record)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ExampleBatch:
        batch = cls.model_validate_json(raw)
        if batch.format != EXAMPLES_FORMAT or batch.version not in EXAMPLES_VERSIONS_READ:
            raise ValueError(f"not an examples record this version reads: {batch.format}")
        return batch


_CLUSTER_VALUES: Final = operator.itemgetter(*CLUSTER_FEATURES)


def cluster_example(x: dict[str, float], at: float) -> Example:
    """Built on the per-event path from values the processor computed: not validated again
    (a test checks it equals the validated construction; the trainer validates what it reads)."""
    packed = base64.b64encode(_CLUSTER_PACK.pack(*_CLUSTER_VALUES(x))).decode()
    return Example.model_construct(
        kind=ExampleKind.CLUSTER, at=at, features=packed, outcome=None, predicted=None
    )


def example_record(e: Example) -> dict[str, Any]:
    """An example as JSON-ready fields (in example records, and in a customer's state)."""
    return {
        "kind": e.kind.value,
        "at": e.at,
        "features": e.features,
        "outcome": e.outcome,
        "predicted": e.predicted,
    }


def example_from_record(r: dict[str, Any]) -> Example:
    """An example this worker stored itself (trusted: not validated again)."""
    return Example.model_construct(
        kind=ExampleKind(r["kind"]),
        at=float(r["at"]),
        features=str(r["features"]),
        outcome=r.get("outcome"),
        predicted=r.get("predicted"),
    )


def label_example(
    kind: ExampleKind, packed: str, at: float, outcome: bool, predicted: float
) -> Example:
    """A matured label; `packed` is the snapshot's own packed float32 features."""
    return Example.model_construct(
        kind=kind, at=at, features=packed, outcome=outcome, predicted=predicted
    )


class Learning(Protocol):
    """Where the processor's learning moments go; `models` is the set that scores."""

    models: SegmentModels

    def observe(self, x: dict[str, float], at: float) -> int:
        """A cluster observation at event time `at`; returns the customer's closest cluster."""
        ...

    def label(
        self, kind: ExampleKind, packed: str, at: float, outcome: bool, predicted: float
    ) -> None:
        """A propensity label matured (snapshot at `at`, features as packed in the snapshot)."""
        ...


class InProcessLearning:
    """Learn at once, in processing order: one model set scores and learns."""

    def __init__(self, models: SegmentModels) -> None:
        self.models = models

    def observe(self, x: dict[str, float], at: float) -> int:
        return self.models.clusters.learn_assign(x, at)

    def label(
        self, kind: ExampleKind, packed: str, at: float, outcome: bool, predicted: float
    ) -> None:
        model = self.models.purchase if kind is ExampleKind.PURCHASE else self.models.churn
        model.learn(unpack_label(packed), outcome, predicted)


class RecordingLearning(InProcessLearning):
    """Learn at once (deterministic mode) and also record what was learned: the live layer
    makes the records durable, so a restarted worker can re-learn, in the same order, what its
    newest snapshot lacks (issue 14: crash loops used to lose the learning for good)."""

    def __init__(self, models: SegmentModels) -> None:
        super().__init__(models)
        self.examples: list[Example] = []

    def observe(self, x: dict[str, float], at: float) -> int:
        self.examples.append(cluster_example(x, at))
        return super().observe(x, at)

    def label(
        self, kind: ExampleKind, packed: str, at: float, outcome: bool, predicted: float
    ) -> None:
        self.examples.append(label_example(kind, packed, at, outcome, predicted))
        super().label(kind, packed, at, outcome, predicted)

    def drain(self) -> list[Example]:
        out, self.examples = self.examples, []
        return out


@dataclass(slots=True)
class CollectedLearning:
    """Score with a model version, learn nothing here: collect the examples for the trainer."""

    models: SegmentModels
    examples: list[Example] = field(default_factory=list)

    def observe(self, x: dict[str, float], at: float) -> int:
        self.examples.append(cluster_example(x, at))
        return self.models.clusters.assign(x)

    def label(
        self, kind: ExampleKind, packed: str, at: float, outcome: bool, predicted: float
    ) -> None:
        self.examples.append(label_example(kind, packed, at, outcome, predicted))

    def drain(self) -> list[Example]:
        out, self.examples = self.examples, []
        return out


def unpack_label(packed: str) -> dict[str, float]:
    """A label snapshot's packed float32 features; a snapshot stored before
    `days_between_last_events` existed has one input fewer."""
    raw = base64.b64decode(packed, validate=True)
    if len(raw) == _LABEL_PACK_V1.size:
        old = dict(zip(FEATURES[:-1], _LABEL_PACK_V1.unpack(raw), strict=True))
        # Its `days_since_last_event` was the gap an event ended (most snapshots are at events).
        return {**old, "days_between_last_events": old["days_since_last_event"]}
    return dict(zip(FEATURES, _LABEL_PACK.unpack(raw), strict=True))


def learn_example(models: SegmentModels, example: Example) -> None:
    """What a trainer does with one example: the same calls InProcessLearning makes."""
    if example.kind is ExampleKind.CLUSTER:
        models.clusters.learn_assign(example.cluster_features(), example.at)
        return
    assert example.outcome is not None and example.predicted is not None
    model = models.purchase if example.kind is ExampleKind.PURCHASE else models.churn
    model.learn(example.label_features(), example.outcome, example.predicted)


@dataclass(slots=True)
class TrainerProgress:
    """How far a trainer has learned: the examples log's next offset, each source's newest batch
    learned, and the count of examples learned. Published with every model version, so a trainer
    taking over continues exactly where the version it restores left off."""

    next_offset: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    examples: int = 0
    duplicates: int = 0

    def to_record(self) -> dict[str, Any]:
        return {
            "next_offset": self.next_offset,
            "sources": dict(sorted(self.sources.items())),
            "examples": self.examples,
            "duplicates": self.duplicates,
        }

    def to_params(self) -> TrainerParams:
        """As a model version carries it."""
        return TrainerParams(**self.to_record())

    @classmethod
    def of(cls, models: SegmentModels) -> TrainerProgress:
        """How far the trainer that published `models` had got (nothing yet: from the start)."""
        return cls() if models.trainer is None else cls.from_record(models.trainer.model_dump())

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> TrainerProgress:
        return cls(
            next_offset=int(r["next_offset"]),
            sources={str(k): int(v) for k, v in r["sources"].items()},
            examples=int(r["examples"]),
            duplicates=int(r.get("duplicates", 0)),
        )


class Trainer:
    """Learns example batches from one ordered log (a one-partition topic), once each.

    Built from a model version, it continues where that version's trainer had got to."""

    def __init__(self, models: SegmentModels, progress: TrainerProgress | None = None) -> None:
        self.models = models
        self.progress = progress or TrainerProgress.of(models)

    def version(self, signing_key: bytes | None = None) -> bytes:
        """A model record of everything learned so far, with how far the trainer got."""
        self.models.trainer = self.progress.to_params()
        return self.models.snapshot(signing_key)

    def learn(self, batch: ExampleBatch, offset: int) -> bool:
        """Learn the batch read at `offset` of the log; False (and nothing learned) when that
        source's batch was learned before (sent again after a crash)."""
        p = self.progress
        if offset < p.next_offset:
            return False  # read again before the restored position: already in the model
        p.next_offset = offset + 1
        if batch.batch <= p.sources.get(batch.source, -1):
            p.duplicates += 1
            return False
        for example in batch.examples:
            learn_example(self.models, example)
        p.sources[batch.source] = batch.batch
        p.examples += len(batch.examples)
        return True


# -- shared learning in event-time epochs -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Epochs:
    """The grid model versions are cut on, and which version scores what (issue 14: the final
    segments must not depend on how partitions are spread over workers).

    Version ``b`` (a multiple of `epoch_s`) has learned every example whose `learned_at` is
    before ``b`` and none after, in one canonical order; an event (or a time-driven change) at
    event time ``t`` is scored by the newest version ``b <= floor((t - lag_s) / epoch_s) *
    epoch_s``. Both depend only on the stream, never on timing, so any number of workers
    emits what one would."""

    epoch_s: float
    lag_s: float
    purchase_horizon_s: float
    churn_horizon_s: float

    def boundary_for(self, t: float) -> float:
        """The version boundary that scores event time `t`."""
        return math.floor((t - self.lag_s) / self.epoch_s) * self.epoch_s

    def end_of(self, t: float) -> float:
        """The first boundary after event time `t`: the version that first includes it."""
        return math.floor(t / self.epoch_s) * self.epoch_s + self.epoch_s

    def scoreable_until(self, known: float) -> float:
        """The latest event time whose version is final once every boundary up to `known` is."""
        return math.nextafter(
            math.floor(known / self.epoch_s) * self.epoch_s + self.epoch_s + self.lag_s, -math.inf
        )

    def learned_at(self, example: Example) -> float:
        """When the stream learned it: a cluster observation at its event, a label when its
        horizon ended (both the same on every worker)."""
        if example.kind is ExampleKind.CLUSTER:
            return example.at
        horizon = (
            self.purchase_horizon_s
            if example.kind is ExampleKind.PURCHASE
            else (self.churn_horizon_s)
        )
        return example.at + horizon


def _canonical(example: Example, learned_at: float) -> tuple[Any, ...]:
    """The learning order: by when it was learned, ties broken by content (identical examples
    are interchangeable), never by which worker or batch sent it."""
    return (
        learned_at,
        example.kind.value,
        example.features,
        example.outcome is True,
        -1.0 if example.predicted is None else example.predicted,
    )


@dataclass(slots=True)
class _Read:
    """What reading one batch changed, so the progress as of any earlier offset can be told."""

    offset: int
    source: str
    hwm: int | None
    promise: float | None
    duplicate: bool
    idle: bool = False  # the source was idle before this batch


class SharedTrainer:
    """One trainer for every worker: learns the examples log in canonical event-time order.

    Each source (input partition ``p0..p{n-1}``) promises with every batch how far it has got;
    examples wait in `pending` until every source has promised past them, then are learned in
    canonical order; at each epoch boundary crossed a version is cut (:meth:`read` returns the
    records to publish). A version records the examples log's offset of the first batch still
    pending then, with each source's newest batch and promise as of that offset, so a trainer
    restored from it re-reads from there and ends with exactly the same versions."""

    def __init__(
        self,
        models: SegmentModels,
        epochs: Epochs,
        sources: int,
        signing_key: bytes | None = None,
        still_idle: Callable[[set[str]], set[str]] | None = None,
    ) -> None:
        """`still_idle`: of the sources that said they are idle, those with nothing unread
        now (live: their input partitions' ends against the group's committed offsets). Asked
        only when idleness would let versions go further: a source that said it is idle but
        has input again (a backlog published into a quiet deployment) is waited for, or the
        sources that read first would cut versions past its examples, which came late."""
        self.models = models
        self.epochs = epochs
        self._still_idle = still_idle or (lambda sources: sources)
        self.required = [f"p{n}" for n in range(sources)]
        self._key = signing_key
        r = models.trainer
        self.next_offset = 0 if r is None else r.next_offset
        self.hwm: dict[str, int] = {} if r is None else dict(r.sources)
        self.promises: dict[str, float] = {} if r is None else dict(r.promises)
        self.examples = 0 if r is None else r.examples
        self.duplicates = 0 if r is None else r.duplicates
        self.late = 0 if r is None else r.late
        self.idle: set[str] = set() if r is None else set(r.idle)
        self.closed_until = -math.inf
        if r is not None and r.closed_until is not None:
            self.closed_until = r.closed_until
        self.valid_from = None if r is None else r.valid_from
        self._reread_to = self.next_offset if r is None or r.read_to is None else r.read_to
        self.read_to = self.next_offset
        self._pending: list[tuple[tuple[Any, ...], int, int, Example]] = []
        self._held: dict[int, int] = {}  # offset -> its examples still pending
        self._held_order: deque[int] = deque()
        self._reads: deque[_Read] = deque()
        # The boundary that completes what was learned last (None: nothing since the last cut).
        self._dirty: float | None = None if r is None else r.dirty_until
        self._announced = self.closed_until  # in the newest record made
        self._seq = 0
        self.last_late: tuple[str, int, float, float] | None = None  # source, batch, at, closed

    @property
    def pending(self) -> int:
        return len(self._pending)

    def frontier(self) -> float:
        """Every source that is not idle has promised no more examples before this event time
        (-inf until each of them has said anything; the least promise when all are idle).
        Where idleness lets it go further, the sources with input again count as active."""
        frontier = self._frontier(self.idle)
        if self.idle and frontier > self._frontier(set()):
            frontier = self._frontier(self._still_idle(set(self.idle)) & self.idle)
        return frontier

    def _frontier(self, idle: set[str]) -> float:
        known = set(self.required) | set(self.promises)
        active = [source for source in known if source not in idle]
        if any(source not in self.promises for source in active):
            return -math.inf
        promised = active or [source for source in known if source in self.promises]
        return min((self.promises[source] for source in promised), default=-math.inf)

    def read(self, batch: ExampleBatch, offset: int) -> list[bytes]:
        """Take the batch read at `offset`; return the model records it completes, in order."""
        if offset < self.read_to:
            return []  # before the restored position: in the model already
        self.read_to = offset + 1
        source = batch.source
        before_hwm, before_promise = self.hwm.get(source), self.promises.get(source)
        duplicate = batch.batch <= (-1 if before_hwm is None else before_hwm)
        was_idle = source in self.idle
        self._reads.append(_Read(offset, source, before_hwm, before_promise, duplicate, was_idle))
        if duplicate:
            self.duplicates += 1
            return self._advance()
        self.hwm[source] = batch.batch
        if batch.idle:
            self.idle.add(source)
        else:
            self.idle.discard(source)
        if batch.promise is not None:
            self.promises[source] = max(batch.promise, before_promise or -math.inf)
        held = 0
        rereading = offset < self._reread_to
        for example in batch.examples:
            at = self.epochs.learned_at(example)
            if at < self.closed_until:
                if not rereading:
                    self.late += 1  # a source broke its promise: not learned (counted)
                    self.last_late = (source, batch.batch, at, self.closed_until)
                continue
            self._seq += 1
            heapq.heappush(self._pending, (_canonical(example, at), self._seq, offset, example))
            held += 1
        if held:
            self._held[offset] = held
            self._held_order.append(offset)
        return self._advance()

    def skip(self, offset: int) -> None:
        """The record at `offset` is not a batch (malformed): nothing to learn from it."""
        self.read_to = max(self.read_to, offset + 1)

    def progress_record(self) -> bytes:
        """A record of everything learned so far (at a handover: the next trainer re-reads
        only what is still pending)."""
        return self._record()

    def _advance(self) -> list[bytes]:
        frontier = self.frontier()
        records: list[bytes] = []
        while self._pending and self._pending[0][0][0] < frontier:
            key, _, offset, example = heapq.heappop(self._pending)
            end = self.epochs.end_of(key[0])
            if self._dirty is not None and end > self._dirty:
                records.append(self._cut(self._dirty))
            learn_example(self.models, example)
            self.examples += 1
            self._dirty = end
            self._release(offset)
        if self._dirty is not None and self._dirty <= frontier:
            records.append(self._cut(self._dirty))
        if frontier > self.closed_until:
            self.closed_until = frontier
            crossed = math.floor(frontier / self.epochs.epoch_s) * self.epochs.epoch_s
            if crossed > self._announced:
                # Versions up to `crossed` are final now, and the workers wait on that: say so
                # (a progress record: what is learned up to the frontier, not a version).
                records.append(self._record())
        return records

    def _release(self, offset: int) -> None:
        self._held[offset] -= 1
        while self._held_order and self._held[self._held_order[0]] == 0:
            del self._held[self._held_order.popleft()]

    def _cut(self, boundary: float) -> bytes:
        """A version: everything before `boundary` learned, nothing after it."""
        self.closed_until = boundary
        self.valid_from = boundary
        self._dirty = None
        return self._record()

    def _record(self) -> bytes:
        """A model record of what is learned, with the progress as of the first pending batch.
        It is a version when `valid_from == closed_until`; otherwise a progress record (a
        trainer may restore it; workers only learn from it how far versions are final)."""
        self._announced = self.closed_until
        start = self._held_order[0] if self._held_order else self.read_to
        while self._reads and self._reads[0].offset < start:
            self._reads.popleft()
        hwm, promises, duplicates = dict(self.hwm), dict(self.promises), self.duplicates
        idle = set(self.idle)
        for read in reversed(self._reads):  # undo what the batches from `start` on changed
            for values, value in ((hwm, read.hwm), (promises, read.promise)):
                if value is None:
                    values.pop(read.source, None)
                else:
                    values[read.source] = value  # type: ignore[assignment]
            duplicates -= read.duplicate
            if not read.duplicate:
                (idle.add if read.idle else idle.discard)(read.source)
        self.models.trainer = TrainerParams(
            next_offset=start,
            sources=dict(sorted(hwm.items())),
            examples=self.examples,
            duplicates=duplicates,
            promises=dict(sorted(promises.items())),
            closed_until=None if self.closed_until == -math.inf else self.closed_until,
            valid_from=self.valid_from,
            dirty_until=self._dirty,
            read_to=self.read_to,
            late=self.late,
            idle=sorted(idle),
        )
        return self.models.snapshot(self._key)


class ModelShelf:
    """A worker's versions of a shared trainer, by the epoch boundary each was cut at.

    :meth:`at` is the version that scores event time t (the newest cut at or before
    ``Epochs.boundary_for(t)``; before any, the `base`: the version the worker started with);
    :meth:`ready` says whether that choice is final (the trainer has closed that boundary).
    While a version is pinned, it scores everything and nothing waits."""

    def __init__(self, base: SegmentModels, epochs: Epochs) -> None:
        self.epochs = epochs
        self.base = SegmentModels(base.settings)  # untrained: what scores before a bootstrap
        self.known_until = -math.inf
        self.pinned: SegmentModels | None = None
        self._boundaries: list[float] = []
        self._versions: dict[float, SegmentModels] = {}
        if _closed_until(base) == -math.inf:
            self.offer(base)  # untrained or bootstrapped: it scores before the first version
        # A trainer's record (a worker starts with the newest on the models topic) is not
        # taken: it would make every boundary up to its own final without the versions cut
        # before it, and an event needing one of them would be scored by the base. They come
        # in order from the follower, which reads the topic from its start.

    def offer(self, models: SegmentModels) -> None:
        """Take a record the models topic holds: a version, a progress record, or a version
        made without epochs (a bootstrap: it scores what comes before the first version)."""
        t = models.trainer
        if t is None or t.closed_until is None:
            self.base = models
            return
        self.known_until = max(self.known_until, t.closed_until)
        if t.valid_from is None or t.valid_from != t.closed_until:
            return  # a progress record: learned past its last version, scores nothing
        if t.valid_from not in self._versions:
            bisect.insort(self._boundaries, t.valid_from)
        self._versions[t.valid_from] = models

    @property
    def newest(self) -> SegmentModels:
        if self.pinned is not None:
            return self.pinned
        return self._versions[self._boundaries[-1]] if self._boundaries else self.base

    def at(self, t: float) -> SegmentModels:
        if self.pinned is not None:
            return self.pinned
        i = bisect.bisect_right(self._boundaries, self.epochs.boundary_for(t))
        return self._versions[self._boundaries[i - 1]] if i else self.base

    def ready(self, t: float) -> bool:
        return self.pinned is not None or self.epochs.boundary_for(t) <= self.known_until

    def scoreable_until(self) -> float:
        """The latest event time whose version is final (time-driven work up to it may fire)."""
        if self.pinned is not None:
            return math.inf
        if self.known_until == -math.inf:
            return -math.inf
        return self.epochs.scoreable_until(self.known_until)

    def forget_before(self, t: float) -> None:
        """Drop versions no event at or after `t` can need (the newest before it stays)."""
        i = bisect.bisect_right(self._boundaries, self.epochs.boundary_for(t)) - 1
        for boundary in self._boundaries[: max(i, 0)]:
            del self._versions[boundary]
        del self._boundaries[: max(i, 0)]


def _closed_until(models: SegmentModels) -> float:
    t = models.trainer
    return -math.inf if t is None or t.closed_until is None else t.closed_until
