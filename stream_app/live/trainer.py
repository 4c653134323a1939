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
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from stream_app.core.learning import ExampleBatch, Trainer
from stream_app.core.model_format import SnapshotError, record_version
from stream_app.core.models import SegmentModels
from stream_app.live.model_log import ModelHistory, newest_key, pin_key, read_model_log
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
        }
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


class ModelFollower(_Thread):
    """Offers the version to score with to `offer`: the pinned one while a pin is set
    (``stream-app models pin``; key ``<app_id>/pin``), else the newest under the app key.
    History keys (``<app_id>/history/...``) and anything else on the topic are never followed."""

    def __init__(self, settings: Settings, offer: Callable[[SegmentModels], None]) -> None:
        super().__init__("model-follower")
        self.settings = settings
        self.offer = offer
        self.current: str | None = None
        self.pinned: str | None = None  # the pinned version while a good pin is set
        self.refused = 0
        self._newest: bytes | None = None
        self._pin: bytes | None = None

    def run(self) -> None:
        s = self.settings
        consumer = Consumer(
            {
                "bootstrap.servers": s.bootstrap_servers,
                "group.id": f"{s.app_id}-model-follower-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
            }
        )
        consumer.assign([TopicPartition(s.model_snapshots_topic, 0, OFFSET_BEGINNING)])
        try:
            while not self._stop.is_set():
                changed = False
                msg = consumer.poll(POLL_S)
                while msg is not None:  # a burst: only the newest per key matters
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
        if key == newest_key(app) and value is not None:
            self._newest = value
            return True
        if key == pin_key(app):
            self._pin = value  # None: a tombstone, unpinned
            return True
        return False  # a history key, or another app's: never followed

    def follow(self) -> None:
        """Offer the pinned version, or the newest, unless it is the current one already."""
        if self._pin is not None:
            if self._consider(self._pin, pinned=True):
                return
            self._pin = None  # a refused pin is dropped: follow the newest
        if self.pinned is not None:
            log.info("model pin removed: following the newest version again")
            self.pinned = None
        if self._newest is not None:
            self._consider(self._newest, pinned=False)

    def _consider(self, data: bytes, pinned: bool) -> bool:
        """True when `data` is the version scored with now (offered, or already current)."""
        try:
            version = record_version(data)
        except Exception:
            version = "?"
        if version == self.current:
            self.pinned = version if pinned else None
            return True
        try:
            models = decode_version(self.settings, data)
        except SnapshotError as exc:
            self.refused += 1
            if pinned:
                log.warning("refused the pinned record %s, following the newest: %s", version, exc)
            else:
                log.warning("refused model record %s, keeping %s: %s", version, self.current, exc)
            return False
        self.current = models.stamp
        self.pinned = models.stamp if pinned else None
        self.offer(models)
        if pinned:
            log.info("model version %s pinned: scoring with it until unpinned", models.stamp)
        else:
            log.info("following model version %s", models.stamp)
        return True


class TrainerService(_Thread):
    """The trainer, on whichever worker the group gives the examples partition to."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("trainer")
        self.settings = settings
        self.trainer: Trainer | None = None
        self.published: str | None = None
        self.publications = 0
        self.bad_records = 0
        self._since_publish = 0
        self._published_at = time.monotonic()
        keys = settings.model_signing_keys
        self._signing_key = keys[0] if keys else None
        self._history = ModelHistory(settings)  # `stream-app models`: a bounded history

    def snapshot(self) -> dict[str, Any]:
        """For /counts: whether this worker trains now, and how far."""
        trainer = self.trainer
        return {
            "active": trainer is not None,
            "published": self.published,
            "publications": self.publications,
            "bad_records": self.bad_records,
            **({} if trainer is None else {"progress": trainer.progress.to_record()}),
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
            }
        )
        producer = Producer(
            {"bootstrap.servers": s.bootstrap_servers, "acks": "all", "enable.idempotence": True}
        )

        def assigned(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            if not partitions:  # a member without the partition: another worker trains
                return
            trainer = self._restore()
            for tp in partitions:
                tp.offset = trainer.progress.next_offset
            consumer.assign(partitions)
            self.trainer = trainer
            self._since_publish, self._published_at = 0, time.monotonic()
            self._history.forget()
            log.info(
                "trainer active on this worker: from offset %d, %d examples learned so far",
                trainer.progress.next_offset,
                trainer.progress.examples,
            )

        def revoked(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            if not partitions:
                return
            if self.trainer is not None:
                self._publish(producer)
            self.trainer = None
            log.info("trainer handed over")

        consumer.subscribe([s.learning_examples_topic], on_assign=assigned, on_revoke=revoked)
        try:
            while not self._stop.is_set():
                msg = consumer.poll(POLL_S)
                if msg is not None:
                    self._learn(msg)
                self._maybe_publish(producer)
        finally:
            if self.trainer is not None:
                self._publish(producer)
            consumer.close()
            producer.flush(10)

    def _restore(self) -> Trainer:
        data = latest_model_record(self.settings)
        if data is None:
            return Trainer(SegmentModels(self.settings.segmentation))
        try:
            models = decode_version(self.settings, data)
        except SnapshotError as exc:
            log.error("trainer cannot continue from the stored version (%s): starting fresh", exc)
            return Trainer(SegmentModels(self.settings.segmentation))
        self.published = models.stamp
        return Trainer(models)

    def _learn(self, msg: Any) -> None:
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
            trainer.progress.next_offset = max(trainer.progress.next_offset, msg.offset() + 1)
            log.warning("skipped a malformed example batch at offset %d: %s", msg.offset(), exc)
            return
        if trainer.learn(batch, msg.offset()):
            self._since_publish += len(batch.examples)

    def _maybe_publish(self, producer: Producer) -> None:
        s = self.settings
        if self.trainer is None or not self._since_publish:
            return
        due = time.monotonic() - self._published_at >= s.model_publish_interval_s
        if self._since_publish >= s.model_publish_examples or due:
            self._publish(producer)

    def _publish(self, producer: Producer) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        data = trainer.version(self._signing_key)
        s = self.settings
        producer.produce(s.model_snapshots_topic, key=s.app_id.encode(), value=data, partition=0)
        remaining = producer.flush(30)
        if remaining:
            log.error("model version not acknowledged by the broker; will publish again")
            return
        self.published = record_version(data)
        self.publications += 1
        self._since_publish, self._published_at = 0, time.monotonic()
        log.info(
            "published model version %s (%d examples learned, %d bytes)",
            self.published,
            trainer.progress.examples,
            len(data),
        )
        self._history.after_publish(producer, data, self.published)
