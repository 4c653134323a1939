"""The application's topics: create them up front, and wait for a broker to answer.

Topics are pre-created rather than left to broker auto-creation, so partition counts and the
compaction of ``segment-membership`` are what the settings say (Faust never validates existing
topics, and broker auto-create would use ``num.partitions``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Final

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from stream_app.errors import UserError
from stream_app.settings import Settings

log = logging.getLogger(__name__)

CREATED: Final = "created"
EXISTS: Final = "exists"
COMPACTED: Final[dict[str, str]] = {"cleanup.policy": "compact"}
# Inputs keep records by when they arrived, not by their event time: a replay of 2019 history
# stamped with event time is deleted by 7-day time retention within minutes (measured: the
# broker dropped a freshly published REES46 replay 25 s later). Event time travels in the payload.
INPUT: Final[dict[str, str]] = {"message.timestamp.type": "LogAppendTime"}


class _LibrdkafkaLog:
    """Receives librdkafka's own log lines and demotes them to DEBUG.

    Without it, every refused connection while a broker starts prints an ``%3|...|FAIL|`` line on
    stderr; our callers turn an unreachable broker into one clear error instead.
    """

    def log(self, level: int, msg: str, *args: object) -> None:
        log.debug(msg, *args)


def librdkafka_log() -> _LibrdkafkaLog:
    """For ``logger=`` of a confluent client a worker keeps open (trainer, follower, log
    readers): a broker outage then costs no stderr line per reconnect attempt (measured: about
    20 a second per client); /ready and our own log lines report the outage."""
    return _LibrdkafkaLog()


def admin_client(bootstrap: str) -> AdminClient:
    """An AdminClient whose librdkafka logging goes to our DEBUG log, not to stderr."""
    config: dict[str, str | int | float | bool] = {
        "bootstrap.servers": bootstrap,
        "log.connection.close": False,
    }
    return AdminClient(config, logger=_LibrdkafkaLog())


def broker_answers(admin: AdminClient, timeout: float) -> bool:
    """True if the cluster answered a metadata request within ``timeout`` seconds."""
    try:
        metadata = admin.list_topics(timeout=max(timeout, 0.1))
    except KafkaException:
        return False
    return bool(metadata.brokers)


def wait_for_broker(bootstrap: str, timeout: float) -> None:
    """Block until ``bootstrap`` answers a metadata request; UserError after ``timeout`` s."""
    admin = admin_client(bootstrap)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if broker_answers(admin, min(max(remaining, 0.1), 2.0)):
            return
        if time.monotonic() >= deadline:
            raise UserError(
                f"Kafka at {bootstrap} did not answer within {timeout:g}s "
                "(start it with `stream-app kafka start` or `docker compose up`)"
            )
        time.sleep(0.2)


def require_topics(settings: Settings, topics: Iterable[str], timeout: float = 10.0) -> None:
    """UserError naming the first of ``topics`` the broker does not have."""
    wait_for_broker(settings.bootstrap_servers, timeout)
    existing = admin_client(settings.bootstrap_servers).list_topics(timeout=timeout).topics
    for topic in topics:
        if topic not in existing:
            raise UserError(
                f"topic {topic!r} does not exist on {settings.bootstrap_servers} "
                "(create the application's topics with `stream-app topics create`)"
            )


def topic_specs(settings: Settings) -> list[NewTopic]:
    """Every topic the application owns, with the partitions and configs it relies on."""

    def spec(name: str, config: dict[str, str] | None = None, partitions: int = 0) -> NewTopic:
        return NewTopic(
            name,
            num_partitions=partitions or settings.partitions,
            replication_factor=settings.replication_factor,
            config=config or {},
        )

    return [
        spec(settings.clickstream_topic, INPUT),
        spec(settings.transactions_topic, INPUT),
        spec(settings.segment_changes_topic),
        spec(settings.segment_membership_topic, COMPACTED),
        spec(settings.dead_letters_topic),
        # Internal: same partitions as the inputs (Faust co-partitions the table with them).
        spec(settings.customers_changelog_topic, COMPACTED),
        spec(settings.model_snapshots_topic, COMPACTED, partitions=1),
        spec(settings.learning_examples_topic, partitions=1),
    ]


def create_topics(settings: Settings, *, timeout: float = 30.0) -> dict[str, str]:
    """Create the application's topics; each maps to "created" or "exists". Idempotent."""
    wait_for_broker(settings.bootstrap_servers, timeout)
    admin = admin_client(settings.bootstrap_servers)
    specs = topic_specs(settings)
    futures = admin.create_topics(specs, operation_timeout=timeout, request_timeout=timeout)
    outcomes = {spec.topic: _outcome(spec.topic, futures[spec.topic]) for spec in specs}
    existing = [spec for spec in specs if outcomes[spec.topic] == EXISTS]
    _warn_on_partition_mismatch(admin, existing)
    return outcomes


def _outcome(topic: str, future: Future[None]) -> str:
    try:
        future.result()
    except KafkaException as exc:
        error: KafkaError = exc.args[0]
        if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return EXISTS
        raise UserError(f"could not create topic {topic}: {error.str()}") from exc
    return CREATED


def _warn_on_partition_mismatch(admin: AdminClient, existing: list[NewTopic]) -> None:
    """Existing topics are left alone, but a different partition count breaks co-partitioning."""
    if not existing:
        return
    metadata = admin.list_topics(timeout=10)
    for spec in existing:
        found = metadata.topics.get(spec.topic)
        if found is not None and len(found.partitions) != spec.num_partitions:
            log.warning(
                "topic %s has %d partitions, settings say %d",
                spec.topic,
                len(found.partitions),
                spec.num_partitions,
            )
