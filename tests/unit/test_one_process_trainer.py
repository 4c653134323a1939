"""The offline replay of a shared-learning deployment (``core.one_process_trainer``) against the
live pipeline itself.

Oracle: the live step (``LivePipeline`` with an in-memory trainer between its workers, from
``test_epoch_learning``), fed the same Online Retail events over four partitions, once through
one worker and once through three. The offline replay is one processor over the whole stream;
every customer's change trail must be the live one exactly, and the versions it cuts the same.
"""

from __future__ import annotations

import asyncio
from typing import Any

import test_epoch_learning
from test_epoch_learning import EVENTS, PARTITIONS, RETAIL, Cluster, settings, versions

from stream_app.contracts.events import SegmentChange
from stream_app.core.learning import Epochs, ExampleBatch
from stream_app.core.models import SegmentModels
from stream_app.core.one_process_trainer import OneProcessTrainer
from stream_app.core.processor import MemoryStore, Processor
from stream_app.live.store import partition_of
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.replay import replay_offline

pytestmark = test_epoch_learning.pytestmark


Trails = dict[str, list[tuple[int, str, Any]]]


def offline(epochs: Epochs | None) -> tuple[Trails, Processor, dict[str, list[float]]]:
    """Each customer's trail, the processor, and the event times of the trail's changes."""
    changes: list[SegmentChange] = []
    items = [i for i in read_dataset(RETAIL, "online-retail") if not isinstance(i, RowError)]
    s = settings().segmentation
    _, processor, _ = replay_offline(items[:EVENTS], s, on_change=changes.append, epochs=epochs)
    trails: Trails = {}
    times: dict[str, list[float]] = {}
    for c in changes:
        current = c.model_dump(mode="json")["current"]
        trails.setdefault(c.customer_id, []).append((c.sequence, c.component.value, current))
        times.setdefault(c.customer_id, []).append(c.event_time.timestamp())
    return trails, processor, times


def live(owners: list[list[int]], weights: list[int], seed: int) -> Cluster:
    cluster = Cluster(owners, seed)
    asyncio.run(cluster.run(weights))
    return cluster


def test_the_offline_shared_replay_emits_what_one_and_three_live_workers_emit() -> None:
    """Exact, up to where each live partition's clock got: the offline replay ends by firing
    what falls due up to its newest event (as the in-process replay does); a live partition
    fires only up to its own watermark, and its stream has not ended."""
    trails, _, times = offline(settings().epochs())
    for cluster in (live([[0, 1, 2, 3]], [1], seed=1), live([[0], [1, 2], [3]], [5, 1, 3], 2)):
        expected, clocks = cluster.trails(), watermarks(cluster)
        assert trails.keys() == expected.keys() and len(trails) > 1000
        differ = [c for c in trails if trails[c][: len(expected[c])] != expected[c]]
        assert not differ, [(c, trails[c], expected[c]) for c in differ[:2]]
        longer = [c for c in trails if len(trails[c]) > len(expected[c])]
        past = {c: times[c][len(expected[c]) :] for c in longer}
        clock = {c: clocks[partition_of(c, PARTITIONS)] for c in past}
        assert all(t > clock[c] for c in past for t in past[c]), past
        assert len(past) < 0.01 * len(trails)
    kinds = {component for trail in trails.values() for _, component, _ in trail}
    assert {"cluster", "propensity"} <= kinds  # the models mattered


def watermarks(cluster: Cluster) -> dict[int, float]:
    """Where each input partition's clock ended on the worker that owned it."""
    return {p: proc.watermark for w, _, _ in cluster.workers for p, proc in w.processors.items()}


def test_shared_learning_offline_differs_from_learning_in_process() -> None:
    """Not a second name for the same replay: scoring with the version of the day before (and
    learning in canonical order) moves some customers' trails."""
    shared, _, _ = offline(settings().epochs())
    in_process, _, _ = offline(None)
    assert shared.keys() == in_process.keys()
    assert sum(shared[c] != in_process[c] for c in shared) > 50


def test_the_offline_trainer_cuts_the_versions_the_live_trainer_cuts() -> None:
    """Every event's version was final when it was scored, and each version (what it learned,
    at which boundary) is the one the live trainer cut for the same boundary."""
    items = [i for i in read_dataset(RETAIL, "online-retail") if not isinstance(i, RowError)]
    s = settings().segmentation
    processor = Processor(s, SegmentModels(s), MemoryStore())
    driver = OneProcessTrainer(processor, settings().epochs())
    records: list[bytes] = []
    read = driver.trainer.read

    def keep(batch: ExampleBatch, offset: int) -> list[bytes]:
        made = read(batch, offset)
        records.extend(made)
        return made

    driver.trainer.read = keep  # type: ignore[method-assign]
    for event in items[:EVENTS]:
        driver.before(event.event_time.timestamp())
        processor.process(event)
    driver.finish()
    assert driver.waits_expired == 0 and driver.versions > 20
    ours, theirs = versions(records), versions(live([[0, 1], [2, 3]], [1, 2], seed=3).records)
    assert len(theirs) > 20 and ours[: len(theirs)] == theirs
