"""What a load run talks to: the broker (ours, or one that is already running) and the system under
test (the stream_app worker, or a baseline), each a subprocess configured by STREAM_APP_* variables.

Every system serves the same small HTTP interface on its web port: ``/ready`` (200 once it owns
its partitions), ``/counts`` (events and dead letters it has processed, the worker's format) and,
where it has one, ``/metrics`` (Prometheus text).

Every system runs in the runner the integration tests (tests/conftest.py), ``demo`` and
``shadow`` start their workers with: ``stream_app.live.workerproc.WorkerProcess``;
:class:`SystemProcess` only chooses which system's command it launches.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from stream_app.kafka.local import LocalKafka, free_ports
from stream_app.kafka.topics import admin_client, create_topics, topic_specs, wait_for_broker
from stream_app.live.workerproc import WorkerProcess
from stream_app.settings import Settings

ROOT: Final = Path(__file__).resolve().parent.parent  # `load_tests` is importable from here


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
    return base.renamed(f"lt-{suffix}", **{**values, **overrides})


def delete_topics(settings: Settings) -> None:
    """Delete the application's topics (as `create_topics` made them), whatever is left of them."""
    names = [spec.topic for spec in topic_specs(settings)]
    futures = admin_client(settings.bootstrap_servers).delete_topics(names, operation_timeout=10)
    for future in futures.values():
        with contextlib.suppress(Exception):
            future.result()


def processed_count(counts: dict[str, Any]) -> int:
    """Input messages completely handled: valid events plus dead letters. A late event is counted
    in both (it is read as an event, then refused), so it is subtracted once."""
    events = sum(counts.get("events", {}).values())
    letters = counts.get("dead_letters", {})
    return int(events + sum(letters.values()) - letters.get("late_event", 0))


class SystemProcess(WorkerProcess):
    """A system under test in a subprocess: the shared runner (``stream_app.live.workerproc``),
    launching the command of its ``kind`` with this checkout first on its PYTHONPATH (the
    baselines are modules of ``load_tests``) and in its log's folder (what it writes there stays
    with the run). :meth:`start` creates its topics first unless told not to."""

    def __init__(self, kind: SystemKind, settings: Settings, log_path: Path) -> None:
        super().__init__(
            settings,
            log_path,
            command=COMMANDS[kind],
            name=str(kind),
            pythonpath=[ROOT],
            workdir=log_path.parent,
        )
        self.kind = kind

    def start(self, create: bool = True) -> None:
        """Create its topics (unless ``create`` is False) and start it, its output appended to
        ``log_path``."""
        if create:
            create_topics(self.settings)
        super().start()

    def processed(self) -> int | None:
        counts = self.counts()
        return None if counts is None else processed_count(counts)
