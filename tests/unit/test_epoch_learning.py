"""Shared learning in event-time epochs (issue 14: the segments must not depend on how many
workers share the partitions), without Faust or a broker.

Oracle: the same events through one worker owning every partition and through three workers
owning a share each, at different speeds and batch sizes, with one in-memory trainer between
them: every customer's change trail must be identical, and so must every version the trainer
cuts. A trainer restored from any record it made, re-reading the log from the offset that
record names, must make exactly the records the uninterrupted one made.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_shared_learning import Sinks

from stream_app.contracts.events import encode
from stream_app.core.learning import ExampleBatch, ModelShelf, SharedTrainer
from stream_app.core.models import SegmentModels
from stream_app.live.pipeline import LivePipeline
from stream_app.live.store import DELIVERY_KEY_PREFIX, TableStore, partition_of
from stream_app.live.trainer import decode_version
from stream_app.settings import SegmentationSettings, Settings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.publish import topic_for

ROOT = Path(__file__).resolve().parents[2]
RETAIL = ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"
PARTITIONS = 4
EVENTS = 4000  # Dec 2010 - Feb 2011: clusters seed, labels mature, dozens of versions

pytestmark = pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)")


def settings(idle_after_s: float = 3600.0) -> Settings:
    """Idleness is off by default here (an hour): it goes by the wall clock, which these runs
    compress, and the tests below compare runs exactly."""
    return Settings(
        state_dir="/nonexistent",
        partitions=PARTITIONS,
        learning="shared",
        model_idle_after_s=idle_after_s,
        segmentation=SegmentationSettings(
            cluster_warmup=500, cluster_warmup_days=3, tier_warm_up_labels=300
        ),
    )


def messages() -> dict[int, list[tuple[str, bytes, bytes]]]:
    """Each partition's input, as a producer keyed by customer would have written it."""
    s = settings()
    out: dict[int, list[tuple[str, bytes, bytes]]] = {p: [] for p in range(PARTITIONS)}
    items = (i for i in read_dataset(RETAIL, "online-retail") if not isinstance(i, RowError))
    for _, event in zip(range(EVENTS), items, strict=False):
        key = event.customer_id.encode()
        out[partition_of(event.customer_id, PARTITIONS)].append(
            (topic_for(event, s), key, encode(event))
        )
    return out


CURRENT: contextvars.ContextVar[int | None] = contextvars.ContextVar("current", default=None)


class TableDiedError(RuntimeError):
    """The process died while writing: this write and all later ones never happened."""


class PartitionedTable(dict[bytes, bytes]):
    """Like the Faust table: a key is read and written only while an event of its partition is
    the current event (RocksDB and the changelog are picked by it). With a `budget`, the
    process dies after that many more writes."""

    budget: int | None = None

    def _write(self) -> None:
        if self.budget is not None:
            if self.budget <= 0:
                raise TableDiedError
            self.budget -= 1

    def _check(self, key: bytes) -> None:
        if key.startswith(DELIVERY_KEY_PREFIX):
            partition = int(key[len(DELIVERY_KEY_PREFIX) :].split(b"/")[0])
        else:
            partition = partition_of(key.decode(), PARTITIONS)
        assert CURRENT.get() == partition, (key, CURRENT.get())

    def get(self, key: bytes, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._check(key)
        self._write()
        super().__setitem__(key, value)

    def pop(self, key: bytes, default: Any = None) -> Any:
        self._check(key)
        self._write()
        return super().pop(key, default)


@contextlib.contextmanager
def as_current(token: Any) -> Iterator[None]:
    """Makes the message (its token is (partition, topic, offset) here) the current event."""
    reset = CURRENT.set(token[0])
    try:
        yield
    finally:
        CURRENT.reset(reset)


class Cluster:
    """Workers, the examples log, one trainer and the models topic, stepped by hand."""

    def __init__(self, owners: list[list[int]], seed: int, s: Settings | None = None) -> None:
        self.s = s or settings()
        self.log: list[bytes] = []
        self.records: list[bytes] = []
        self.trainer = SharedTrainer(
            SegmentModels(self.s.segmentation), self.s.epochs(), PARTITIONS
        )
        self.read = 0
        self.rng = random.Random(seed)
        inputs = messages()
        # Per partition, what is still to be read: (topic, key, value, offset). An offset is the
        # message's for good, as in a Kafka log, also when it is read again.
        self.feeds: dict[int, list[tuple[str, bytes, bytes, int]]] = {}
        for p in range(PARTITIONS):
            counters = dict.fromkeys(self.s.input_topics, 0)
            self.feeds[p] = []
            for topic, key, value in inputs[p]:
                self.feeds[p].append((topic, key, value, counters[topic]))
                counters[topic] += 1
        self.sinks: list[Sinks] = []
        self.workers: list[tuple[LivePipeline, list[int], int]] = []
        self.seen = [0 for _ in owners]
        self.table = PartitionedTable()
        self.acked: dict[Any, list[int]] = {}
        for partitions in owners:
            self.workers.append((self._pipeline(), partitions, self.rng.choice([7, 25, 60])))
            self.seen.append(0)
        self.seen = [0 for _ in self.workers]

    def _pipeline(self, models: SegmentModels | None = None) -> LivePipeline:
        sinks = Sinks()
        self.sinks.append(sinks)
        return LivePipeline(
            self.s,
            lambda partition: TableStore(self.table, partition, PARTITIONS, cache_size=0),
            sinks,
            models=models,
            has_more=self._has_more,
            as_current=as_current,
            examples_sink=self._send,
        )

    def crash(self, n: int) -> None:
        """Worker `n` dies between batches (SIGKILL): what it held is read again by a new
        process for the same partitions, which starts from the table and the models topic."""
        dead, partitions, size = self.workers[n]
        for merge in dead.merges.values():
            held = sorted(
                (h.item.origin.offset, h.item.origin.topic, h.item)
                for queue in merge.queues.values()
                for h in queue
            )
            for offset, topic, item in reversed(held):
                self.feeds[merge.partition].insert(0, (topic, item.key, item.payload, offset))
        # As a worker starts (`app.run_worker`): with the newest record on the models topic; its
        # follower reads the topic from the start.
        newest = decode_version(self.s, self.records[-1]) if self.records else None
        self.workers[n] = (self._pipeline(newest), partitions, size)
        self.seen[n] = 0
        if n == 0 and self.records:  # the trainer ran there: another takes over
            newest = decode_version(self.s, self.records[-1])
            self.trainer = SharedTrainer(newest, self.s.epochs(), PARTITIONS)
            self.read = self.trainer.next_offset

    def _has_more(self, topic: str, partition: int) -> bool:
        return any(t == topic for t, _, _, _ in self.feeds[partition])

    async def _send(self, key: bytes, value: bytes) -> None:
        self.log.append(value)

    async def step(self, n: int) -> bool:
        """Worker `n` takes its next batch (or, with nothing to take, releases what it held);
        then the trainer reads the log and the workers get every new record."""
        pipeline, partitions, size = self.workers[n]
        batch: list[Any] = []
        for _ in range(size):
            live = [p for p in partitions if self.feeds[p]]
            if not live:
                break
            p = self.rng.choice(live)
            topic, key, value, offset = self.feeds[p].pop(0)
            batch.append((key, value, _origin(topic, p, offset), (p, topic, offset)))
        done = await (pipeline.handle_batch(batch) if batch else pipeline.flush_idle())
        for part, topic, offset in done:
            # Acks in offset order per topic partition: Faust commits past a single unacked
            # offset followed by acked ones (faust/transport/consumer.py, `_new_offset`).
            acked = self.acked.setdefault((id(pipeline), topic, part), [])
            assert not acked or offset > acked[-1], (topic, part, acked[-5:], offset)
            acked.append(offset)
        while self.read < len(self.log):
            self.records += self.trainer.read(
                ExampleBatch.from_bytes(self.log[self.read]), self.read
            )
            self.read += 1
        for i, (worker, _, _) in enumerate(self.workers):
            for data in self.records[self.seen[i] :]:
                worker.offer_models(decode_version(self.s, data))
            self.seen[i] = len(self.records)
        return bool(batch)

    async def run(self, weights: list[int], crashes: int = 0) -> None:
        idle, steps = 0, 0
        crash_at = sorted(self.rng.sample(range(20, 400), crashes))
        while idle < 50:
            n = self.rng.choices(range(len(self.workers)), weights)[0]
            steps += 1
            if crash_at and steps == crash_at[0]:
                crash_at.pop(0)
                self.crash(n)
            moved = await self.step(n)
            held = sum(len(m) for w, _, _ in self.workers for m in w.merges.values())
            idle = 0 if moved or (not any(self.feeds.values()) and held == 0) else idle + 1
            if not any(self.feeds.values()) and held == 0:
                return
        raise AssertionError("stuck: events held with nothing left to read")

    def trails(self) -> dict[str, list[tuple[int, str, Any]]]:
        """Each customer's changes in sequence order (one per sequence: a re-send is equal)."""
        out: dict[str, dict[int, tuple[int, str, Any]]] = {}
        assert all(sinks.dead_letters == [] for sinks in self.sinks)
        for sinks in self.sinks:
            for c in sinks.changes:
                entry = (c["sequence"], c["component"], c["current"])
                seen = out.setdefault(c["customer_id"], {}).setdefault(c["sequence"], entry)
                assert seen == entry, (c["customer_id"], seen, entry)  # never a fork
        return {k: [v[q] for q in sorted(v)] for k, v in out.items()}


def _origin(topic: str, partition: int, offset: int) -> Any:
    from stream_app.contracts.events import MessageOrigin

    return MessageOrigin(topic=topic, partition=partition, offset=offset)


def learned(data: bytes) -> tuple[Any, ...]:
    """What a record's models learned, and the boundary it was cut at (no bookkeeping)."""
    params = orjson.loads(orjson.loads(data)["params"])
    trainer = params.pop("trainer")
    for name in ("purchase", "churn"):
        for what in ("auc", "log_loss", "largest_scaled_input", "calibration"):
            params[name].pop(what)
    return (
        trainer["valid_from"],
        trainer["closed_until"],
        orjson.dumps(params, option=orjson.OPT_SORT_KEYS),
    )


def versions(records: list[bytes]) -> list[tuple[Any, ...]]:
    out = [learned(r) for r in records]
    return [v for v in out if v[0] is not None and v[0] == v[1]]


def run(owners: list[list[int]], weights: list[int], seed: int, crashes: int = 0) -> Cluster:
    cluster = Cluster(owners, seed)
    asyncio.run(cluster.run(weights, crashes))
    return cluster


def test_one_and_three_workers_emit_the_same_trails_and_cut_the_same_versions() -> None:
    alone = run([[0, 1, 2, 3]], [1], seed=1)
    together = run([[0], [1, 2], [3]], [5, 1, 3], seed=2)
    assert len(versions(alone.records)) > 20
    assert versions(alone.records) == versions(together.records)
    a, b = alone.trails(), together.trails()
    assert a.keys() == b.keys() and len(a) > 1000
    same = [c for c in a if a[c] == b[c]]
    assert len(same) == len(a), [c for c in a if a[c] != b[c]][:5]
    kinds = {component for trail in a.values() for _, component, _ in trail}
    assert {"cluster", "propensity"} <= kinds  # the models mattered
    waits = sum(w.counts.model_waits for w, _, _ in together.workers)
    assert waits > 0 and all(w.counts.model_waits_expired == 0 for w, _, _ in together.workers)


def test_a_trainer_restored_from_any_record_makes_the_same_records() -> None:
    cluster = run([[0, 1], [2, 3]], [1, 2], seed=3)
    s, log, records = cluster.s, cluster.log, cluster.records
    progress = [r for r in records if learned(r)[0] != learned(r)[1]]
    assert progress  # progress records too (learned past their newest version)
    for data in records[::3] + progress:
        restored = SharedTrainer(decode_version(s, data), s.epochs(), PARTITIONS)
        again: list[bytes] = []
        for offset in range(restored.next_offset, len(log)):
            again += restored.read(ExampleBatch.from_bytes(log[offset]), offset)
        cut_at = learned(data)[1]
        later = [v for v in versions(records) if v[0] > cut_at]
        assert versions(again) == later
        assert (
            restored.examples + restored.pending
            == cluster.trainer.examples + cluster.trainer.pending
        )


def test_a_zombie_trainers_late_records_change_nothing() -> None:
    """A trainer paused past its session timeout (a zombie) wakes up after another took over
    and publishes what it had, once more, after the newest records. That is not fenced, and
    need not be: a trainer's records are a function of the examples log alone. The zombie's
    versions equal those already published for their boundaries, a worker's shelf only moves
    forward, and a trainer that restores from the zombie's stale record (now the newest under
    the app key) makes exactly the versions that followed it."""
    cluster = run([[0, 1], [2, 3]], [1, 2], seed=3)
    s, log, records = cluster.s, cluster.log, cluster.records
    asleep_at = records[len(records) // 3]
    zombie = SharedTrainer(decode_version(s, asleep_at), s.epochs(), PARTITIONS)
    late: list[bytes] = []
    for offset in range(zombie.next_offset, zombie.next_offset + 20):
        late += zombie.read(ExampleBatch.from_bytes(log[offset]), offset)
    late.append(zombie.progress_record())  # what it publishes when it learns it was revoked
    assert versions(late)  # it had versions to publish
    published = {v[0]: v for v in versions(records)}
    assert all(published[v[0]] == v for v in versions(late))

    shelf = ModelShelf(SegmentModels(s.segmentation), s.epochs())
    for data in records:
        shelf.offer(decode_version(s, data))
    known, boundaries = shelf.known_until, list(shelf._boundaries)
    for data in late:
        shelf.offer(decode_version(s, data))
    assert (shelf.known_until, shelf._boundaries) == (known, boundaries)

    stale = SharedTrainer(decode_version(s, late[-1]), s.epochs(), PARTITIONS)
    again: list[bytes] = []
    for offset in range(stale.next_offset, len(log)):
        again += stale.read(ExampleBatch.from_bytes(log[offset]), offset)
    cut_at = learned(late[-1])[1]
    assert versions(again) == [v for v in versions(records) if v[0] > cut_at]


def test_workers_killed_between_batches_emit_the_same_trails() -> None:
    """A new owner starts from the partition's stored clock: the trainer holds the partition to
    the promises its previous owner sent (none of its examples may come late)."""
    calm = run([[0, 1], [2, 3]], [1, 1], seed=4)
    killed = run([[0, 1], [2, 3]], [1, 1], seed=4, crashes=6)
    assert killed.trainer.late == 0
    assert versions(killed.records) == versions(calm.records)
    assert killed.trails() == calm.trails()


class HalfWriting(Cluster):
    """Now and then a worker dies in the middle of writing a batch: some of its states reach
    the changelog, its marker does not; the batch's messages are read again by a new process."""

    def __init__(self, owners: list[list[int]], seed: int) -> None:
        super().__init__(owners, seed)
        self.steps = 0
        self.deaths = 0

    async def step(self, n: int) -> bool:
        self.steps += 1
        if self.steps % 29 or self.deaths >= 6:
            return await super().step(n)
        feeds = {p: list(feed) for p, feed in self.feeds.items()}
        held = sorted(
            (h.item.origin.offset, h.item.origin.topic, merge.partition, h.item)
            for merge in self.workers[n][0].merges.values()
            for queue in merge.queues.values()
            for h in queue
        )
        self.table.budget = self.rng.randint(1, 8)
        try:
            return await super().step(n)
        except TableDiedError:
            self.deaths += 1
            # Nothing the batch processed was acked: what it read is read again, and what the
            # process held before it (still held, or processed in the batch that died).
            self.feeds = feeds
            for offset, topic, partition, item in reversed(held):
                self.feeds[partition].insert(0, (topic, item.key, item.payload, offset))
            for merge in self.workers[n][0].merges.values():
                for queue in merge.queues.values():
                    queue.clear()
            self.crash(n)
            return True
        finally:
            self.table.budget = None


def test_a_worker_killed_while_writing_a_batch_loses_no_examples() -> None:
    """The durable states of a half-written batch make their events duplicates for the next
    process; the examples learned from them are kept with those states and recovered, so the
    trainer still learns every example once: the same versions and trails as a calm run."""
    calm = run([[0, 1], [2, 3]], [1, 1], seed=4)
    killed = HalfWriting([[0, 1], [2, 3]], seed=4)
    asyncio.run(killed.run([1, 1]))
    assert killed.deaths >= 3
    assert killed.trainer.late == 0
    assert versions(killed.records) == versions(calm.records)
    assert killed.trails() == calm.trails()


def test_a_trainer_that_has_cut_nothing_yet_hands_over_a_record() -> None:
    """At a rebalance the trainer hands over what it has; before every partition has said how
    far it is, nothing is closed (the record must still be valid, or the trainer thread died)."""
    s = settings()
    trainer = SharedTrainer(SegmentModels(s.segmentation), s.epochs(), PARTITIONS)
    assert trainer.read(ExampleBatch(source="p0", batch=1, examples=[], promise=5.0), 0) == []
    restored = SharedTrainer(decode_version(s, trainer.progress_record()), s.epochs(), PARTITIONS)
    assert restored.closed_until == -math.inf and restored.next_offset == 1
    assert restored.promises == {"p0": 5.0} and restored.hwm == {"p0": 1}


class QuietPartition(Cluster):
    """Partition 0 goes quiet early in the backlog; the worker's timer runs between batches."""

    def __init__(self, idle_after_s: float) -> None:
        super().__init__([[0, 1, 2, 3]], seed=1, s=settings(idle_after_s))
        self.feeds[0] = self.feeds[0][:60]

    async def step(self, n: int) -> bool:
        moved = await super().step(n)
        for done in await self.workers[n][0].flush_idle():  # the release-held-events timer
            del done
        return moved


def test_a_quiet_partition_holds_every_other_one_until_it_says_it_is_idle() -> None:
    """Without idleness the other partitions wait for versions that need partition 0's
    promise, forever (live: until model_wait_max_s, then unaligned, and the model stops
    learning). Announced idle, it is left out of the frontier: versions are cut past its
    clock, every held event is scored, and nothing is late."""
    stuck = QuietPartition(idle_after_s=3600.0)
    with pytest.raises(AssertionError, match="stuck"):
        asyncio.run(stuck.run([1]))
    quiet = QuietPartition(idle_after_s=0.001)
    asyncio.run(quiet.run([1]))
    worker = quiet.workers[0][0]
    assert 0 in worker.idle_partitions()
    assert quiet.trainer.late == 0
    p0_clock = worker.processors[0].watermark
    assert quiet.trainer.closed_until > p0_clock + 30 * 86400  # the model went on learning
    assert quiet.trainer.examples > stuck.trainer.examples
    sent = [ExampleBatch.from_bytes(v) for v in quiet.log]
    assert any(b.source == "p0" and b.idle for b in sent)
    assert not any(b.idle and b.examples for b in sent)  # an idle record carries nothing


def test_a_partition_waiting_for_its_version_does_not_rewrite_its_marker() -> None:
    """While events wait for a version, the timer visits their partitions every 0.1 s; with
    nothing new (no state, example, promise or clock) no marker is written (each write is a
    changelog record)."""
    stuck = QuietPartition(idle_after_s=3600.0)
    with pytest.raises(AssertionError, match="stuck"):
        asyncio.run(stuck.run([1]))
    writes: list[bytes] = []

    class Counted(PartitionedTable):
        def __setitem__(self, key: bytes, value: bytes) -> None:
            writes.append(key)
            super().__setitem__(key, value)

    stuck.table.__class__ = Counted
    worker = stuck.workers[0][0]
    assert worker.held() > 0  # events wait for their version

    async def visits() -> None:
        for _ in range(30):
            assert await worker.flush_idle() == []

    asyncio.run(visits())
    assert writes == []


def test_an_idle_source_is_left_out_of_the_frontier_until_it_sends_again() -> None:
    s = settings()
    trainer = SharedTrainer(SegmentModels(s.segmentation), s.epochs(), 2)
    trainer.read(ExampleBatch(source="p0", batch=1, examples=[], promise=100.0), 0)
    trainer.read(ExampleBatch(source="p1", batch=1, examples=[], promise=500.0), 1)
    assert trainer.frontier() == 100.0
    trainer.read(ExampleBatch(source="p0", batch=2, examples=[], promise=None, idle=True), 2)
    assert trainer.frontier() == 500.0 and trainer.idle == {"p0"}
    # A record made now restores the idle source; a duplicate idle record changes nothing.
    restored = SharedTrainer(decode_version(s, trainer.progress_record()), s.epochs(), 2)
    assert restored.idle == {"p0"} and restored.frontier() == 500.0
    trainer.read(ExampleBatch(source="p0", batch=2, examples=[], idle=True), 3)
    assert trainer.duplicates == 1
    trainer.read(ExampleBatch(source="p0", batch=3, examples=[], promise=700.0), 4)
    assert trainer.idle == set() and trainer.frontier() == 500.0
    # All idle: the least promise (nothing is coming, nothing is closed past any promise).
    for n, source in enumerate(("p0", "p1")):
        trainer.read(ExampleBatch(source=source, batch=9, examples=[], idle=True), 5 + n)
    assert trainer.frontier() == 500.0
    # A source that never sent anything but says it is idle does not hold the others.
    fresh = SharedTrainer(SegmentModels(s.segmentation), s.epochs(), 2)
    fresh.read(ExampleBatch(source="p1", batch=1, examples=[], promise=50.0), 0)
    assert fresh.frontier() == -math.inf
    fresh.read(ExampleBatch(source="p0", batch=0, examples=[], idle=True), 1)
    assert fresh.frontier() == 50.0


def test_an_idle_source_with_input_again_is_waited_for() -> None:
    """A backlog published into a quiet deployment: the source that reads first must not cut
    versions past a source that said it is idle but has input again (its examples would all be
    late). The trainer asks which idle sources are still idle, only when idleness would let
    versions go further."""
    s = settings()
    asked: list[set[str]] = []
    unread = {"p0"}

    def still_idle(sources: set[str]) -> set[str]:
        asked.append(set(sources))
        return sources - unread

    trainer = SharedTrainer(SegmentModels(s.segmentation), s.epochs(), 2, still_idle=still_idle)
    trainer.read(ExampleBatch(source="p0", batch=0, examples=[], idle=True), 0)
    assert asked == []  # p1 has said nothing: idleness changes nothing yet
    trainer.read(ExampleBatch(source="p1", batch=1, examples=[], promise=500.0), 1)
    assert trainer.frontier() == -math.inf and asked[-1] == {"p0"}  # p0 has input: waited for
    unread.clear()
    assert trainer.frontier() == 500.0  # read to its end: idle after all
    unread.add("p0")
    trainer.read(ExampleBatch(source="p0", batch=1, examples=[], promise=100.0), 2)
    assert trainer.idle == set() and trainer.frontier() == 100.0 and trainer.late == 0
    calls = len(asked)
    assert trainer.frontier() == 100.0 and len(asked) == calls  # nobody idle: nothing asked


def test_the_trainers_input_progress_tells_idle_sources_from_awake_ones() -> None:
    """Live, a source is still idle when the app group's committed offsets are at its input
    partitions' ends; an answer is reused for IDLE_CHECK_S, and a broker that cannot answer
    makes the source count as awake (versions wait; nothing is dropped as late)."""
    from confluent_kafka import KafkaException

    from stream_app.live.trainer import IDLE_CHECK_S, InputProgress

    now = [0.0]
    progress = InputProgress(settings(), clock=lambda: now[0])
    ends = {0: False, 1: True}  # partition -> has unread input
    calls: list[int] = []

    def unread(partition: int) -> bool:
        calls.append(partition)
        if partition == 2:
            raise KafkaException("broker gone")
        return ends[partition]

    progress._unread = unread  # type: ignore[method-assign]
    assert progress.still_idle({"p0", "p1", "p2"}) == {"p0"}
    ends[0] = True
    now[0] += IDLE_CHECK_S / 2
    assert progress.still_idle({"p0"}) == {"p0"} and calls == [0, 1, 2]  # reused
    now[0] += IDLE_CHECK_S
    assert progress.still_idle({"p0"}) == set() and calls[-1] == 0
