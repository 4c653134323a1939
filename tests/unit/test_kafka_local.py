"""The local broker launcher without a broker: rendered config, prerequisites, pid-file safety."""

from __future__ import annotations

import os
import re
import socket
import stat
import time
from pathlib import Path

import pytest

from stream_app.errors import UserError
from stream_app.kafka.local import (
    NOT_RUNNING_EXIT,
    LocalKafka,
    jvm_command,
    new_cluster_id,
    render_log4j,
    render_pom,
    render_server_properties,
    require_tools,
    run_kafka_command,
)
from stream_app.kafka.topics import wait_for_broker
from stream_app.settings import Settings


def parse_properties(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {line.partition("=")[0]: line.partition("=")[2] for line in lines}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        kafka_port=29192,
        kafka_controller_port=29193,
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        partitions=6,
    )


def test_server_properties_are_kraft_combined_mode_on_loopback(
    settings: Settings, tmp_path: Path
) -> None:
    rendered = parse_properties(render_server_properties(settings, tmp_path / "data"))

    assert rendered == {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": "1@127.0.0.1:29193",
        "listeners": "PLAINTEXT://127.0.0.1:29192,CONTROLLER://127.0.0.1:29193",
        "advertised.listeners": "PLAINTEXT://127.0.0.1:29192",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(tmp_path / "data"),
        "num.partitions": "6",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "4000",
        "auto.create.topics.enable": "false",
    }


def test_broker_and_controller_ports_must_differ(tmp_path: Path) -> None:
    same = Settings(kafka_port=29192, kafka_controller_port=29192, state_dir=tmp_path)

    with pytest.raises(UserError, match="must differ"):
        render_server_properties(same, tmp_path)


def test_log4j_writes_one_real_log_file(tmp_path: Path) -> None:
    rendered = parse_properties(render_log4j(tmp_path / "logs" / "server.log"))

    assert rendered["log4j.rootLogger"] == "INFO, file"
    assert rendered["log4j.appender.file"] == "org.apache.log4j.RollingFileAppender"
    assert rendered["log4j.appender.file.File"] == str(tmp_path / "logs" / "server.log")


def test_pom_pins_the_broker_and_its_logging_binding() -> None:
    pom = render_pom("3.9.1")

    assert "<packaging>pom</packaging>" in pom
    for coordinates in (
        "<artifactId>kafka_2.13</artifactId><version>3.9.1</version>",
        "<artifactId>slf4j-reload4j</artifactId><version>1.7.36</version>",
        "<artifactId>reload4j</artifactId><version>1.2.25</version>",
    ):
        assert coordinates in pom


def test_jvm_command_uses_the_heap_setting_and_our_config(settings: Settings) -> None:
    kafka = LocalKafka(settings)
    command = jvm_command("/usr/bin/java", settings, kafka.paths, Path("/cache/libs"))

    assert command[:2] == ["/usr/bin/java", "-Xmx512m"]
    assert command[-4:] == [
        "-cp",
        "/cache/libs/*",
        "kafka.Kafka",
        str(kafka.paths.server_properties),
    ]
    assert f"-Dlog4j.configuration=file:{kafka.paths.log4j_properties}" in command
    assert kafka.paths.root.is_absolute()


def test_cluster_ids_look_like_kafkas() -> None:
    ids = {new_cluster_id() for _ in range(200)}

    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", cid) and cid[0] != "-" for cid in ids)


def fake_tool(folder: Path, name: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize(
    ("present", "need_maven", "missing"),
    [
        ([], True, "`java` and `mvn` are"),
        (["mvn"], True, "`java` is"),
        (["java"], True, "`mvn` is"),
        ([], False, "`java` is"),
    ],
)
def test_missing_java_or_maven_is_named_exactly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    present: list[str],
    need_maven: bool,
    missing: str,
) -> None:
    for tool in present:
        fake_tool(tmp_path, tool)
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(UserError) as caught:
        require_tools(need_maven=need_maven)

    message = str(caught.value)
    assert message.startswith(f"{missing} not on PATH")
    assert "`docker compose up`" in message
    assert "\n" not in message


def test_java_alone_is_enough_once_the_jars_are_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tool(tmp_path, "java")
    monkeypatch.setenv("PATH", str(tmp_path))

    assert require_tools(need_maven=False) == str(tmp_path / "java")


def test_start_without_java_fails_before_touching_anything(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    with pytest.raises(UserError, match=r"^`java` and `mvn` are not on PATH"):
        LocalKafka(settings).start()

    assert not settings.cache_dir.exists()
    assert not LocalKafka(settings).paths.pid_file.exists()


def test_status_of_a_fresh_state_folder_is_stopped(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_kafka_command("status", settings) == NOT_RUNNING_EXIT
    assert capsys.readouterr().out == "stopped (bootstrap 127.0.0.1:29192)\n"
    assert run_kafka_command("stop", settings) == 0
    assert capsys.readouterr().out == "Kafka was not running\n"


def test_a_stale_pid_file_is_never_signalled(settings: Settings) -> None:
    """A recycled pid (here: this very test process) must not be mistaken for the broker."""
    kafka = LocalKafka(settings)
    kafka.paths.root.mkdir(parents=True)
    kafka.paths.pid_file.write_text(f"{os.getpid()}\n")

    assert not kafka.is_running()
    assert kafka.stop() is False
    assert not kafka.paths.pid_file.exists()


def test_start_refuses_a_port_someone_else_holds(settings: Settings) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = Settings(
            kafka_port=holder.getsockname()[1],
            kafka_controller_port=29193,
            state_dir=settings.state_dir,
        )
        with pytest.raises(UserError, match=r"already in use.*STREAM_APP_KAFKA_PORT"):
            LocalKafka(taken).start()


def test_an_unreachable_broker_is_one_clear_line_not_a_hang() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()

    with pytest.raises(UserError) as caught:
        wait_for_broker(f"127.0.0.1:{port}", 1.0)

    assert time.monotonic() - started < 5
    assert str(caught.value).startswith(f"Kafka at 127.0.0.1:{port} did not answer within 1s")
    assert "\n" not in str(caught.value)
