"""Shared learning, live: one trainer for every worker, and each worker following its versions.

* :class:`TrainerService` runs in every worker and joins the consumer group ``<app>-trainer`` on
  the one-partition examples topic, so Kafka gives the partition, and with it the trainer, to
  exactly one worker and moves it when that worker fails (after the session timeout). On
  assignment it restores the newest version from the models topic and continues at the offset
  that version records; it learns every example batch in order (:class:`core.learning.Trainer`
  drops a batch a worker sent again) and publishes a version every ``model_publish_examples``
  examples or ``model_publish_interval_s``. So after any crash nothing is learned twice or lost.
* :class:`ModelFollower` runs in every worker: a plain consumer on the compacted models topic
  (not Faust's GlobalTable: faust-streaming #283) that checks each record
  (``core.model_format``) and offers the newest good version to the pipeline, which switches at
  its next batch. A record that fails any check is refused with one log line; the worker keeps
  scoring with the version it has. While ``stream-app models pin`` has set a pin, it offers the
  pinned version instead and ignores newer ones until ``models unpin`` (``live.model_log``).

Both are threads with their own confluent-kafka clients, so learning never runs on the event
loop that serves the partitions.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from stream_app.core.learning import ExampleBatch, SharedTrainer, Trainer
from stream_app.core.model_format import (
    SnapshotError,
    is_progress_record,
    record_digest,
    record_version,
    version_boundary,
)
from stream_app.core.models import SegmentModels
from stream_app.kafka.topics import librdkafka_log
from stream_app.live.model_log import (
    ModelHistory,
    is_followed_key,
    newest_key,
    pin_key,
    read_model_log,
    recent_key,
)
from stream_app.settings import Settings

log = logging.getLogger(__name__)

POLL_S: Final = 0.2


def latest_model_record(
    settings: Settings, timeout: float = 10.0, *, honour_pin: bool = False
) -> bytes | None:
    """The newest record under this app's exact key on the models topic, or None (history and
    pin keys are never "the newest"). With `honour_pin`, a pin set (and not unpinned since)
    wins: a worker starting during an incident scores with the pinned version from the start."""
    records = read_model_log(settings, timeout)
    if honour_pin:
        pins = [r.value for r in records if r.key == pin_key(settings.app_id)]
        if pins and pins[-1]:  # a tombstone (None) is an unpin
            return pins[-1]
    key = settings.app_id.encode()
    latest = [r.value for r in records if r.key == key and r.value]
    return latest[-1] if latest else None


def relearn_examples(settings: Settings, models: SegmentModels, timeout: float = 10.0) -> int:
    """Deterministic mode, at start: learn, in log order, the example batches after the
    restored snapshot's position (each source's batches it already holds are skipped), so the
    models are exactly those of the last durable batch. Returns the examples learned."""
    trainer = Trainer(models)
    before = trainer.progress.examples
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"{settings.app_id}-relearn",
            "enable.auto.commit": False,
        },
        logger=librdkafka_log(),
    )
    topic = settings.learning_examples_topic
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
        start = max(low, trainer.progress.next_offset)
        if low > trainer.progress.next_offset:
            log.warning(
                "examples %d..%d after the stored snapshot are gone (retention): the models "
                "lack what they taught; raise the examples topic's retention.ms",
                trainer.progress.next_offset,
                low - 1,
            )
        log.info("examples log %s: offsets %d..%d, re-learning from %d", topic, low, high, start)
        if high <= start:
            return 0
        consumer.assign([TopicPartition(topic, 0, start)])
        trainer.progress.next_offset = start
        while trainer.progress.next_offset < high:
            msg = consumer.poll(timeout)
            if msg is None:
                raise RuntimeError(f"examples log ended at {trainer.progress.next_offset} < {high}")
            if msg.error() is not None:
                continue
            try:
                batch = ExampleBatch.from_bytes(msg.value() or b"")
            except ValueError as exc:
                log.warning("skipped a malformed example batch at %d: %s", msg.offset(), exc)
                trainer.progress.next_offset = msg.offset() + 1
                continue
            trainer.learn(batch, msg.offset())
    finally:
        consumer.close()
    models.trainer = trainer.progress.to_params()
    return trainer.progress.examples - before


def decode_version(settings: Settings, data: bytes) -> SegmentModels:
    """A model version from a record, stamped with its content id (SnapshotError if refused)."""
    models = SegmentModels(settings.segmentation)
    models.restore(data, settings.model_signing_keys)
    models.stamp = record_version(data)
    return models


class _Thread:
    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._guarded, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _guarded(self) -> None:
        while not self._stop.is_set():
            try:
                self.run()
                return
            except Exception:
                log.exception("%s failed; restarting it in 1 s", self._thread.name)
                self._stop.wait(1.0)

    def run(self) -> None:
        raise NotImplementedError


Offer = Callable[[SegmentModels | None, bool], None]


class ModelFollower(_Thread):
    """Offers the pipeline every version the trainer publishes, in order (the worker keeps them
    by epoch: ``core.learning.ModelShelf``), as ``offer(version, False)``; while a pin is set
    (``stream-app models pin``; key ``<app_id>/pin``), the pinned one as ``offer(version,
    True)``, and ``offer(None, False)`` when it is removed. History keys
    (``<app_id>/history/...``) and anything else on the topic are never followed."""

    def __init__(self, settings: Settings, offer: Offer) -> None:
        super().__init__("model-follower")
        self.settings = settings
        self.offer = offer
        self.current: str | None = None  # the newest version offered
        self.pinned: str | None = None  # the pinned version while a good pin is set
        self.refused = 0
        self._records: list[bytes] = []
        self._seen: set[str] = set()  # params_sha256 of the records offered
        self._pin: bytes | None = None
        self._pin_changed = False

    def run(self) -> None:
        s = self.settings
        consumer = Consumer(
            {
                "bootstrap.servers": s.bootstrap_servers,
                "group.id": f"{s.app_id}-model-follower-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
            },
            logger=librdkafka_log(),
        )
        consumer.assign([TopicPartition(s.model_snapshots_topic, 0, OFFSET_BEGINNING)])
        try:
            while not self._stop.is_set():
                changed = False
                msg = consumer.poll(POLL_S)
                while msg is not None:  # a burst: offered together, in order
                    if msg.error() is None:
                        changed = self.take(msg.key(), msg.value()) or changed
                    msg = consumer.poll(0)
                if changed:
                    self.follow()
        finally:
            consumer.close()

    def take(self, key: bytes | None, value: bytes | None) -> bool:
        """Note one record of the models topic; True if it may change what to follow."""
        app = self.settings.app_id
        if is_followed_key(app, key) and value is not None:
            self._records.append(value)
            return True
        if key == pin_key(app):
            self._pin = value  # None: a tombstone, unpinned
            self._pin_changed = True
            return True
        return False  # a history key, or another app's: never followed

    def follow(self) -> None:
        """Offer the versions read since the last call, then the pin if it changed."""
        records, self._records = self._records, []
        for data in records:
            models = self._decode(data, pinned=False)
            if models is not None:
                self.current = models.stamp
                self.offer(models, False)
        if not self._pin_changed:
            return
        self._pin_changed = False
        if self._pin is not None:
            models = self._decode(self._pin, pinned=True, again=True)
            if models is not None:
                self.pinned = models.stamp
                self.offer(models, True)
                log.info("model version %s pinned: scoring with it until unpinned", models.stamp)
                return
            self._pin = None  # a refused pin is dropped: follow the newest
        if self.pinned is not None:
            log.info("model pin removed: following the newest version again")
            self.pinned = None
            self.offer(None, False)

    def _decode(self, data: bytes, pinned: bool, again: bool = False) -> SegmentModels | None:
        """The version in `data`, checked; None if refused, or (unless `again`) this very record
        was seen before (a record of a version seen before may carry the trainer further)."""
        try:
            version, digest = record_version(data), record_digest(data)
        except Exception:
            version = digest = "?"
        if digest in self._seen and not again:
            return None
        try:
            models = decode_version(self.settings, data)
        except SnapshotError as exc:
            self.refused += 1
            if pinned:
                log.warning("refused the pinned record %s, following the newest: %s", version, exc)
            else:
                log.warning("refused model record %s, keeping %s: %s", version, self.current, exc)
            return None
        self._seen.add(digest)
        if not pinned:
            log.debug("model version %s offered", models.stamp)
        return models


IDLE_CHECK_S: Final = 0.1


class InputProgress:
    """Whether the workers have read their input partitions to the end: the app group's
    committed offsets against the partitions' ends (a plain consumer in the app's group id that
    never joins it: it only asks for the group's commits)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._consumer: Consumer | None = None
        self._clock = clock
        self._idle: dict[str, float] = {}  # source -> when it was last seen with nothing unread

    def still_idle(self, sources: set[str]) -> set[str]:
        """Of these sources (``p<n>``: input partition n), those with nothing unread (an answer
        at most IDLE_CHECK_S old: the trainer asks at every batch while idleness matters); a
        source that cannot be told now counts as having input (versions wait, nothing drops)."""
        now = self._clock()
        idle = set()
        for source in sorted(sources):
            if now - self._idle.get(source, -math.inf) < IDLE_CHECK_S:
                idle.add(source)
                continue
            try:
                unread = self._unread(int(source[1:]))
            except (KafkaException, ValueError) as exc:
                log.debug("input progress unknown (%s): idle sources are waited for", exc)
                unread = True
            if unread:
                self._idle.pop(source, None)
            else:
                self._idle[source] = now
                idle.add(source)
        return idle

    def _unread(self, partition: int) -> bool:
        s = self.settings
        if self._consumer is None:
            self._consumer = Consumer(
                {
                    "bootstrap.servers": s.bootstrap_servers,
                    "group.id": s.app_id,
                    "enable.auto.commit": False,
                },
                logger=librdkafka_log(),
            )
        tps = [TopicPartition(topic, partition) for topic in s.input_topics]
        committed = self._consumer.committed(tps, timeout=5)
        for tp in committed:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=5)
            if high > max(tp.offset, low):
                return True
        return False

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


class TrainerService(_Thread):
    """The trainer, on whichever worker the group gives the examples partition to."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("trainer")
        self.settings = settings
        self.trainer: SharedTrainer | None = None
        self.published: str | None = None
        self.publications = 0
        self.bad_records = 0
        keys = settings.model_signing_keys
        self._signing_key = keys[0] if keys else None
        self._history = ModelHistory(settings)  # `stream-app models`: a bounded history
        self._inputs = InputProgress(settings)

    def snapshot(self) -> dict[str, Any]:
        """For /counts: whether this worker trains now, and how far."""
        trainer = self.trainer
        return {
            "active": trainer is not None,
            "published": self.published,
            "publications": self.publications,
            "bad_records": self.bad_records,
            **({} if trainer is None else {"progress": progress_of(trainer)}),
        }

    def run(self) -> None:
        s = self.settings
        consumer = Consumer(
            {
                "bootstrap.servers": s.bootstrap_servers,
                "group.id": f"{s.app_id}-trainer",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": int(s.consumer_session_timeout_s * 1000),
                "heartbeat.interval.ms": int(min(3.0, s.consumer_session_timeout_s / 3) * 1000),
            },
            logger=librdkafka_log(),
        )
        producer = Producer(
            {"bootstrap.servers": s.bootstrap_servers, "acks": "all", "enable.idempotence": True},
            logger=librdkafka_log(),
        )

        def assigned(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            if not partitions:  # a member without the partition: another worker trains
                return
            trainer = self._restore()
            for tp in partitions:
                tp.offset = trainer.next_offset
            consumer.assign(partitions)
            self.trainer = trainer
            self._history.forget()
            log.info(
                "trainer active on this worker: from offset %d, %d examples learned so far",
                trainer.next_offset,
                trainer.examples,
            )

        def revoked(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            if not partitions:
                return
            if self.trainer is not None:
                self._publish(producer, [self.trainer.progress_record()])
            self.trainer = None
            log.info("trainer handed over")

        consumer.subscribe([s.learning_examples_topic], on_assign=assigned, on_revoke=revoked)
        try:
            while not self._stop.is_set():
                msg = consumer.poll(POLL_S)
                if msg is not None:
                    self._learn(msg, producer)
        finally:
            try:
                if self.trainer is not None:
                    self._publish(producer, [self.trainer.progress_record()])
            finally:
                self.trainer = None
                consumer.close()  # leave the group at once: another worker takes over
                producer.flush(10)
                self._inputs.close()

    def _restore(self) -> SharedTrainer:
        s = self.settings
        keys = s.model_signing_keys
        key = keys[0] if keys else None
        data = latest_model_record(s)
        models = SegmentModels(s.segmentation)
        if data is not None:
            try:
                models = decode_version(s, data)
                self.published = models.stamp
            except SnapshotError as exc:
                log.error(
                    "trainer cannot continue from the stored version (%s): starting fresh", exc
                )
        return SharedTrainer(models, s.epochs(), s.partitions, key, self._inputs.still_idle)

    def _learn(self, msg: Any, producer: Producer) -> None:
        error = msg.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("examples topic: %s", error.str())
            return
        trainer = self.trainer
        if trainer is None:
            return
        try:
            batch = ExampleBatch.from_bytes(msg.value() or b"")
        except ValueError as exc:
            self.bad_records += 1
            trainer.skip(msg.offset())
            log.warning("skipped a malformed example batch at offset %d: %s", msg.offset(), exc)
            return
        late = trainer.late
        records = trainer.read(batch, msg.offset())
        if trainer.late > late and trainer.last_late is not None:
            source, number, at, closed = trainer.last_late
            log.warning(
                "%d late examples in batch %s#%d at offset %d (one learned at %.0f, every "
                "example before %.0f learned already): not learned",
                trainer.late - late,
                source,
                number,
                msg.offset(),
                at,
                closed,
            )
        if records:
            self._publish(producer, records)

    def _publish(self, producer: Producer, records: list[bytes]) -> None:
        s = self.settings
        for data in records:
            producer.produce(
                s.model_snapshots_topic, key=newest_key(s.app_id), value=data, partition=0
            )
            boundary = version_boundary(data)
            if math.isfinite(boundary) and not is_progress_record(data):
                # A version cut at an epoch boundary: kept against compaction too.
                key = recent_key(s.app_id, boundary, s.model_epoch_s, s.model_recent_keep)
                producer.produce(s.model_snapshots_topic, key=key, value=data, partition=0)
        remaining = producer.flush(30)
        if remaining:
            # The workers wait for them; a restarted trainer makes the very same records.
            log.error("%d model records not acknowledged by the broker", remaining)
            return
        for data in records:
            self.published = record_version(data)
            self.publications += 1
        # The history keeps the newest version of the lot, stamped after it: one kept for an
        # earlier record was stamped later than the newest, and `models list` (in time order)
        # showed an older version as the last one.
        versions = [data for data in records if not is_progress_record(data)]
        if versions:
            self._history.after_publish(producer, versions[-1], record_version(versions[-1]))
        trainer = self.trainer
        log.info(
            "published %d model record(s), newest %s (%s examples learned)",
            len(records),
            self.published,
            "?" if trainer is None else f"{trainer.examples:,}",
        )


def progress_of(trainer: SharedTrainer) -> dict[str, Any]:
    """How far the trainer has got, for /counts and the tests."""
    return {
        "next_offset": trainer.next_offset,
        "read_to": trainer.read_to,
        "examples": trainer.examples,
        "pending": trainer.pending,
        "duplicates": trainer.duplicates,
        "late": trainer.late,
        "idle": sorted(trainer.idle),
        "closed_until": None if trainer.closed_until == -math.inf else trainer.closed_until,
        "valid_from": trainer.valid_from,
        "sources": dict(sorted(trainer.hwm.items())),
    }
