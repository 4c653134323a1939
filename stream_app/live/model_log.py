"""The models topic as a log: its keys, reading all of it, and the trainer's bounded history.

The topic has one partition and is compacted: Kafka keeps the newest record per key. Its keys:

* ``<app_id>``: the newest version (the trainer publishes every version here; a worker with
  ``learning=in_process`` writes its snapshots here). Workers follow this key and no other.
* ``<app_id>/history/<version>``: a copy of some versions, so ``stream-app models list`` has
  something to list and ``models pin`` something to pin: the first version, then at most one
  per ``model_history_interval_s``. Each key is unique, so compaction keeps every one; the
  trainer bounds them to the newest ``model_history_keep`` by writing tombstones for older ones.
* ``<app_id>/recent/<n>``: every version a trainer cuts, again, with ``n`` its epoch number
  modulo ``model_recent_keep``: compaction keeps the newest versions of that many epochs, which
  a restarted worker needs to score the events it reads again as they were scored before.
* ``<app_id>/bootstrap``: the record `stream-app bootstrap` wrote (it scores what comes before
  the trainer's first version, and the trainer's first version replaces it under the app key).
* ``<app_id>/pin``: set by ``stream-app models pin``: a copy of the pinned version's record
  (so it outlives the history), with the time that version was published in the header
  ``stream-app-published-ms``. While it is set, every worker scores with it and ignores newer
  versions; ``models unpin`` writes a tombstone and they follow the newest again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import Consumer, KafkaException, TopicPartition

from stream_app.kafka.topics import librdkafka_log
from stream_app.settings import Settings

log = logging.getLogger(__name__)

HISTORY: Final = "/history/"
RECENT: Final = "/recent/"
BOOTSTRAP: Final = "/bootstrap"
PIN: Final = "/pin"
PUBLISHED_HEADER: Final = "stream-app-published-ms"


def newest_key(app_id: str) -> bytes:
    return app_id.encode()


def history_key(app_id: str, version: str) -> bytes:
    return f"{app_id}{HISTORY}{version}".encode()


def recent_key(app_id: str, boundary: float, epoch_s: float, keep: int) -> bytes:
    """Where the version cut at epoch `boundary` is kept against compaction (a ring of `keep`)."""
    return f"{app_id}{RECENT}{int(boundary // epoch_s) % keep}".encode()


def bootstrap_key(app_id: str) -> bytes:
    return f"{app_id}{BOOTSTRAP}".encode()


def is_followed_key(app_id: str, key: bytes | None) -> bool:
    """A key whose records workers follow: the newest, the recent versions, the bootstrap."""
    if key is None:
        return False
    return key in (newest_key(app_id), bootstrap_key(app_id)) or key.startswith(
        f"{app_id}{RECENT}".encode()
    )


def pin_key(app_id: str) -> bytes:
    return f"{app_id}{PIN}".encode()


def is_history_key(app_id: str, key: bytes | None) -> bool:
    return key is not None and key.startswith(f"{app_id}{HISTORY}".encode())


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record of the models topic, as read (``value`` None: a tombstone)."""

    key: bytes | None
    value: bytes | None
    offset: int
    timestamp_ms: int | None
    headers: dict[str, bytes]


def read_model_log(settings: Settings, timeout: float = 10.0) -> list[LogRecord]:
    """Every record the models topic still holds, oldest first (KafkaException if unreadable)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"{settings.app_id}-model-log",
            "enable.auto.commit": False,
        },
        logger=librdkafka_log(),
    )
    try:
        tp = TopicPartition(settings.model_snapshots_topic, 0)
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
        out: list[LogRecord] = []
        if high <= low:
            return out
        consumer.assign([TopicPartition(settings.model_snapshots_topic, 0, low)])
        while True:
            msg = consumer.poll(timeout)
            if msg is None:
                return out  # the rest is gone (compacted or deleted meanwhile)
            offset = msg.offset()
            if msg.error() is None and offset is not None:
                kind, stamp = msg.timestamp()
                out.append(
                    LogRecord(
                        key=msg.key(),
                        value=msg.value(),
                        offset=offset,
                        timestamp_ms=stamp if kind and stamp >= 0 else None,
                        headers={k: v for k, v in (msg.headers() or []) if v is not None},
                    )
                )
            if offset is not None and offset >= high - 1:
                return out
    finally:
        consumer.close()


def live_history(settings: Settings, records: list[LogRecord]) -> list[LogRecord]:
    """The history records not tombstoned since, in the order they were written."""
    kept: dict[bytes, LogRecord] = {}
    for record in records:
        if not is_history_key(settings.app_id, record.key):
            continue
        assert record.key is not None
        kept.pop(record.key, None)
        if record.value is not None:
            kept[record.key] = record
    return list(kept.values())


class ModelHistory:
    """What the trainer adds to the history after it published a version (best effort: a
    failure here is logged and never stops the newest version from being published)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._keys: list[bytes] | None = None  # on the topic, oldest first; None: read it first
        self._last_ms: int | None = None

    def forget(self) -> None:
        """Read the topic again before the next addition (another worker may have trained)."""
        self._keys, self._last_ms = None, None

    def due(self, now_ms: int) -> bool:
        last = self._last_ms
        return last is None or now_ms - last >= self.settings.model_history_interval_s * 1000

    def after_publish(self, producer: Any, data: bytes, version: str) -> bool:
        """Keep `data` (the version just published) in the history if one is due; True if so."""
        s = self.settings
        try:
            if self._keys is None:
                history = live_history(s, read_model_log(s))
                self._keys = [r.key for r in history if r.key is not None]
                stamps = [r.timestamp_ms for r in history if r.timestamp_ms is not None]
                self._last_ms = max(stamps, default=None)
            now_ms = int(time.time() * 1000)
            if not self.due(now_ms):
                return False
            key = history_key(s.app_id, version)
            keys = [k for k in self._keys if k != key] + [key]
            stale = keys[: max(0, len(keys) - s.model_history_keep)]
            topic = s.model_snapshots_topic
            producer.produce(topic, key=key, value=data, partition=0, timestamp=now_ms)
            for old in stale:
                producer.produce(topic, key=old, value=None, partition=0)
            if producer.flush(30):
                log.error("model history not acknowledged by the broker; trying again later")
                return False
        except KafkaException as exc:
            log.warning("model history not updated: %s", exc.args[0])
            return False
        self._keys, self._last_ms = keys[len(stale) :], now_ms
        log.info(
            "kept model version %s in the history (%d kept, %d dropped)",
            version,
            len(self._keys),
            len(stale),
        )
        return True
