"""Baseline: the same work as the worker in a plain confluent-kafka consumer loop, without Faust.

What a user could build by hand: ``Consumer`` over both input topics, a batch of what it has
fetched (up to ``batch_max_events``) -> :class:`LivePipeline.handle_batch` (decode, ordered merge,
Processor, outbox) -> ``Producer`` to the output topics. Customer state is kept as the worker keeps
it: the pipeline's TableStore (state cache, one write per customer per batch) over one RocksDB per
partition (rocksdict, the options Faust uses) plus a record on the compacted changelog per write;
model snapshots go to their compacted topic every ``model_snapshot_interval_s``. Offsets are
committed at least once a second, only after the producer has delivered everything sent so far
(at-least-once, like the worker).

Configured by STREAM_APP_* variables exactly like the worker; serves ``/ready``, ``/counts`` and
``/metrics`` on ``STREAM_APP_WEB_PORT``. SIGTERM drains, flushes, commits and exits 0.

    python -m load_tests.baselines.plain_loop
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator, MutableMapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

import orjson
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from rocksdict import BlockBasedOptions, Cache, Options, Rdict

from stream_app.contracts.events import MessageOrigin
from stream_app.core.models import SegmentModels
from stream_app.live.pipeline import LivePipeline, RawMessage
from stream_app.live.store import TableStore
from stream_app.settings import Settings

COMMIT_INTERVAL_S: Final = 1.0
FLUSH_IDLE_INTERVAL_S: Final = 0.1


def rocksdb_options(block_cache_bytes: int) -> Options:
    """The options Faust's rocksdict store uses (faust/stores/rocksdb.py), so the work matches."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_max_open_files(943719)
    options.set_write_buffer_size(67108864)
    options.set_target_file_size_base(67108864)
    options.set_max_write_buffer_number(3)
    table = BlockBasedOptions()
    table.set_bloom_filter(3, block_based=True)
    table.set_block_cache(Cache(block_cache_bytes))
    options.set_block_based_table_factory(table)
    return options


class RocksChangelog(MutableMapping[bytes, bytes]):
    """One partition's customer states in RocksDB; every write is also sent to the compacted
    changelog topic, as a Faust table does. The pipeline's :class:`TableStore` sits on top, so
    the state cache and the one-write-per-customer-per-batch are the worker's too."""

    def __init__(self, db: Rdict, producer: Producer, changelog: str, partition: int) -> None:
        self.db, self.producer, self.changelog, self.partition = db, producer, changelog, partition

    def __getitem__(self, key: bytes) -> bytes:
        value = self.db.get(key)
        if value is None:
            raise KeyError(key)
        found: bytes = value
        return found

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.db[key] = value
        _produce(self.producer, self.changelog, key, value, partition=self.partition)

    def __delitem__(self, key: bytes) -> None:
        if self.db.get(key) is None:
            raise KeyError(key)
        self.db.delete(key)
        _produce(self.producer, self.changelog, key, None, partition=self.partition)

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self.db.keys()))

    def __len__(self) -> int:
        return sum(1 for _ in self.db.keys())  # noqa: SIM118 (an Rdict iterates items)


def _produce(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    partition: int = -1,
    on_delivery: Any = None,
) -> None:
    while True:
        try:
            if on_delivery is None:
                producer.produce(topic, key=key, value=value, partition=partition)
            else:
                producer.produce(
                    topic, key=key, value=value, partition=partition, on_delivery=on_delivery
                )
            return
        except BufferError:
            producer.poll(0.01)


class KafkaSinks:
    """The pipeline's outputs on a confluent-kafka Producer; a change's future completes when
    the broker acknowledges it (the pipeline's outbox uses that)."""

    def __init__(self, producer: Producer, settings: Settings) -> None:
        self.producer, self.settings = producer, settings

    async def change(self, customer_id: str, value: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def delivered(err: Any, _msg: Any) -> None:
            if future.done():
                return
            if err is None:
                future.set_result(None)
            else:
                future.set_exception(RuntimeError(str(err)))

        _produce(
            self.producer,
            self.settings.segment_changes_topic,
            customer_id.encode(),
            value,
            on_delivery=delivered,
        )
        return future

    async def membership(self, customer_id: str, value: bytes) -> None:
        _produce(self.producer, self.settings.segment_membership_topic, customer_id.encode(), value)

    async def dead_letter(self, key: bytes | None, value: bytes) -> None:
        _produce(self.producer, self.settings.dead_letters_topic, key, value)

    async def reroute(self, topic: str, key: bytes, value: bytes) -> None:
        _produce(self.producer, topic, key, value)


class PlainLoop:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.datadir = settings.state_dir.expanduser().resolve() / "plain-loop" / settings.app_id
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.producer = Producer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "partitioner": "murmur2_random",
                "linger.ms": settings.producer_linger_s * 1000,
                "enable.idempotence": True,
            }
        )
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "group.id": settings.app_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 100,
            }
        )
        self.dbs: dict[int, Rdict] = {}
        self.pipeline = LivePipeline(
            settings,
            self._store,
            KafkaSinks(self.producer, settings),
            models=SegmentModels(settings.segmentation),
            has_more=self._has_more,
            merge_max_wait_s=settings.merge_max_wait_s,
        )
        self.assigned = threading.Event()
        self.stopping = False
        self.batch = settings.batch_max_events
        self.done: dict[tuple[str, int], int] = {}  # next offset to commit per partition

    def _store(self, partition: int) -> TableStore:
        db = self.dbs.get(partition)
        if db is None:
            options = rocksdb_options(self.settings.rocksdb_block_cache_bytes)
            db = self.dbs[partition] = Rdict(str(self.datadir / f"p{partition}"), options)
        table = RocksChangelog(
            db, self.producer, self.settings.customers_changelog_topic, partition
        )
        return TableStore(
            table, partition, self.settings.partitions, self.settings.state_cache_size
        )

    def _has_more(self, topic: str, partition: int) -> bool:
        try:
            _low, high = self.consumer.get_watermark_offsets(
                TopicPartition(topic, partition), cached=True
            )
        except Exception:
            return True
        if high is None or high < 0:
            return True
        unread: bool = self.pipeline.last_offsets.get((topic, partition), -1) + 1 < high
        return unread

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned.set()

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._commit()
        self.pipeline.forget_partitions({tp.partition for tp in partitions})

    def _mark(self, tokens: list[Any]) -> None:
        for token in tokens:
            if token is not None:
                topic, partition, offset = token
                if offset + 1 > self.done.get((topic, partition), 0):
                    self.done[(topic, partition)] = offset + 1

    def _commit(self) -> None:
        """Offsets only after every output sent so far is acknowledged (at-least-once)."""
        if not self.done:
            return
        self.producer.flush(30)
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.done.items()]
        with contextlib.suppress(Exception):
            self.consumer.commit(offsets=offsets, asynchronous=False)

    def _snapshot(self) -> None:
        _produce(
            self.producer,
            self.settings.model_snapshots_topic,
            self.settings.app_id.encode(),
            self.pipeline.models.snapshot(),
            partition=0,
        )
        self.pipeline.update_quality_metrics()

    async def run(self) -> None:
        self.consumer.subscribe(
            list(self.settings.input_topics), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        last_commit = last_flush = last_snapshot = time.monotonic()
        while not self.stopping:
            first = self.consumer.poll(0.05)
            messages = [] if first is None else [first, *self.consumer.consume(self.batch - 1, 0)]
            batch: list[RawMessage] = []
            for msg in messages:
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        print(f"consumer error: {error}", flush=True)
                    continue
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                origin = MessageOrigin(topic=topic, partition=partition, offset=offset)
                batch.append((msg.key(), msg.value(), origin, (topic, partition, offset)))
            if batch:
                self._mark(await self.pipeline.handle_batch(batch))
            now = time.monotonic()
            if now - last_flush >= FLUSH_IDLE_INTERVAL_S:
                self._mark(await self.pipeline.flush_idle())
                last_flush = now
            self.producer.poll(0)
            await asyncio.sleep(0)  # let delivery futures run their callbacks (outbox acks)
            if now - last_commit >= COMMIT_INTERVAL_S:
                self._commit()
                last_commit = now
            if now - last_snapshot >= self.settings.model_snapshot_interval_s:
                self._snapshot()
                last_snapshot = now
        self._mark(await self.pipeline.flush_idle())
        self._snapshot()
        self._commit()
        self.consumer.close()
        for db in self.dbs.values():
            db.close()


def serve(loop: PlainLoop) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/ready":
                ready = loop.assigned.is_set()
                self._send(200 if ready else 503, orjson.dumps({"assigned": ready}), "json")
            elif self.path == "/health":
                self._send(200, b'{"status":"ok"}', "json")
            elif self.path == "/counts":
                self._send(200, orjson.dumps(_snapshot_counts(loop)), "json")
            elif self.path == "/metrics":
                self._send(200, loop.pipeline.metrics.render(), "text")
            else:
                self._send(404, b"{}", "json")

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            content = "application/json" if kind == "json" else "text/plain; version=0.0.4"
            self.send_header("Content-Type", content)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((loop.settings.web_host, loop.settings.web_port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def _snapshot_counts(loop: PlainLoop) -> dict[str, Any]:
    for _ in range(5):  # the loop thread may be updating a counter right now
        with contextlib.suppress(RuntimeError):
            return loop.pipeline.counts.snapshot()
    return {}


def main() -> None:
    settings = Settings()
    loop = PlainLoop(settings)
    server = serve(loop)

    def stop(_signum: int, _frame: Any) -> None:
        loop.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        asyncio.run(loop.run())
    finally:
        server.shutdown()
        loop.producer.flush(30)


if __name__ == "__main__":
    main()
