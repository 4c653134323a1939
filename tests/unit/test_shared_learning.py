"""Shared learning in the live step (issue 14), without Faust or a broker.

The pipeline scores with the version it was given, collects what the models must learn from,
keeps each batch's examples in the partition's delivery marker (written with the batch's
states) and sends them once those are durable. After a crash, the batches not known delivered
are sent again and the trainer drops them: learned once each. Oracle: a trainer fed everything
the pipeline sent ends with exactly the models an in-process replay of the same events learns.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from stream_app.contracts.events import DeadLetter, Event, MessageOrigin, decode_event
from stream_app.core.learning import ExampleBatch, Trainer
from stream_app.core.models import SegmentModels
from stream_app.core.processor import MemoryStore, Processor
from stream_app.live.pipeline import LivePipeline
from stream_app.live.store import DELIVERY_KEY_PREFIX, DeliveryMarker, TableStore
from stream_app.settings import SegmentationSettings, Settings

T0 = datetime(2024, 3, 1, tzinfo=UTC)
CLICKS, SALES = "clickstream", "transactions"
SEG = SegmentationSettings(cluster_warmup=20, cluster_warmup_days=0)


class Sinks:
    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []
        self.dead_letters: list[dict[str, Any]] = []

    async def change(self, customer_id: str, value: bytes) -> None:
        self.changes.append(orjson.loads(value))

    async def membership(self, customer_id: str, value: bytes) -> None:
        return None

    async def dead_letter(self, key: bytes | None, value: bytes) -> None:
        self.dead_letters.append(orjson.loads(value))

    async def reroute(self, topic: str, key: bytes, value: bytes) -> None:
        raise AssertionError(topic)


class ExampleLog:
    """The examples topic: every batch sent, in order; `ack=False` loses the acknowledgements
    (the process dies before the broker answers)."""

    def __init__(self, ack: bool = True) -> None:
        self.ack = ack
        self.sent: list[bytes] = []

    async def __call__(self, key: bytes, value: bytes) -> asyncio.Future[Any]:
        self.sent.append(value)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.ack:
            fut.set_result(Acked(len(self.sent) - 1))
        return fut


@dataclass(frozen=True)
class Acked:
    offset: int  # as Kafka's RecordMetadata says where the record landed


def events(n: int) -> list[tuple[str, bytes]]:
    """Clicks and purchases of 12 customers over 90 days: labels mature within the run."""
    out = []
    for i in range(n):
        customer = f"c{i % 12}"
        at = (T0 + timedelta(hours=7 * i)).isoformat()
        if i % 5 == 4:
            body = {
                "event_id": f"t{i}",
                "customer_id": customer,
                "event_time": at,
                "event_type": "purchase",
                "order_id": f"o{i}",
                "amount": f"{10 + i % 7}.50",
                "currency": "GBP",
            }
            out.append((SALES, orjson.dumps(body)))
        else:
            body = {
                "event_id": f"e{i}",
                "customer_id": customer,
                "event_time": at,
                "event_type": "product_view",
            }
            out.append((CLICKS, orjson.dumps(body)))
    return out


def shared_pipeline(
    table: dict[bytes, bytes],
    log: ExampleLog,
    models: SegmentModels,
    learning: str = "shared",
    settings: Settings | None = None,
) -> LivePipeline:
    if settings is None:
        settings = Settings(
            state_dir="/nonexistent", partitions=1, segmentation=SEG, learning=learning
        )
    pipeline = LivePipeline(
        settings,
        lambda partition: TableStore(table, partition, 1, cache_size=0),
        Sinks(),
        models=models,
        clock=lambda: T0 + timedelta(days=3650),
        examples_sink=log,
    )
    if settings.learning == "shared":
        # No trainer here: score with `models` alone (as `models pin` does), so no event waits
        # for versions (test_epoch_learning.py runs pipelines with a trainer).
        pipeline.offer_models(models, pinned=True)
    return pipeline


async def run(p: LivePipeline, items: list[tuple[str, bytes]], start: int, batch: int) -> None:
    offsets = {CLICKS: 0, SALES: 0}
    for topic, _ in items[:start]:
        offsets[topic] += 1
    for first in range(start, len(items), batch):
        chunk = []
        for topic, value in items[first : first + batch]:
            origin = MessageOrigin(topic=topic, partition=0, offset=offsets[topic])
            offsets[topic] += 1
            chunk.append((b"k", value, origin, None))
        await p.handle_batch(chunk)


def decoded(topic: str, value: bytes) -> Event:
    origin = MessageOrigin(topic=topic, partition=0, offset=0)
    event = decode_event(value, "click" if topic == CLICKS else "transaction", origin)
    assert not isinstance(event, DeadLetter), event
    return event


def in_process_models(items: list[tuple[str, bytes]]) -> SegmentModels:
    models = SegmentModels(SEG)
    processor = Processor(SEG, models, MemoryStore())
    for topic, value in items:
        processor.process(decoded(topic, value))
    return models


def learned(models: SegmentModels) -> dict[str, Any]:
    params = models.to_params().model_dump()
    for name in ("purchase", "churn"):
        # Quality and diagnostics come from scoring (which version scored); learning does not.
        for what in ("auc", "log_loss", "largest_scaled_input", "calibration"):
            params[name].pop(what)
        scaler = params[name]["scaler"]  # River's defaultdicts gain a 0.0 entry when read
        for what in ("means", "vars"):
            scaler[what] = {f: v for f, v in scaler[what].items() if f in scaler["counts"]}
    for what in ("profiles", "names", "renames", "profiled_at"):  # named when changes need it
        params["clusters"].pop(what)
    params.pop("trainer")  # bookkeeping of how far, not what was learned
    return params


def marker(table: dict[bytes, bytes]) -> DeliveryMarker:
    return TableStore(table, 0, 1).marker()


async def test_a_trainer_fed_what_the_pipeline_sent_learns_what_in_process_learns() -> None:
    items = events(400)
    log = ExampleLog()
    table: dict[bytes, bytes] = {}
    scoring = SegmentModels(SEG)
    p = shared_pipeline(table, log, scoring)
    await run(p, items, 0, batch=25)
    assert isinstance(p.sinks, Sinks) and p.sinks.dead_letters == []
    batches = [ExampleBatch.from_bytes(raw) for raw in log.sent]
    assert [b.batch for b in batches] == sorted({b.batch for b in batches})  # one per batch
    trainer = Trainer(SegmentModels(SEG))
    for offset, batch in enumerate(batches):
        assert trainer.learn(batch, offset)
    assert trainer.models.purchase.labels > 0 and not trainer.models.clusters.warming_up
    assert learned(trainer.models) == learned(in_process_models(items))
    assert learned(scoring) == learned(SegmentModels(SEG))  # the scoring version learned nothing
    # Acknowledged batches leave the marker at its next write: only the last batch is kept.
    assert [number for _, number, _ in marker(table).examples] == [batches[-1].batch]


async def test_after_a_crash_unacknowledged_examples_are_sent_again_and_learned_once() -> None:
    items = events(400)
    table: dict[bytes, bytes] = {}
    lost = ExampleLog(ack=False)  # the broker never answered: the process died
    await run(shared_pipeline(table, lost, SegmentModels(SEG)), items[:200], 0, batch=25)
    assert len(marker(table).examples) >= 1  # kept, with the states, until acknowledged
    log = ExampleLog()
    await run(shared_pipeline(table, log, SegmentModels(SEG)), items, 200, batch=25)
    everything = [*lost.sent, *log.sent]  # the topic holds both lives' sends
    trainer = Trainer(SegmentModels(SEG))
    for offset, raw in enumerate(everything):
        trainer.learn(ExampleBatch.from_bytes(raw), offset)
    assert trainer.progress.duplicates >= 1
    assert learned(trainer.models) == learned(in_process_models(items))


async def test_the_pipeline_switches_versions_at_a_batch_boundary_and_stamps_them() -> None:
    items = events(200)  # past 30 days: customers stop being "new" under the newer version
    p = shared_pipeline({}, ExampleLog(), SegmentModels(SEG))
    await run(p, items[:30], 0, batch=30)
    newer = SegmentModels(SEG)
    newer.stamp = "river-kmeans-logreg.0123456789.abcdefabcdef"
    p.offer_models(newer, pinned=True)
    assert p.models is not newer  # not in the middle of anything: at the next batch
    await run(p, items, 30, batch=30)
    assert p.models is newer and p.processors[0].models is newer
    sinks = p.sinks
    assert isinstance(sinks, Sinks)
    stamps = {c["model_version"] for c in sinks.changes}
    assert newer.stamp in stamps and len(stamps) == 2


async def test_deterministic_mode_restarts_with_exactly_the_models_it_had() -> None:
    """learning=in_process: the worker learns as it scores and records what it learned. After
    a crash it restores its last snapshot, re-learns from the examples log what the snapshot
    lacks, and from its markers what never reached the log; then it goes on exactly as the
    offline replay does (the crash-loop of issue 14 lost that learning for good)."""
    items = events(400)
    table: dict[bytes, bytes] = {}
    log = ExampleLog()
    first = shared_pipeline(table, log, SegmentModels(SEG), learning="in_process")
    await run(first, items[:150], 0, batch=25)
    await asyncio.sleep(0)  # the broker's acknowledgements arrive
    snapshot = await first.snapshot_models(None)
    await run(first, items[:250], 150, batch=25)  # learned after the snapshot, then SIGKILL
    lost = log.sent.pop()  # the last batch's examples never reached the log
    # The restart: the snapshot, then the log after its position (relearn_examples), ...
    models = SegmentModels(SEG)
    models.restore(snapshot)
    trainer = Trainer(models)
    assert trainer.progress.next_offset > 0
    for offset, raw in enumerate(log.sent):
        trainer.learn(ExampleBatch.from_bytes(raw), offset)
    models.trainer = trainer.progress.to_params()
    assert ExampleBatch.from_bytes(lost).batch > trainer.progress.sources["p0"]
    # ... then the marker's batches, as the partition is recovered, before any new event.
    second = shared_pipeline(table, ExampleLog(), models, learning="in_process")
    await run(second, items, 250, batch=25)
    assert learned(models) == learned(in_process_models(items))


async def test_a_batch_with_many_examples_is_split_into_records_of_bounded_size(
    monkeypatch: Any,
) -> None:
    """A watermark jump can fire thousands of due checks in one batch: its examples go out as
    several records, numbered on (the trainer's duplicate check), the batch's promise on the
    last; each is kept under its own table key until acknowledged, so no record and no table
    value grows with the batch. The trainer learns exactly what in-process learning does, also
    after a crash that re-sends the split records."""
    import stream_app.live.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "EXAMPLES_PER_RECORD", 7)
    items = events(400)
    table: dict[bytes, bytes] = {}
    lost = ExampleLog(ack=False)  # the first life dies before the broker answers
    await run(shared_pipeline(table, lost, SegmentModels(SEG)), items[:200], 0, batch=50)
    kept = marker(table).examples
    assert len(kept) > 1 and len({batch for batch, _, _ in kept}) < len(kept)  # split batches
    stored = [k for k in table if k.startswith(DELIVERY_KEY_PREFIX) and b"/examples/" in k]
    assert len(stored) == len(kept)
    log = ExampleLog()
    await run(shared_pipeline(table, log, SegmentModels(SEG)), items, 200, batch=50)
    records = [ExampleBatch.from_bytes(raw) for raw in [*lost.sent, *log.sent]]
    assert all(len(r.examples) <= 7 for r in records)
    numbers = [ExampleBatch.from_bytes(raw).batch for raw in log.sent]
    assert numbers == sorted(set(numbers))  # each record of the second life numbered on
    trainer = Trainer(SegmentModels(SEG))
    for offset, record in enumerate(records):
        trainer.learn(record, offset)
    assert trainer.progress.duplicates >= len(kept)  # the re-sent ones, dropped
    assert learned(trainer.models) == learned(in_process_models(items))
    # Acknowledged: the kept records' keys are deleted with the marker's next write.
    assert len([k for k in table if b"/examples/" in k]) == len(marker(table).examples)


def test_a_marker_written_before_example_records_had_numbers_still_reads() -> None:
    """Markers of earlier versions kept the encoded batches inline, numbered by batch."""
    old = orjson.dumps({"written": 9, "delivered": 7, "examples": [[8, "x"], [9, "y"]]})
    read = DeliveryMarker.from_bytes(old)
    assert read.examples == [(8, 8, "x"), (9, 9, "y")] and read.records == 9
    assert DeliveryMarker.from_bytes(orjson.dumps({"written": 4, "delivered": 4})).records == 4
    again = DeliveryMarker.from_bytes(read.to_bytes(), lambda n: {8: b"x", 9: b"y"}[n].upper())
    assert again.examples == [(8, 8, "X"), (9, 9, "Y")] and again.records == 9


async def test_a_full_example_record_stays_far_below_the_brokers_one_megabyte() -> None:
    """EXAMPLES_PER_RECORD examples of the largest kind seen encode well under 1 MB (Kafka's
    default message.max.bytes, and Faust's producer limit for the state table's records)."""
    from stream_app.live.pipeline import EXAMPLES_PER_RECORD

    log = ExampleLog()
    await run(shared_pipeline({}, log, SegmentModels(SEG)), events(400), 0, batch=400)
    examples = [e for raw in log.sent for e in ExampleBatch.from_bytes(raw).examples]
    assert examples
    largest = max(examples, key=lambda e: len(orjson.dumps(e.model_dump(mode="json"))))
    record = ExampleBatch(source="p0", batch=1, examples=[largest] * EXAMPLES_PER_RECORD)
    assert len(record.to_bytes()) < 512 * 1024
