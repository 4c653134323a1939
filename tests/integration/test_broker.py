"""The local broker launcher and topic creation, against a real broker."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from confluent_kafka.admin import ConfigResource, NewTopic, ResourceType

from stream_app.errors import UserError
from stream_app.kafka.local import LocalKafka, run_kafka_command
from stream_app.kafka.topics import CREATED, EXISTS, admin_client, broker_answers
from stream_app.settings import Settings

if TYPE_CHECKING:
    from conftest import RunRecords

pytestmark = pytest.mark.integration

ours_only = pytest.mark.skipif(
    bool(os.environ.get("STREAM_APP_TEST_BOOTSTRAP")),
    reason="checks the launcher's own broker; STREAM_APP_TEST_BOOTSTRAP points elsewhere",
)


def _ports() -> tuple[int, int]:
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", 0))
        return first.getsockname()[1], second.getsockname()[1]


@ours_only
def test_launcher_broker_answers_and_status_reports_running(
    kafka_broker: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka = LocalKafka(kafka_broker)
    status = kafka.status()

    assert status.running and status.answering
    assert status.pid == kafka.pid() and status.pid is not None
    assert status.bootstrap == kafka_broker.bootstrap_servers
    assert broker_answers(admin_client(kafka_broker.bootstrap_servers), 5.0)
    assert run_kafka_command("status", kafka_broker) == 0
    assert capsys.readouterr().out.startswith(f"running (pid {status.pid}")
    assert "Kafka Server started" in kafka.log_file.read_text()


@ours_only
def test_start_when_running_says_so_and_keeps_the_same_broker(
    kafka_broker: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka = LocalKafka(kafka_broker)
    pid = kafka.pid()

    assert run_kafka_command("start", kafka_broker) == 0
    assert "already running" in capsys.readouterr().out
    assert kafka.pid() == pid and kafka.is_running()


def test_topics_create_is_idempotent_and_membership_is_compacted(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
) -> None:
    settings = settings_factory(partitions=3)

    first = topics_factory(settings)
    second = topics_factory(settings)

    names = [
        settings.clickstream_topic,
        settings.transactions_topic,
        settings.segment_changes_topic,
        settings.segment_membership_topic,
        settings.dead_letters_topic,
    ]
    internal = [settings.customers_changelog_topic, settings.model_snapshots_topic]
    examples = settings.learning_examples_topic  # what the models learn from, in order
    assert first == dict.fromkeys([*names, *internal, examples], CREATED)
    assert second == dict.fromkeys([*names, *internal, examples], EXISTS)
    admin = admin_client(settings.bootstrap_servers)
    metadata = admin.list_topics(timeout=10)
    assert {len(metadata.topics[name].partitions) for name in names} == {3}
    assert len(metadata.topics[settings.customers_changelog_topic].partitions) == 3
    assert len(metadata.topics[settings.model_snapshots_topic].partitions) == 1
    assert len(metadata.topics[examples].partitions) == 1  # one trainer reads it in order
    policies = {name: _cleanup_policy(admin, name) for name in [*names, *internal, examples]}
    for compacted in (settings.segment_membership_topic, *internal):
        assert policies.pop(compacted) == "compact"
    assert set(policies.values()) == {"delete"}
    for topic in (settings.clickstream_topic, settings.transactions_topic):
        config = ConfigResource(ResourceType.TOPIC, topic)
        described = admin.describe_configs([config])[config].result(timeout=10)
        assert described["message.timestamp.type"].value == "LogAppendTime"


def _cleanup_policy(admin: Any, topic: str) -> str:
    resource = ConfigResource(ResourceType.TOPIC, topic)
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    return str(configs["cleanup.policy"].value)


def test_stop_then_restart_reuses_storage_and_cluster_id(
    tmp_path: Path, run_records: RunRecords
) -> None:
    port, controller = _ports()
    settings = Settings(
        kafka_port=port,
        kafka_controller_port=controller,
        bootstrap_servers=f"127.0.0.1:{port}",
        state_dir=tmp_path,
    )
    kafka = LocalKafka(settings)
    record = run_records.broker(kafka)  # stopped by the test command if this session dies
    try:
        assert kafka.start() is True
        cluster_id = kafka.paths.cluster_id_file.read_text()
        admin = admin_client(kafka.bootstrap)  # keep a reference: its futures need the handle
        created = admin.create_topics([_new_topic("survives-restart")], operation_timeout=10)
        created["survives-restart"].result(timeout=10)

        assert kafka.stop() is True
        assert not kafka.paths.pid_file.exists()
        assert kafka.status().describe() == f"stopped (bootstrap {kafka.bootstrap})"
        assert kafka.stop() is False

        assert kafka.start() is True
        assert kafka.paths.cluster_id_file.read_text() == cluster_id
        topics = admin_client(kafka.bootstrap).list_topics(timeout=10).topics
        assert "survives-restart" in topics
    finally:
        kafka.stop()
    run_records.forget(record)
    assert not kafka.is_running()


def _new_topic(name: str) -> NewTopic:
    return NewTopic(name, num_partitions=1, replication_factor=1)


def test_a_broker_that_dies_while_starting_gives_one_line_pointing_at_its_log(
    tmp_path: Path,
) -> None:
    port, controller = _ports()
    settings = Settings(
        kafka_port=port,
        kafka_controller_port=controller,
        state_dir=tmp_path,
        kafka_heap="not-a-size",
    )
    kafka = LocalKafka(settings)
    started = time.monotonic()

    with pytest.raises(UserError) as caught:
        kafka.start()

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("Kafka exited while starting: Invalid maximum heap size")
    assert str(kafka.paths.console_log) in message
    assert not kafka.paths.pid_file.exists()
    assert time.monotonic() - started < 30
