"""The Faust application: thin wiring around :class:`stream_app.live.pipeline.LivePipeline`.

One agent reads both input topics as raw bytes (so decoding and its errors stay ours) and hands
every message to the pipeline. Customer state lives in the ``customers`` table on RocksDB with a
compacted changelog; the model set is snapshotted to a compacted topic periodically and on
shutdown, and restored before the worker starts consuming.

Web endpoints on the worker's port: ``/health`` (the process serves), ``/ready`` (partitions
assigned and table recovery done), ``/metrics`` (Prometheus), ``/counts`` (JSON, this process),
``/segments`` (the live page of current segment sizes and model quality, ``live/pages.py``).
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import time
from collections.abc import Sequence
from typing import Any, Final

import faust

from stream_app.contracts.events import MessageOrigin
from stream_app.core.model_format import SnapshotError, record_version
from stream_app.core.models import SegmentModels
from stream_app.errors import UserError
from stream_app.kafka.topics import admin_client, wait_for_broker
from stream_app.live import faust_internals
from stream_app.live.log_reader import SkippedReader
from stream_app.live.metrics import Metrics
from stream_app.live.pages import add_live_page
from stream_app.live.pipeline import LivePipeline, RawMessage
from stream_app.live.store import TableStore
from stream_app.live.trainer import (
    ModelFollower,
    TrainerService,
    latest_model_record,
    relearn_examples,
)
from stream_app.logs import logging_config
from stream_app.settings import Settings

log = logging.getLogger(__name__)

COUNTS_PATH: Final = "/counts"
BROKER_WAIT_S: Final = 30.0
LAG_INTERVAL_S: Final = 5.0
MERGE_FLUSH_INTERVAL_S: Final = 0.1
DELIVERY_TURNS: Final = 4  # event-loop turns the agent waits for the fetcher's next message
CUSTOMERS_TABLE: Final = "customers"


class FaustSinks:
    """Outputs go straight to the app's producer (aiokafka's ``send``, default murmur2
    partitioner), skipping Faust's Topic.send layers (FutureMessage, callbacks, sensors per
    message). Faust still flushes this producer before it commits offsets, so an acked event's
    outputs are durable before its offset is committed. (Not transactional: see the README on
    exactly-once.)"""

    def __init__(self, app: Any, settings: Settings) -> None:
        self._app = app
        self._changes = settings.segment_changes_topic
        self._membership = settings.segment_membership_topic
        self._dead_letters = settings.dead_letters_topic

    async def change(self, customer_id: str, value: bytes) -> asyncio.Future[Any]:
        return await faust_internals.send_raw(self._app, self._changes, customer_id.encode(), value)

    async def membership(self, customer_id: str, value: bytes) -> None:
        await faust_internals.send_raw(self._app, self._membership, customer_id.encode(), value)

    async def dead_letter(self, key: bytes | None, value: bytes) -> None:
        await faust_internals.send_raw(self._app, self._dead_letters, key, value)

    async def reroute(self, topic: str, key: bytes, value: bytes) -> None:
        await faust_internals.send_raw(self._app, topic, key, value)


class ChangelogAcks:
    """Knows when the customer table's writes are durable.

    A Faust table write goes to RocksDB at once and to its changelog through the producer
    buffer (``send_soon``); nothing tells the writer when the broker has it, and the buffer's own
    ``flush`` gives up after 0.1 s without a send. So the table's ``send_changelog`` is wrapped
    to keep each record's future, and :meth:`wait` awaits them all: the broker's acknowledgement
    of every state write so far. The pipeline sends a batch's changes only after that."""

    def __init__(self, table: Any) -> None:
        self._pending: list[asyncio.Future[Any]] = []
        # The method, not `self._pending.append`: wait() swaps the list, and a bound append
        # kept filling the first one (from the second batch on, nothing was waited for).
        faust_internals.on_changelog_record(table, self._keep)

    def _keep(self, fut: asyncio.Future[Any]) -> None:
        self._pending.append(fut)

    async def wait(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def raw_topic(app: Any, *names: str) -> Any:
    """Raw bytes both ways. ``value_type=bytes`` alone is not enough: Faust would still apply
    the app-wide default serializer (json) and crash on malformed input before our code ran."""
    return app.topic(
        *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )


def faust_app(settings: Settings, store: str = "rocksdb://") -> Any:
    """The worker's Faust app with its tuned settings, before any table, agent or page (the load
    tests' Faust floor baseline builds on the same one)."""
    datadir = settings.state_dir.expanduser().resolve() / "faust" / settings.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=_broker_urls(settings.bootstrap_servers),
        datadir=str(datadir),
        store=store,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        # Do not wait for every message read to be acked before stopping (or revoking): events
        # held by the ordered merge (a transaction read ahead of clicks still unread) can only be
        # released by messages the stopped fetcher no longer delivers, so SIGTERM mid-backlog
        # waited forever. Unacked events are read again after the restart (at-least-once,
        # recognised by their offsets); a batch in progress finishes first (pipeline.revoke).
        stream_wait_empty=False,
        producer_linger=settings.producer_linger_s,
        producer_max_batch_size=settings.producer_max_batch_size,
        producer_compression_type=(
            None
            if settings.producer_compression_type == "none"
            else settings.producer_compression_type
        ),
        table_standby_replicas=0,
        broker_session_timeout=settings.consumer_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.consumer_session_timeout_s / 3),
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_tables_enabled=False,  # customer data is not for an unauthenticated HTTP port
    )
    faust_internals.set_producer_buffer_limit(app, settings.producer_buffer_max_messages)
    return app


def create_app(
    settings: Settings, models: SegmentModels | None = None, store: str = "rocksdb://"
) -> Any:
    """Build the Faust app; the returned app carries ``app.pipeline`` (its LivePipeline).

    ``store``: Faust's table store; unit tests use ``memory://`` (no RocksDB files)."""
    app = faust_app(settings, store)
    faust_internals.rewind_uncommitted_partitions(app, settings.input_topics)
    customers = app.Table(
        CUSTOMERS_TABLE,
        key_type=bytes,  # bytes -> raw codec (tables take no serializer arguments)
        value_type=bytes,
        partitions=settings.partitions,
        options={"block_cache_size": settings.rocksdb_block_cache_bytes},
    )
    sinks = FaustSinks(app, settings)
    durable = ChangelogAcks(customers)

    def has_more(topic: str, partition: int) -> bool:
        return _unread(app, pipeline.last_offsets, topic, partition)

    async def send_examples(key: bytes, value: bytes) -> asyncio.Future[Any]:
        topic = settings.learning_examples_topic
        return await faust_internals.send_raw(app, topic, key, value)

    pipeline = LivePipeline(
        settings,
        lambda partition: TableStore(
            customers, partition, settings.partitions, settings.state_cache_size
        ),
        sinks,
        metrics=Metrics(),
        models=models,
        has_more=has_more,
        as_current=faust_internals.as_current_event,
        merge_max_wait_s=settings.merge_max_wait_s,
        durable=durable.wait,
        examples_sink=send_examples,  # shared: for the trainer; in-process: for restarts
        committed_offset=lambda topic, partition: faust_internals.committed_offset(
            app, topic, partition
        ),
        read_skipped=SkippedReader(app, settings),
    )
    app.pipeline = pipeline
    app.event_counts = pipeline.counts
    _add_agent(app, pipeline, settings)
    _add_model_snapshots(app, pipeline, settings)
    app.trainer = None
    if settings.learning == "shared":
        _add_shared_learning(app, pipeline, settings)
    readiness = Readiness(settings)
    app.readiness = readiness
    _add_views(app, pipeline, readiness)
    _add_lag_timer(app, pipeline, settings)
    _add_broker_probe(app, readiness, settings)

    @app.on_partitions_revoked.connect  # type: ignore[untyped-decorator]
    async def on_revoked(app: Any, revoked: set[Any], **kwargs: Any) -> None:
        await pipeline.revoke({tp.partition for tp in revoked})

    @app.on_partitions_assigned.connect  # type: ignore[untyped-decorator]
    async def on_assigned(app: Any, assigned: set[Any], **kwargs: Any) -> None:
        inputs = set(settings.input_topics)
        pipeline.assign({tp.partition for tp in assigned if tp.topic in inputs})

    @app.on_rebalance_complete.connect  # type: ignore[untyped-decorator]
    async def on_reading(app: Any, **kwargs: Any) -> None:
        # Sent once table recovery is done, as Faust resumes the streams (faust/tables/
        # recovery.py, `_resume_streams` and `on_recovery_completed`).
        pipeline.reading_began()

    return app


def _add_agent(app: Any, pipeline: LivePipeline, settings: Settings) -> None:
    """One agent over both inputs, handing messages to the pipeline in batches.

    Acks are manual: an event is acked only once processed, its state written and its outputs
    handed to the producer (and Faust commits an offset only after flushing the producer). An
    event held by the ordered merge is acked when it is released.

    A batch is what Faust's fetcher can hand over right now, up to ``batch_max_events``: the
    agent keeps taking events while the stream's queue has more, and when it is empty gives the
    fetcher a few turns of the event loop to deliver the rest of what it has fetched (it hands
    over one message per ~3 turns). When nothing comes, the batch is processed: a lone live event
    waits microseconds, and a backlog's next fetch overlaps with processing.
    """
    inputs = raw_topic(app, *settings.input_topics)
    max_batch = settings.batch_max_events
    events: list[Any] = []  # collected by the agent, not yet handed to the pipeline
    arrived: list[float] = []

    async def segment(stream: Any) -> None:
        queue = faust_internals.stream_queue(stream)
        async for event in stream.noack().events():
            events.append(event)
            arrived.append(pipeline.input_clock())
            if len(events) < max_batch and await more_coming(queue):
                continue
            batch, times = _current(app, events, arrived)
            events.clear()
            arrived.clear()
            for done in await pipeline.handle_batch(batch, times):
                done.ack()
            app.readiness.progressed()

    async def release_held() -> None:
        if events:
            # The agent is collecting a batch: messages are being read, so no topic has gone
            # quiet yet (those it read are just not in the merge yet); its batch releases them.
            return
        released = await pipeline.flush_idle()
        for done in released:
            done.ack()
        if released:
            app.readiness.progressed()

    app.agent(inputs, name="segment")(segment)
    app.timer(MERGE_FLUSH_INTERVAL_S, name="release-held-events")(release_held)


async def more_coming(queue: faust_internals.DeliveryQueue) -> bool:
    """True if the stream's queue has (or within a few event-loop turns gets) another event."""
    for _ in range(DELIVERY_TURNS):
        if not queue.empty():
            return True
        await asyncio.sleep(0)
    return not queue.empty()


def _current(
    app: Any, events: Sequence[Any], arrived: Sequence[float]
) -> tuple[list[RawMessage], list[float]]:
    """The batch's messages and read times, without those of a consumer generation before the
    latest rebalance (their partitions may belong to another worker now; Faust skips them too,
    and they are re-delivered to the owner from the committed offset)."""
    generation = faust_internals.consumer_generation(app)
    generation_of = faust_internals.generation_of
    messages: list[RawMessage] = []
    times: list[float] = []
    stale: set[tuple[str, int]] = set()
    for event, at in zip(events, arrived, strict=True):
        message = event.message
        if generation_of(message) != generation:
            stale.add((message.topic, message.partition))
            continue
        # Trusted fields straight from the consumer: skip pydantic validation (~4% of a worker).
        origin = MessageOrigin.model_construct(
            topic=message.topic, partition=message.partition, offset=message.offset
        )
        messages.append((event.key, event.value, origin, event))
        times.append(at)
    if stale:
        log.info(
            "dropped %d message(s) of %s read before the rebalance to generation %d "
            "(their owner reads them again)",
            len(events) - len(messages),
            sorted(stale),
            generation,
        )
    return messages, times


def _unread(app: Any, last_offsets: dict[tuple[str, int], int], topic: str, partition: int) -> bool:
    """True while a topic partition has messages this worker has not read yet (or we cannot
    tell yet): then the ordered merge waits for them instead of guessing."""
    try:
        end = faust_internals.highwater(app, topic, partition)
    except AssertionError:
        return True  # not assigned now (a rebalance is revoking it): release nothing of it
    if end is None:
        return True
    return last_offsets.get((topic, partition), -1) + 1 < end


# Makes an event Faust's current event while it is processed: table writes pick the RocksDB
# instance and changelog partition from it (it may be held and released later, or by a timer).
# Named here too for the load tests' Faust floor baseline.
def _add_shared_learning(app: Any, pipeline: LivePipeline, settings: Settings) -> None:
    """Every worker runs a trainer candidate (the group gives the examples partition to one)
    and follows the published versions."""
    trainer = TrainerService(settings)
    follower = ModelFollower(settings, pipeline.offer_models)
    app.trainer, app.follower = trainer, follower

    async def start() -> None:
        follower.start()
        trainer.start()

    app.task(start)

    @app.on_before_shutdown.connect  # type: ignore[untyped-decorator]
    async def stop(app: Any, **kwargs: Any) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, trainer.stop)  # publishes what it learned, hands over
        await loop.run_in_executor(None, follower.stop)


def _add_model_snapshots(app: Any, pipeline: LivePipeline, settings: Settings) -> None:
    snapshots = raw_topic(app, settings.model_snapshots_topic)
    in_process = settings.learning == "in_process"  # shared: the trainer publishes versions

    keys = settings.model_signing_keys
    signing_key = keys[0] if keys else None  # the current key signs; a previous one never

    async def save() -> None:
        data = await pipeline.snapshot_models(signing_key)
        await snapshots.send(key=settings.app_id.encode(), value=data, partition=0)
        pipeline.update_quality_metrics()
        log.info(
            "model snapshot written: %d bytes, %s%s",
            len(data),
            record_version(data),
            "" if signing_key is None else ", signed",
        )

    if in_process:
        app.timer(settings.model_snapshot_interval_s, name="model-snapshot")(save)

    @app.on_before_shutdown.connect  # type: ignore[untyped-decorator]
    async def on_shutdown(app: Any, **kwargs: Any) -> None:
        try:
            if in_process:
                await save()
            await app.producer.flush()
        except Exception:
            log.exception("could not write the model snapshot at shutdown")
        try:
            sealed = await pipeline.seal(app.producer.flush)
            log.info("delivery sealed on %d partition(s): a restart re-sends nothing", sealed)
        except Exception:
            log.exception("could not seal delivery at shutdown (a restart re-sends the last batch)")


class Readiness:
    """What ``/ready`` tells a load balancer or an orchestrator beyond "assigned and recovered":
    whether the broker answers and whether the worker makes progress.

    * broker: a metadata request every ``broker_probe_interval_s`` (in a thread, so a hanging
      broker never blocks the event loop); unreachable once the newest probe failed or none has
      succeeded for three intervals.
    * progress: stalled when an input partition has messages this worker has not read and no
      batch has completed for ``ready_stall_s`` (an idle worker with nothing to read is fine).
    """

    def __init__(self, settings: Settings, clock: Any = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        started = clock()
        self.broker_ok_at = started
        self.broker_failed = False
        self.progress_at = started

    def probed(self, ok: bool) -> None:
        self.broker_failed = not ok
        if ok:
            self.broker_ok_at = self._clock()

    def progressed(self) -> None:
        self.progress_at = self._clock()

    def broker_reachable(self) -> bool:
        silence = self._clock() - self.broker_ok_at
        return not self.broker_failed and silence < 3 * self.settings.broker_probe_interval_s

    def stalled(self, lag: int) -> bool:
        return lag > 0 and self._clock() - self.progress_at > self.settings.ready_stall_s


def _lag(app: Any, pipeline: LivePipeline, settings: Settings) -> int:
    """Messages on this worker's input partitions that it has not read yet (as far as known)."""
    total = 0
    for tp in faust_internals.assigned_partitions(app):
        if tp.topic in settings.input_topics:
            end = faust_internals.highwater(app, tp.topic, tp.partition)
            done = pipeline.last_offsets.get((tp.topic, tp.partition), -1) + 1
            if end is not None:
                total += max(end - done, 0)
    return total


def _add_broker_probe(app: Any, readiness: Readiness, settings: Settings) -> None:
    admin = admin_client(settings.bootstrap_servers)
    timeout = min(2.0, settings.broker_probe_interval_s)

    def probe() -> bool:
        try:
            admin.list_topics(timeout=timeout)
            return True
        except Exception:
            return False

    async def check_broker() -> None:
        ok = await asyncio.get_running_loop().run_in_executor(None, probe)
        if readiness.broker_reachable() and not ok:
            log.warning("broker %s does not answer; /ready is 503", settings.bootstrap_servers)
        elif ok and readiness.broker_failed:
            log.info("broker %s answers again", settings.bootstrap_servers)
        readiness.probed(ok)

    app.timer(settings.broker_probe_interval_s, name="broker-probe")(check_broker)


def _add_views(app: Any, pipeline: LivePipeline, readiness: Readiness) -> None:
    async def counts(web: Any, request: Any) -> Any:
        body = pipeline.counts.snapshot()
        body["held"] = pipeline.held()
        body["unread"] = _lag(app, pipeline, readiness.settings)
        body["model_version"] = pipeline.models.stamp
        if app.trainer is not None:
            body["trainer"] = app.trainer.snapshot()
            body["model_pinned"] = app.follower.pinned is not None
            body["idle_partitions"] = pipeline.idle_partitions()
        return web.json(body)

    async def health(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    async def ready(web: Any, request: Any) -> Any:
        assigned = bool(faust_internals.assigned_partitions(app))
        recovered = faust_internals.tables_recovered(app)
        broker = readiness.broker_reachable()
        lag = _lag(app, pipeline, readiness.settings)
        stalled = readiness.stalled(lag)
        body = {
            "assigned": assigned,
            "recovered": recovered,
            "broker_reachable": broker,
            "stalled": stalled,
            "unread": lag,
        }
        ok = assigned and recovered and broker and not stalled
        return web.json(body, status=200 if ok else 503)

    async def metrics(web: Any, request: Any) -> Any:
        pipeline.update_quality_metrics()
        return web.bytes(pipeline.metrics.render(), content_type="text/plain; version=0.0.4")

    app.page(COUNTS_PATH, name="counts")(counts)
    app.page("/health", name="health")(health)
    app.page("/ready", name="ready")(ready)
    app.page("/metrics", name="metrics")(metrics)
    add_live_page(app, pipeline)  # /segments: the live page (stream_app/live/pages.py)


def _add_lag_timer(app: Any, pipeline: LivePipeline, settings: Settings) -> None:
    # Per input partition with unread messages: (the last offset read, since when it is that).
    reading: dict[Any, tuple[int, float]] = {}
    warned: set[Any] = set()

    async def measure_lag() -> None:
        now = time.monotonic()
        for tp in faust_internals.assigned_partitions(app):
            if tp.topic not in settings.input_topics:
                continue
            end = faust_internals.highwater(app, tp.topic, tp.partition)
            last = pipeline.last_offsets.get((tp.topic, tp.partition), -1)
            if end is None:
                continue
            unread = max(end - last - 1, 0)
            pipeline.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(unread)
            seen = reading.get(tp)
            if unread == 0 or seen is None or seen[0] != last:
                reading[tp] = (last, now)
                warned.discard(tp)
            elif now - seen[1] >= settings.ready_stall_s and tp not in warned:
                warned.add(tp)
                log.warning(
                    "%s[%d]: %d messages unread and none read for %.0f s (last read %d); "
                    "Faust's fetch state %s",
                    tp.topic,
                    tp.partition,
                    unread,
                    now - seen[1],
                    last,
                    faust_internals.fetch_state(app, tp),
                )

    app.timer(LAG_INTERVAL_S, name="consumer-lag")(measure_lag)


def load_model_snapshot(settings: Settings, models: SegmentModels, timeout: float = 10.0) -> bool:
    """Restore the newest model record of this app from the compacted topic, if any; a record
    that fails a check is refused with one log line and the models stay as they are."""
    latest = latest_model_record(settings, timeout, honour_pin=settings.learning == "shared")
    if latest is None:
        return False
    try:
        models.restore(latest, settings.model_signing_keys)
    except SnapshotError as exc:
        log.warning("refused the stored model snapshot, keeping the current models: %s", exc)
        return False
    if settings.learning == "shared":
        models.stamp = record_version(latest)
    log.info("models restored from snapshot %s (%d bytes)", record_version(latest), len(latest))
    return True


def _require_topics(settings: Settings) -> None:
    """Fail fast and clearly, instead of a worker that silently consumes nothing."""
    needed = [
        *settings.input_topics,
        settings.dead_letters_topic,
        settings.model_snapshots_topic,
        settings.learning_examples_topic,
    ]
    metadata = admin_client(settings.bootstrap_servers).list_topics(timeout=10)
    missing = [topic for topic in needed if topic not in metadata.topics]
    if missing:
        raise UserError(
            f"topic(s) {', '.join(missing)} do not exist on {settings.bootstrap_servers}; "
            "run `stream-app topics create` first"
        )


def run_worker(settings: Settings) -> int:
    """Run the worker until SIGTERM/SIGINT, then drain, snapshot the models, commit and exit."""
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_repeat_interval_s))
    wait_for_broker(settings.bootstrap_servers, BROKER_WAIT_S)
    _require_topics(settings)
    models = SegmentModels(settings.segmentation)
    load_model_snapshot(settings, models)
    if settings.learning == "in_process":
        relearned = relearn_examples(settings, models)
        if relearned:
            log.info("re-learned %d examples the stored snapshot lacked", relearned)
    app = create_app(settings, models)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        quiet=True,
        logging_config=logging_config(settings.log_level, settings.log_repeat_interval_s),
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
