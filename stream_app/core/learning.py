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
import operator
import struct
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
EXAMPLES_VERSION: Final = 1


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

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "format": self.format,
                "version": self.version,
                "source": self.source,
                "batch": self.batch,
                "examples": [
                    {
                        "kind": e.kind.value,
                        "at": e.at,
                        "features": e.features,
                        "outcome": e.outcome,
                        "predicted": e.predicted,
                    }
                    for e in self.examples
                ],
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ExampleBatch:
        batch = cls.model_validate_json(raw)
        if batch.format != EXAMPLES_FORMAT or batch.version != EXAMPLES_VERSION:
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
