"""The Faust application: consume the input topics, decode, dead-letter, count.

This is the first live path. The agents stay thin: Faust hands each raw message to
:class:`MessageHandler`, which knows nothing about Faust (so it is tested without a broker) and
never lets one bad message stop the worker. The per-type counter is a stand-in for the
segmentation processor that replaces it later.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import faust

from stream_app.errors import UserError
from stream_app.events import (
    DeadLetter,
    DeadLetterReason,
    Event,
    EventKind,
    MessageOrigin,
    dead_letter,
    decode_event,
    encode,
)
from stream_app.settings import Settings
from stream_app.topics import admin_client, wait_for_broker

log = logging.getLogger(__name__)

COUNTS_PATH: Final = "/counts"
COUNTS_LOG_INTERVAL_S: Final = 10.0
BROKER_WAIT_S: Final = 30.0

DeadLetterSink = Callable[[bytes | None, bytes], Awaitable[None]]


class Decoder(Protocol):
    """The shape of :func:`stream_app.events.decode_event` (swappable in tests)."""

    def __call__(
        self,
        payload: bytes,
        kind: EventKind,
        source: MessageOrigin,
        *,
        key: bytes | None = None,
        max_bytes: int = ...,
    ) -> Event | DeadLetter: ...


@dataclass
class WorkerCounts:
    """What this worker has seen since it started (per process, not per consumer group)."""

    events: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    unsent_dead_letters: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "events": dict(sorted(self.events.items())),
            "dead_letters": dict(sorted(self.dead_letters.items())),
            "unsent_dead_letters": self.unsent_dead_letters,
        }


class MessageHandler:
    """Turns one raw message into a counted event or a dead letter; never raises on bad input."""

    def __init__(
        self,
        counts: WorkerCounts,
        send_dead_letter: DeadLetterSink,
        *,
        max_bytes: int,
        decode: Decoder = decode_event,
    ) -> None:
        self.counts = counts
        self._send_dead_letter = send_dead_letter
        self._max_bytes = max_bytes
        self._decode = decode

    async def handle(
        self, kind: EventKind, key: bytes | None, value: bytes | None, origin: MessageOrigin
    ) -> Event | DeadLetter:
        # A tombstone (None) is not an event; it dead-letters as empty, invalid JSON.
        payload = value if isinstance(value, bytes) else b""
        try:
            result = self._decode(payload, kind, origin, key=key, max_bytes=self._max_bytes)
            if isinstance(result, DeadLetter):
                await self._reject(key, result)
            else:
                self.counts.events[result.event_type.value] += 1
            return result
        except Exception as exc:
            log.exception(
                "processing failed at %s", _where(origin.topic, origin.partition, origin.offset)
            )
            detail = f"{type(exc).__name__}: {exc}"
            letter = dead_letter(payload, DeadLetterReason.PROCESSING_ERROR, detail, origin, key)
            await self._reject(key, letter)
            return letter

    async def _reject(self, key: bytes | None, letter: DeadLetter) -> None:
        """Send a dead letter; if even that fails, log and count it rather than stop the worker."""
        self.counts.dead_letters[letter.reason.value] += 1
        log.info(
            "dead letter %s from %s: %s",
            letter.reason.value,
            _where(letter.source_topic, letter.source_partition, letter.source_offset),
            letter.detail[:200],
        )
        try:
            await self._send_dead_letter(key, encode(letter))
        except Exception:
            self.counts.unsent_dead_letters += 1
            log.exception("could not send a dead letter for %s", letter.source_topic)


def _where(topic: str, partition: int, offset: int) -> str:
    return f"{topic}[{partition}]@{offset}"


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app for ``settings``: two decoding agents, a `/counts` view, a log timer.

    The returned ``faust.App`` carries its :class:`WorkerCounts` as ``app.event_counts``.
    """
    datadir = settings.state_dir.expanduser().resolve() / "faust" / settings.app_id
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level itself
    app = faust.App(
        settings.app_id,
        broker=_broker_urls(settings.bootstrap_servers),
        datadir=str(datadir),
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        # Table contents are customer data; they are not for an unauthenticated HTTP port.
        web_tables_enabled=False,
    )
    counts = WorkerCounts()
    app.event_counts = counts
    dead_letters = _raw_topic(app, settings.dead_letters_topic)

    async def send_dead_letter(key: bytes | None, value: bytes) -> None:
        await dead_letters.send(key=key, value=value)

    handler = MessageHandler(counts, send_dead_letter, max_bytes=settings.max_event_bytes)
    _add_agent(app, handler, settings.clickstream_topic, "click")
    _add_agent(app, handler, settings.transactions_topic, "transaction")
    _add_counts_view(app, counts)
    _add_counts_log(app, counts)
    return app


def _raw_topic(app: Any, name: str) -> Any:
    """A topic of raw bytes both ways.

    ``value_type=bytes`` alone is not enough: Faust still applies the app-wide default
    serializer ("json"), so a malformed message would crash the agent inside Faust, before our
    code could dead-letter it. The explicit "raw" serializers keep every byte ours.
    """
    return app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )


def _add_agent(app: Any, handler: MessageHandler, topic_name: str, kind: EventKind) -> None:
    """One agent per input topic, reading raw bytes so decoding (and its errors) stay ours."""
    topic = _raw_topic(app, topic_name)

    async def decode_stream(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            origin = MessageOrigin(
                topic=message.topic, partition=message.partition, offset=message.offset
            )
            await handler.handle(kind, event.key, event.value, origin)

    decode_stream.__name__ = decode_stream.__qualname__ = f"decode_{kind}"
    app.agent(topic, name=f"decode-{kind}")(decode_stream)


def _add_counts_view(app: Any, counts: WorkerCounts) -> None:
    """``GET /counts`` on the worker's web port: the counts as JSON, for tests and operators."""

    async def counts_view(web: Any, request: Any) -> Any:
        return web.json(counts.snapshot())

    app.page(COUNTS_PATH, name="counts")(counts_view)


def _add_counts_log(app: Any, counts: WorkerCounts) -> None:
    """Log the counts every few seconds while they change (a log line per event is too much)."""
    last: dict[str, Any] = {}

    async def log_counts() -> None:
        current = counts.snapshot()
        if current != last:
            last.clear()
            last.update(current)
            log.info("counts %s", current)

    app.timer(COUNTS_LOG_INTERVAL_S, name="log-counts")(log_counts)


def _require_topics(settings: Settings) -> None:
    """Fail fast and clearly, instead of a worker that silently consumes nothing."""
    needed = [*settings.input_topics, settings.dead_letters_topic]
    metadata = admin_client(settings.bootstrap_servers).list_topics(timeout=10)
    missing = [topic for topic in needed if topic not in metadata.topics]
    if missing:
        raise UserError(
            f"topic(s) {', '.join(missing)} do not exist on {settings.bootstrap_servers}; "
            "run `stream-app topics create` first"
        )


def run_worker(settings: Settings) -> int:
    """Run the worker until SIGTERM/SIGINT, then drain in-flight events, commit and exit."""
    wait_for_broker(settings.bootstrap_servers, BROKER_WAIT_S)
    _require_topics(settings)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
