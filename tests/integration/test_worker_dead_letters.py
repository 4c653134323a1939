"""The first live path: the worker counts valid events and dead-letters invalid ones.

The end-to-end test runs the worker as a subprocess (`python -m stream_app.cli worker`) configured
only by STREAM_APP_* variables, the way it runs in production. The handler tests at the bottom need
no broker: they cover the exception path, which valid or invalid *input* cannot reach.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from confluent_kafka import Producer
from conftest import TopicReader

from stream_app.contracts.events import DeadLetter, DeadLetterReason, MessageOrigin
from stream_app.core.models import SegmentModels
from stream_app.live import pipeline as pipeline_module
from stream_app.live.app import COUNTS_PATH, create_app
from stream_app.live.pipeline import LivePipeline, WorkerCounts
from stream_app.live.store import TableStore, partition_of
from stream_app.settings import Settings

if TYPE_CHECKING:
    from conftest import WorkerProcess

MAX_EVENT_BYTES = 1024
EVENT_TIME = "2024-03-01T12:00:00+00:00"


def click(event_id: str, event_type: str = "page_view", **extra: Any) -> bytes:
    body = {"event_id": event_id, "customer_id": "c-1", "event_time": EVENT_TIME}
    return orjson.dumps({**body, "event_type": event_type, **extra})


def purchase(event_id: str, **extra: Any) -> bytes:
    body = {
        "event_id": event_id,
        "customer_id": "c-1",
        "event_time": EVENT_TIME,
        "event_type": "purchase",
        "order_id": f"o-{event_id}",
        "amount": "19.99",
        "currency": "EUR",
    }
    return orjson.dumps({**body, **extra})


@dataclass(frozen=True)
class Sent:
    topic: str
    key: bytes
    value: bytes
    partition: int
    offset: int


def produce(bootstrap: str, messages: list[tuple[str, bytes, bytes]]) -> list[Sent]:
    """Produce in order to partition 0 (so order is defined) and return where each one landed."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    sent: list[Sent] = []

    def delivered(error: Any, message: Any) -> None:
        assert error is None, error
        sent.append(
            Sent(
                message.topic(),
                message.key(),
                message.value(),
                message.partition(),
                message.offset(),
            )
        )

    for topic, key, value in messages:
        producer.produce(topic, value=value, key=key, partition=0, on_delivery=delivered)
    assert producer.flush(15) == 0
    assert len(sent) == len(messages)
    return sent


def read_topic(settings: Settings, topic: str, expected: int, timeout: float = 20.0) -> list[Any]:
    reader = TopicReader(settings, topic)
    try:
        reader.until(lambda got: len(got) >= expected, timeout)
        reader.poll(1.0)  # a short grace period proves there is nothing beyond what we expected
    finally:
        reader.close()
    return reader.messages


def total(counts: dict[str, Any], section: str) -> int:
    return sum(counts[section].values())


@pytest.mark.integration
def test_worker_counts_valid_events_and_dead_letters_invalid_ones(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    # In process: the counts below are a worker's without a trainer (a poison event in shared
    # learning: test_delivery_from_outside's far-future test).
    settings = settings_factory(max_event_bytes=MAX_EVENT_BYTES, learning="in_process")
    topics_factory(settings)
    clicks, transactions = settings.clickstream_topic, settings.transactions_topic
    worker = worker_factory(settings)
    worker.wait_ready()

    bad = {
        b"bad-json": (clicks, b'{"event_id": "x", oops', DeadLetterReason.INVALID_JSON),
        b"bad-type": (clicks, click("e-bad-type", "teleport"), DeadLetterReason.UNKNOWN_TYPE),
        b"bad-field": (
            transactions,
            purchase("t-bad", amount=19.99),
            DeadLetterReason.INVALID_FIELD,
        ),
        # A valid event padded past the limit: only its size is wrong.
        b"bad-size": (clicks, click("e-big") + b" " * MAX_EVENT_BYTES, DeadLetterReason.OVERSIZED),
        b"bad-array": (transactions, b"[1, 2, 3]", DeadLetterReason.NOT_AN_OBJECT),
    }

    first = produce(
        settings.bootstrap_servers,
        [
            (clicks, b"c-1", click("e-1")),
            (transactions, b"c-1", purchase("t-1")),
            *[(topic, key, value) for key, (topic, value, _) in bad.items()],
            (clicks, b"c-1", click("e-2", "cart_add")),
        ],
    )
    counts = worker.wait_for(lambda c: total(c, "events") >= 3 and total(c, "dead_letters") >= 5)
    assert counts["events"] == {"page_view": 1, "purchase": 1, "cart_add": 1}

    # Still alive and still consuming after the bad input.
    produce(
        settings.bootstrap_servers,
        [(clicks, b"c-2", click("e-3")), (transactions, b"c-2", purchase("t-2"))],
    )
    counts = worker.wait_for(lambda c: total(c, "events") >= 5)
    # Everything was produced to partition 0, and every valid payload is customer c-1's: if c-1
    # is owned by another partition, all 5 are re-keyed there and processed, not lost.
    rerouted = 5 * (partition_of("c-1", settings.partitions) != 0)
    expected: dict[str, Any] = {
        "events": {"cart_add": 1, "page_view": 2, "purchase": 2},
        "dead_letters": {reason.value: 1 for _, _, reason in bad.values()},
        "unsent_dead_letters": 0,
    }
    if rerouted:
        expected["rerouted"] = rerouted
    # What scored them, and the example batches sent for the models to learn from (one per
    # batch that learned anything; the invalid events taught nothing).
    assert counts.pop("model_version") == SegmentModels(settings.segmentation).version
    assert counts.pop("model_switches") == 0
    assert 1 <= counts.pop("example_batches_sent") <= 5
    # Nothing left unread or held, and (learning in process) nothing waited for a version.
    quiet = ("held", "unread", "model_waits", "model_waits_expired")
    assert {k: counts.pop(k) for k in quiet} == dict.fromkeys(quiet, 0)
    assert counts == expected

    letters = read_topic(settings, settings.dead_letters_topic, len(bad))
    assert sorted(m.key() for m in letters) == sorted(bad)
    origins = {sent.key: sent for sent in first}
    for message in letters:
        letter = DeadLetter.model_validate_json(message.value())
        topic, payload, reason = bad[message.key()]
        source = origins[message.key()]
        assert letter.reason is reason
        assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
            topic,
            source.partition,
            source.offset,
        )
        assert base64.b64decode(letter.payload_b64) == payload
        assert letter.key_b64 is not None and base64.b64decode(letter.key_b64) == message.key()

    assert worker.stop() == 0, worker.log_tail()


# --- the pipeline on its own (no broker) ---------------------------------------------------------


class Sinks:
    def __init__(self, fail: bool | int = False) -> None:
        self.dead: list[tuple[bytes | None, bytes]] = []
        self.fail = fail  # True: every send fails; a number: that many sends fail first

    async def change(self, customer_id: str, value: bytes) -> asyncio.Future[None]:
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acked.set_result(None)  # the broker acknowledged it at once
        return acked

    async def membership(self, customer_id: str, value: bytes) -> None:
        return None

    async def dead_letter(self, key: bytes | None, value: bytes) -> None:
        if self.fail is True:
            raise ConnectionError("broker went away")
        if self.fail:
            self.fail -= 1
            raise ConnectionError("broker went away for a moment")
        self.dead.append((key, value))

    async def reroute(self, topic: str, key: bytes, value: bytes) -> None:
        raise AssertionError("c-1 is on its own partition: nothing to re-key")


PARTITIONS = 4
OWN = partition_of("c-1", PARTITIONS)  # the partition c-1's events are keyed to
ORIGIN = MessageOrigin(topic="clickstream", partition=OWN, offset=41)


def pipeline_factory(sinks: Sinks) -> LivePipeline:
    return LivePipeline(
        Settings(max_event_bytes=1024, partitions=PARTITIONS),
        lambda p: TableStore({}, p, PARTITIONS),
        sinks,
    )


async def test_an_exception_while_handling_becomes_a_processing_error_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def exploding_decoder(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in the decoder")

    monkeypatch.setattr(pipeline_module, "decode_event", exploding_decoder)
    sinks = Sinks()
    pipeline = pipeline_factory(sinks)

    await pipeline.handle(b"c-9", click("e-9"), ORIGIN)

    assert [key for key, _ in sinks.dead] == [b"c-9"]
    sent = DeadLetter.model_validate_json(sinks.dead[0][1])
    assert sent.reason is DeadLetterReason.PROCESSING_ERROR
    assert sent.detail == "RuntimeError: bug in the decoder"
    assert (sent.source_topic, sent.source_partition, sent.source_offset) == (
        "clickstream",
        OWN,
        41,
    )
    assert pipeline.counts.dead_letters == {"processing_error": 1}


async def test_a_dead_letter_that_cannot_be_sent_is_retried_and_never_acked_unsent() -> None:
    """Nothing is acked that was neither applied nor dead-lettered: while the dead letter cannot
    be sent, the message is not done (it used to be acked with the letter lost)."""
    stuck = pipeline_factory(Sinks(fail=True))
    handling = asyncio.create_task(stuck.handle(b"k", b"not json", ORIGIN))
    await asyncio.sleep(0.5)
    assert not handling.done()  # not acked: still retrying
    assert stuck.counts.unsent_dead_letters >= 2
    handling.cancel()

    sinks = Sinks(fail=2)  # the broker comes back
    pipeline = pipeline_factory(sinks)
    done = await asyncio.wait_for(pipeline.handle(b"k", b"not json", ORIGIN), timeout=5)
    assert done == [None]  # acked once the letter is out
    assert pipeline.counts.dead_letters == {"invalid_json": 1}
    assert pipeline.counts.unsent_dead_letters == 2
    assert len(sinks.dead) == 1


async def test_valid_events_are_counted_by_type_and_a_tombstone_is_dead_lettered() -> None:
    sinks = Sinks()
    pipeline = pipeline_factory(sinks)
    transactions = MessageOrigin(topic="transactions", partition=OWN, offset=42)

    await pipeline.handle(b"c-1", click("e-1", "search"), ORIGIN)
    await pipeline.handle(b"c-1", purchase("t-1"), transactions)
    # The next offset: a message read again at an offset already read is a copy (not processed).
    await pipeline.handle(b"c-1", None, ORIGIN.model_copy(update={"offset": ORIGIN.offset + 1}))

    assert pipeline.counts.events == {"search": 1, "purchase": 1}
    assert pipeline.counts.snapshot()["dead_letters"] == {"invalid_json": 1}
    tombstone = DeadLetter.model_validate_json(sinks.dead[0][1])
    assert tombstone.reason is DeadLetterReason.INVALID_JSON
    assert datetime.now(UTC) >= tombstone.failed_at


def test_the_app_reads_raw_bytes_from_both_inputs_and_serves_its_endpoints(tmp_path: Path) -> None:
    """Raw serializers matter: with only value_type=bytes Faust would still JSON-decode."""
    settings = Settings(state_dir=tmp_path, app_id="wiring", partitions=3, web_port=16066)

    app = create_app(settings)

    channels = {name: agent.channel for name, agent in app.agents.items()}
    assert {name: channel.topics for name, channel in channels.items()} == {
        "segment": (settings.clickstream_topic, settings.transactions_topic),
    }
    for channel in channels.values():
        assert (channel.key_serializer, channel.value_serializer) == ("raw", "raw")
    assert sorted(app.web.views) == sorted(
        [COUNTS_PATH, "/health", "/ready", "/metrics", "/segments"]
    )
    assert app.conf.web_tables_enabled is False
    assert (app.conf.topic_partitions, app.conf.web_port) == (3, 16066)
    assert str(app.conf.store) == "rocksdb:"
    table = app.tables["customers"]
    assert (table.key_serializer, table.value_serializer, table.partitions) == ("raw", "raw", 3)
    assert Path(app.conf.datadir) == tmp_path / "faust" / "wiring"
    assert isinstance(app.event_counts, WorkerCounts)
