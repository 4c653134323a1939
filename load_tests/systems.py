"""What a load run talks to: the broker (ours, or one that is already running) and the system under
test (the stream_app worker, or a baseline), each a subprocess configured by STREAM_APP_* variables.

Every system serves the same small HTTP interface on its web port: ``/ready`` (200 once it owns
its partitions), ``/counts`` (events and dead letters it has processed, the worker's format) and,
where it has one, ``/metrics`` (Prometheus text).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import orjson

from stream_app.errors import UserError
from stream_app.kafka.local import LocalKafka, free_ports
from stream_app.kafka.topics import admin_client, create_topics, topic_specs, wait_for_broker
from stream_app.settings import ENV_PREFIX, Settings

READY_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 30.0


class SystemKind(StrEnum):
    """``worker`` is stream_app; plain and naive are the baselines of issue #6; the floor bounds
    what any Faust worker doing the same I/O reaches (measured for capacity only)."""

    WORKER = "worker"
    PLAIN = "plain-loop"
    NAIVE = "naive-faust"
    FLOOR = "faust-floor"


COMMANDS: Final[dict[SystemKind, list[str]]] = {
    SystemKind.WORKER: ["-m", "stream_app.cli", "worker"],
    SystemKind.PLAIN: ["-m", "load_tests.baselines.plain_loop"],
    SystemKind.NAIVE: ["-m", "load_tests.baselines.naive_faust"],
    SystemKind.FLOOR: ["-m", "load_tests.baselines.faust_floor"],
}
DESCRIPTIONS: Final[dict[SystemKind, str]] = {
    SystemKind.WORKER: "stream_app worker (Faust, ordered merge, outbox, tuned buffers)",
    SystemKind.PLAIN: "plain confluent-kafka loop: Consumer -> LivePipeline -> Producer, "
    "RocksDB state + changelog, offsets committed after delivery (no Faust)",
    SystemKind.NAIVE: "naive per-event Faust agent: decode -> Processor -> await send, "
    "Faust defaults (no merge, no outbox)",
    SystemKind.FLOOR: "Faust floor: the worker's Faust app, agent shape and I/O (a table write per "
    "customer per batch, a change and a membership record sent per event), no decoding and no "
    "segmentation (capacity only)",
}


@dataclass
class Broker:
    """The broker of a run. ``kafka`` is set only when this run started it (and must stop it)."""

    settings: Settings
    kafka: LocalKafka | None

    @property
    def bootstrap(self) -> str:
        return self.settings.bootstrap_servers

    def pid(self) -> int | None:
        if self.kafka is not None:
            return self.kafka.pid()
        return find_listener_pid(self.settings.bootstrap_servers)

    def stop(self) -> None:
        if self.kafka is not None:
            self.kafka.stop()
            self.kafka = None


@contextlib.contextmanager
def broker(bootstrap: str | None, state_dir: Path) -> Iterator[Broker]:
    """Use the broker at ``bootstrap``, or start a local one on free ports and stop it after."""
    if bootstrap:
        wait_for_broker(bootstrap, 30.0)
        yield Broker(Settings(bootstrap_servers=bootstrap, state_dir=state_dir), None)
        return
    port, controller = free_ports(2)
    settings = Settings(
        kafka_port=port,
        kafka_controller_port=controller,
        state_dir=state_dir,
    )
    kafka = LocalKafka(settings, echo=lambda line: print(line, file=sys.stderr))
    kafka.start()
    owned = Broker(settings, kafka)
    try:
        yield owned
    finally:
        owned.stop()


def find_listener_pid(bootstrap: str) -> int | None:
    """The pid listening on the bootstrap port (an external broker), if this machine runs it."""
    import psutil  # type: ignore[import-untyped]

    try:
        port = int(bootstrap.split(",", maxsplit=1)[0].rsplit(":", 1)[1])
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                pid: int | None = conn.pid
                return pid
    except (ValueError, IndexError, psutil.Error, OSError):
        return None
    return None


def renamed(base: Settings, name: str, **overrides: Any) -> Settings:
    """``base`` with an app id (so a consumer group and internal topics) and input and output
    topics of its own, all named after ``name``: a run on a shared broker sees no other run's
    messages or offsets."""
    names = {
        "app_id": name,
        "clickstream_topic": f"{name}-clickstream",
        "transactions_topic": f"{name}-transactions",
        "segment_changes_topic": f"{name}-segment-changes",
        "segment_membership_topic": f"{name}-segment-membership",
        "dead_letters_topic": f"{name}-dead-letters",
    }
    return Settings(**{**base.model_dump(), **names, **overrides})


def run_settings(
    base: Settings, name: str, partitions: int, state_dir: Path, **overrides: Any
) -> Settings:
    """Settings for one system of one run: its own topics, app id (consumer group) and port."""
    suffix = f"{name}-{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "state_dir": state_dir / suffix,
        "partitions": partitions,
        "web_port": free_ports(1)[0],
        "log_level": "WARNING",
    }
    return renamed(base, f"lt-{suffix}", **{**values, **overrides})


def delete_topics(settings: Settings) -> None:
    names = [spec.topic for spec in topic_specs(settings)]
    futures = admin_client(settings.bootstrap_servers).delete_topics(names, operation_timeout=10)
    for future in futures.values():
        with contextlib.suppress(Exception):
            future.result()


def get_json(url: str, timeout: float = 2.0) -> Any:
    """The decoded JSON body, or None if the server is not up or says it is not ready."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return orjson.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def get_text(url: str, timeout: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text: str = response.read().decode()
            return text
    except (urllib.error.URLError, OSError, ValueError):
        return None


def processed_count(counts: dict[str, Any]) -> int:
    """Input messages completely handled: valid events plus dead letters. A late event is counted
    in both (it is read as an event, then refused), so it is subtracted once."""
    events = sum(counts.get("events", {}).values())
    letters = counts.get("dead_letters", {})
    return int(events + sum(letters.values()) - letters.get("late_event", 0))


class SystemProcess:
    """A system under test in a subprocess; stopped with SIGTERM (then SIGKILL) by :meth:`stop`."""

    def __init__(self, kind: SystemKind, settings: Settings, log_path: Path) -> None:
        self.kind = kind
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def group_id(self) -> str:
        return self.settings.app_id

    @property
    def url(self) -> str:
        return f"http://{self.settings.web_host}:{self.settings.web_port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, create: bool = True) -> None:
        if create:
            create_topics(self.settings)
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(self.settings.to_env())
        env["PYTHONUNBUFFERED"] = "1"
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, *COMMANDS[self.kind]],
                env=env,
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Block until ``/ready`` answers 200; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.alive():
                raise UserError(
                    f"{self.kind} exited with {self.process and self.process.returncode} "
                    f"before it was ready: {self.log_tail(3)} (log {self.log_path})"
                )
            if get_json(self.url + "/ready") is not None:
                return time.monotonic() - started
            time.sleep(0.2)
        raise UserError(f"{self.kind} was not ready after {timeout:g}s (log {self.log_path})")

    def counts(self) -> dict[str, Any] | None:
        found = get_json(self.url + "/counts")
        return found if isinstance(found, dict) else None

    def processed(self) -> int | None:
        counts = self.counts()
        return None if counts is None else processed_count(counts)

    def metrics_text(self) -> str | None:
        return get_text(self.url + "/metrics")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, SIGKILL if it ignores it. Idempotent."""
        if self.process is None:
            return self.exit_code
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.exit_code = self.process.returncode
        self.process = None
        return self.exit_code
