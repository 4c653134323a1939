"""Learning as a stream (issue 14): examples collected while scoring, learned by one trainer.

The oracle is the in-process replay: a trainer that learns, in order, the examples a collecting
processor produced ends with exactly the parameters the in-process models learned (the examples
do not depend on the model that scored them, only the quality metrics do).
"""

from __future__ import annotations

import base64
import itertools
import math
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from stream_app.core.features import FEATURES
from stream_app.core.learning import (
    CollectedLearning,
    Example,
    ExampleBatch,
    ExampleKind,
    Trainer,
    TrainerProgress,
    cluster_example,
    label_example,
)
from stream_app.core.models import CLUSTER_FEATURES, SegmentModels
from stream_app.core.processor import MemoryStore, Processor
from stream_app.settings import SegmentationSettings
from stream_app.tools.datasets import RowError, read_dataset

RETAIL = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "datasets"
    / "online_retail"
    / "online_retail.csv.gz"
)
EVENTS = 9000  # > the clusters' 5,000-observation, 7-day warm-up; labels mature too


def _events() -> list[Any]:
    items = read_dataset(RETAIL, "online-retail")
    return list(itertools.islice((i for i in items if not isinstance(i, RowError)), EVENTS))


def _learned(values: dict[str, float]) -> dict[str, float]:
    """River's defaultdicts gain a 0.0 entry when read: only learned values count."""
    return {k: v for k, v in values.items() if v != 0.0}


def _parameters(models: SegmentModels) -> dict[str, Any]:
    clusters = models.clusters
    return {
        "warming_up": clusters.warming_up,
        "centres": {c: dict(v) for c, v in clusters.kmeans.centers.items()},
        "sizes": list(clusters.sizes),
        "scaler": (dict(clusters.scaler.means), dict(clusters.scaler.vars)),
        **{
            name: (
                dict(model.model["LogisticRegression"].weights),
                model.model["LogisticRegression"].intercept,
                _learned(model.model["StandardScaler"].means),
                model.labels,
                model.positives,
            )
            for name, model in (("purchase", models.purchase), ("churn", models.churn))
        },
    }


@pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)")
def test_a_trainer_learns_exactly_what_in_process_learning_learns() -> None:
    settings = SegmentationSettings()
    events = _events()
    in_process = Processor(settings, SegmentModels(settings), MemoryStore())
    frozen = SegmentModels(settings)  # the version the collecting processor scores with
    collected = CollectedLearning(frozen)
    collecting = Processor(settings, frozen, MemoryStore(), learning=collected)
    trainer = Trainer(SegmentModels(settings))
    for offset, event in enumerate(events):
        in_process.process(event)
        collecting.process(event)
        batch = ExampleBatch(source="p0", batch=offset, examples=collected.drain())
        assert trainer.learn(ExampleBatch.from_bytes(batch.to_bytes()), offset)
    learned = _parameters(trainer.models)
    assert learned["warming_up"] is False and learned["purchase"][3] > 200  # a real test
    assert learned == _parameters(in_process.models)
    assert _parameters(frozen) == _parameters(SegmentModels(settings))  # scoring learned nothing
    # One cluster observation per applied event, plus every label that matured.
    labels = in_process.models.purchase.labels + in_process.models.churn.labels
    assert trainer.progress.examples == in_process.counts["applied"] + labels


def _batch(source: str, number: int, n: int = 2) -> ExampleBatch:
    x = {f: float(i) for i, f in enumerate(CLUSTER_FEATURES)}
    return ExampleBatch(
        source=source, batch=number, examples=[cluster_example(x, float(i)) for i in range(n)]
    )


def test_a_batch_sent_twice_is_learned_once() -> None:
    trainer = Trainer(SegmentModels(SegmentationSettings()))
    log = [_batch("p0", 1), _batch("p1", 1), _batch("p0", 2), _batch("p0", 2), _batch("p0", 1)]
    learned = [trainer.learn(batch, offset) for offset, batch in enumerate(log)]
    assert learned == [True, True, True, False, False]
    assert trainer.progress.to_record() == {
        "next_offset": 5,
        "sources": {"p0": 2, "p1": 1},
        "examples": 6,
        "duplicates": 2,
    }
    assert trainer.models.clusters.warmup_seen == 6


def test_a_trainer_restored_at_an_offset_skips_what_its_version_holds() -> None:
    progress = TrainerProgress(next_offset=3, sources={"p0": 2}, examples=6)
    trainer = Trainer(SegmentModels(SegmentationSettings()), progress)
    assert not trainer.learn(_batch("p0", 3), 2)  # before the restored position
    assert trainer.learn(_batch("p0", 3), 3)
    assert TrainerProgress.from_record(trainer.progress.to_record()) == trainer.progress
    assert trainer.progress.examples == 8


def test_examples_round_trip_exactly() -> None:
    x = {f: math.pi * (i + 1) / 7 for i, f in enumerate(CLUSTER_FEATURES)}
    assert cluster_example(x, 12.5).cluster_features() == x  # float64: exact
    packed = base64.b64encode(struct.pack(f"<{len(FEATURES)}f", *range(len(FEATURES)))).decode()
    label = label_example(ExampleKind.CHURN, packed, 3.0, True, 0.25)
    assert label.label_features() == {f: float(i) for i, f in enumerate(FEATURES)}
    batch = ExampleBatch(source="p3", batch=9, examples=[cluster_example(x, 1.0), label])
    assert ExampleBatch.from_bytes(batch.to_bytes()) == batch


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"source": "p0", "batch": 1, "examples": [], "format": "other"}',
        b'{"source": "p0", "batch": -1, "examples": []}',
        b'{"source": "", "batch": 1, "examples": []}',
        b'{"source": "p0", "batch": 1, "examples": [{"kind": "x", "at": 1, "features": ""}]}',
        b'{"source": "p0", "batch": 1, "examples": [], "extra": 1}',
        b'{"source": "p0", "batch": 1, "examples": [{"kind": "purchase", "at": 1, '
        b'"features": "", "outcome": true, "predicted": 1.5}]}',
    ],
)
def test_malformed_example_records_are_refused(raw: bytes) -> None:
    with pytest.raises((ValidationError, ValueError)):
        ExampleBatch.from_bytes(raw)


def test_example_kinds_are_what_the_models_learn() -> None:
    assert {k.value for k in ExampleKind} == {"cluster", "purchase", "churn"}
    assert Example(kind=ExampleKind.CLUSTER, at=0.0, features="").outcome is None


def test_a_version_carries_the_trainers_progress_to_the_next_trainer() -> None:
    settings = SegmentationSettings()
    first = Trainer(SegmentModels(settings))
    for offset, number in enumerate([1, 2, 2]):
        first.learn(_batch("p0", number), offset)
    record = first.version()
    restored = SegmentModels(settings)
    restored.restore(record)
    second = Trainer(restored)
    assert second.progress == first.progress
    assert second.progress.to_record()["sources"] == {"p0": 2}
    assert not second.learn(_batch("p0", 2), 3)  # sent again after the version: dropped
    assert second.learn(_batch("p0", 3), 4)
    assert restored.clusters.warmup_seen == 6


def test_examples_built_on_the_hot_path_equal_validated_ones() -> None:
    x = {f: 0.5 + i for i, f in enumerate(CLUSTER_FEATURES)}
    fast = cluster_example(x, 7.0)
    assert Example.model_validate(fast.model_dump()) == fast
    packed = base64.b64encode(struct.pack(f"<{len(FEATURES)}f", *range(len(FEATURES)))).decode()
    label = label_example(ExampleKind.PURCHASE, packed, 2.0, False, 0.75)
    assert Example.model_validate(label.model_dump()) == label
    batch = ExampleBatch.model_construct(
        format="stream_app.examples",
        version=3,
        source="p1",
        batch=3,
        examples=[fast, label],
        promise=1.5,
    )
    assert ExampleBatch.from_bytes(batch.to_bytes()) == ExampleBatch(
        source="p1", batch=3, examples=[fast, label], promise=1.5
    )
    idle = ExampleBatch(source="p1", batch=4, examples=[], promise=1.5, idle=True)
    assert ExampleBatch.from_bytes(idle.to_bytes()) == idle
    assert b'"idle"' not in batch.to_bytes()  # only said when true


def test_a_batch_written_before_promises_existed_is_still_read() -> None:
    old = orjson.dumps(
        {"format": "stream_app.examples", "version": 1, "source": "p0", "batch": 0, "examples": []}
    )
    batch = ExampleBatch.from_bytes(old)
    assert batch.version == 1 and batch.promise is None and not batch.idle
    v2 = ExampleBatch.from_bytes(old.replace(b'"version":1', b'"version":2'))
    assert v2.version == 2 and not v2.idle
    with pytest.raises(ValueError, match="not an examples record"):
        ExampleBatch.from_bytes(old.replace(b'"version":1', b'"version":4'))
