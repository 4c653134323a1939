"""Shared fixtures: one real Kafka broker per test session, and isolated settings per test.

The broker is started by the same launcher users run (`stream-app kafka start`), on free ports,
with its state in a temporary folder; the jar cache is the user's own (shared across runs). Set
``STREAM_APP_TEST_BOOTSTRAP=host:port`` to run the integration tests against an existing broker
instead. Each test gets its own topic names, app id, state folder and web port, so tests never
see each other's messages or consumer groups.

Hermetic: every test runs without the developer's ``STREAM_APP_*`` settings (only the test
command's own variables, ``NOT_SETTINGS``, are kept), and a worker subprocess gets exactly the
variables of its Settings (``stream_app.live.workerproc``: the one runner of a worker subprocess,
which the load harness, ``demo`` and ``shadow`` use too).

Processes this session starts are recorded in ``$STREAM_APP_TEST_RUN_DIR`` when it is set
(`scripts/test.sh` sets it), so the test command can stop exactly those if the session is killed,
and never a user's worker or another session's broker. A record is removed once the session has
stopped its process itself. ``NAME.pid`` holds ``PID START MODE`` (START: the process's start time
from /proc, ``-`` without procfs; MODE: ``group`` when it leads its own process group, else
``single``); ``NAME.kafka`` is a symlink to a local broker's own pid file.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import hypothesis
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from load_tests.systems import delete_topics
from stream_app.contracts.events import SegmentChange
from stream_app.kafka.local import LocalKafka, free_ports
from stream_app.kafka.topics import create_topics, wait_for_broker
from stream_app.live import workerproc
from stream_app.live.workerproc import wait_until
from stream_app.settings import NOT_SETTINGS, Settings, is_prefixed

log = logging.getLogger(__name__)

# Speed is measured in benchmarks, never in unit tests: no per-example deadline and no
# "data generation too slow" check, which only fail when the machine is busy.
hypothesis.settings.register_profile(
    "stream_app", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile("stream_app")

TEST_BOOTSTRAP_ENV = "STREAM_APP_TEST_BOOTSTRAP"
RUN_DIR_ENV = "STREAM_APP_TEST_RUN_DIR"
assert {TEST_BOOTSTRAP_ENV, RUN_DIR_ENV} <= NOT_SETTINGS
WORKER_READY_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parent.parent  # the checkout whose code the workers run

SettingsFactory = Callable[..., Settings]
TopicsFactory = Callable[[Settings], dict[str, str]]


def without_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without any ``STREAM_APP_*`` settings (the test command's variables stay)."""
    return {k: v for k, v in environ.items() if not is_prefixed(k) or k in NOT_SETTINGS}


def _drop_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in set(os.environ) - set(without_settings(os.environ)):
        monkeypatch.delenv(name)


@pytest.fixture(scope="session", autouse=True)
def _hermetic_session() -> Iterator[None]:
    """Session fixtures (the broker's Settings) run before any test's: clean for them too."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _drop_settings(monkeypatch)
        yield


@pytest.fixture(autouse=True)
def _hermetic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's ``STREAM_APP_*`` settings; a test sets the ones it needs."""
    _drop_settings(monkeypatch)


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (field 22 of /proc/PID/stat), ``-`` without procfs, None if gone."""
    if not Path("/proc/self").exists():
        return "-"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # after "(comm)", which may hold spaces


class RunRecords:
    """The records of the processes this session started (see the module docstring)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    @classmethod
    def from_environment(cls) -> RunRecords:
        value = os.environ.get(RUN_DIR_ENV)
        return cls(Path(value) if value and Path(value).is_dir() else None)

    def process(self, pid: int, *, group: bool) -> Path | None:
        """Record a child; ``group`` when it was started with ``start_new_session``."""
        start = _start_time(pid)
        if self.folder is None or start is None:
            return None
        record = self.folder / f"process-{pid}.pid"
        temporary = record.with_suffix(".tmp")
        temporary.write_text(f"{pid} {start} {'group' if group else 'single'}\n")
        temporary.replace(record)
        return record

    def broker(self, kafka: LocalKafka) -> Path | None:
        """Record a local broker before it starts: a link to the pid file it writes itself."""
        if self.folder is None:
            return None
        record = self.folder / f"broker-{kafka.settings.kafka_port}.kafka"
        record.unlink(missing_ok=True)
        record.symlink_to(kafka.paths.pid_file)
        return record

    @staticmethod
    def forget(record: Path | None) -> None:
        """The session stopped that process itself."""
        if record is not None:
            record.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def run_records() -> RunRecords:
    """Record here any process a test starts that could outlive a killed session."""
    return RunRecords.from_environment()


@pytest.fixture(scope="session")
def kafka_broker(
    tmp_path_factory: pytest.TempPathFactory, run_records: RunRecords
) -> Iterator[Settings]:
    """Settings pointing at a running broker: ours (started here), or $STREAM_APP_TEST_BOOTSTRAP."""
    external = os.environ.get(TEST_BOOTSTRAP_ENV)
    if external:
        wait_for_broker(external, 30.0)
        yield Settings(bootstrap_servers=external)
        return
    port, controller = free_ports(2)
    settings = Settings(
        kafka_port=port,
        kafka_controller_port=controller,
        bootstrap_servers=f"127.0.0.1:{port}",
        state_dir=tmp_path_factory.mktemp("kafka-state"),
    )
    kafka = LocalKafka(settings, echo=log.info)
    record = run_records.broker(kafka)
    try:
        started = time.monotonic()
        kafka.start()
        log.info(
            "test broker up on %s in %.1fs", settings.bootstrap_servers, time.monotonic() - started
        )
        yield settings
    finally:
        kafka.stop()
        run_records.forget(record)


@pytest.fixture
def settings_factory(kafka_broker: Settings, tmp_path: Path) -> SettingsFactory:
    """Build Settings for the test broker with unique topics, app id, state folder and web port."""

    def make(**overrides: Any) -> Settings:
        suffix = uuid.uuid4().hex[:10]
        values: dict[str, Any] = {
            "state_dir": tmp_path / f"state-{suffix}",
            "partitions": 2,
            "web_port": free_ports(1)[0],
            "log_level": "INFO",
        }
        return kafka_broker.renamed(f"test-{suffix}", **{**values, **overrides})

    return make


@pytest.fixture
def topics_factory() -> Iterator[TopicsFactory]:
    """Create the application topics for some Settings; deletes them when the test ends."""
    created: list[Settings] = []

    def create(settings: Settings) -> dict[str, str]:
        created.append(settings)
        return create_topics(settings)

    yield create
    for settings in created:
        delete_topics(settings)


class WorkerProcess(workerproc.WorkerProcess):
    """`python -m stream_app.cli worker` in a subprocess, configured only through the environment
    (the runner of ``stream_app.live.workerproc``, started at once, in its log's folder, running
    this checkout's code).

    That is how it runs in production, so the tests exercise the real entry point, its signal
    handling and its shutdown, not an in-process imitation. Whatever goes wrong fails the test
    with the tail of the worker's log.
    """

    def __init__(
        self, settings: Settings, log_path: Path, records: RunRecords | None = None
    ) -> None:
        super().__init__(settings, log_path, pythonpath=[ROOT], workdir=log_path.parent)
        self.records = records or RunRecords(None)
        self.start()  # the test creates the topics it wants
        assert self.pid is not None
        self.record = self.records.process(self.pid, group=False)

    def fail(self, message: str) -> NoReturn:
        pytest.fail(f"{message}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40, separator: str = "\n") -> str:
        return super().log_tail(lines, separator)

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> float:
        """Until the worker serves `/counts` (not `/ready`: a test waits for what it needs)."""
        started = time.monotonic()
        self.wait_for(lambda _: True, timeout)
        return time.monotonic() - started

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit code."""
        code = super().stop(timeout)
        self.records.forget(self.record)
        if self.ignored_sigterm:
            pytest.fail(f"worker ignored SIGTERM for {timeout}s:\n{self.log_tail()}")
        assert code is not None
        return code

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        super().kill()
        self.records.forget(self.record)


WorkerFactory = Callable[[Settings], WorkerProcess]


def assert_one_history(
    received: Iterable[dict[str, Any]], stored: Mapping[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """No fork: one content per change_id, one change_id per (customer, sequence), and no gaps:
    each customer's sequences run on from 1 (or from the one after ``stored[customer]``, the
    sequence its bootstrapped state ends at). Returns the changes by change_id."""
    by_id: dict[str, dict[str, Any]] = {}
    by_sequence: dict[tuple[str, int], str] = {}
    for change in received:
        first = by_id.setdefault(change["change_id"], change)
        assert change == first, f"change {change['change_id']} came back with other content"
        slot = (change["customer_id"], change["sequence"])
        assert by_sequence.setdefault(slot, change["change_id"]) == change["change_id"], slot
    sequences: dict[str, list[int]] = {}
    for customer, sequence in by_sequence:
        sequences.setdefault(customer, []).append(sequence)
    for customer, seen in sequences.items():
        start = (stored or {}).get(customer, 0) + 1
        assert sorted(seen) == list(range(start, start + len(seen))), f"gap for {customer}: {seen}"
    return by_id


def segment_change(
    customer: str,
    sequence: int,
    at: datetime,
    current: dict[str, Any],
    previous: dict[str, Any] | None,
    *,
    change_id: str,
    component: str,
    purchase: float | None = None,
    churn: float | None = None,
    version: str = "m1",
    origin: str = "live",
) -> SegmentChange:
    """A valid SegmentChange with the given segments and scores (the report tests' input);
    `change_id` is any text, made into the contract's 32 hex characters."""
    return SegmentChange.model_validate(
        {
            "change_id": change_id.encode().hex().ljust(32, "0")[:32],
            "customer_id": customer,
            "sequence": sequence,
            "component": component,
            "previous": previous,
            "current": current,
            "scores": {"purchase_propensity": purchase, "churn_risk": churn, "absent": {}},
            "reason": {
                "trigger_event_id": "e",
                "trigger_event_type": "purchase",
                "summary": "s",
                "top_contributions": [],
            },
            "model_version": version,
            "segment_definition_version": "s1",
            "event_time": at,
            "processed_at": at,
            "origin": origin,
        }
    )


def final_segments(changes: Iterable[dict[str, Any]]) -> dict[str, tuple[int, dict[str, Any]]]:
    """Each customer's last (highest-sequence) change: its sequence and current segment."""
    final: dict[str, tuple[int, dict[str, Any]]] = {}
    for change in changes:
        customer, sequence = change["customer_id"], change["sequence"]
        if customer not in final or final[customer][0] < sequence:
            final[customer] = (sequence, change["current"])
    return final


class TopicReader:
    """An independent consumer of one topic (plain confluent-kafka, not our subscriber), from the
    beginning, in its own group: every message as it came (``messages``), decoded from JSON
    (``received``) and its size."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "group.id": f"{settings.app_id}-outside-{topic}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([topic])
        self.topic = topic
        self.messages: list[Any] = []
        self.received: list[dict[str, Any]] = []
        self.sizes: list[int] = []

    def _consume(self, timeout: float) -> None:
        for msg in self.consumer.consume(1000, timeout=timeout):
            if msg.error() is None:
                self.messages.append(msg)
                self.received.append(orjson.loads(msg.value()))
                self.sizes.append(len(msg.value()))

    def poll(self, seconds: float) -> None:
        """Read whatever arrives for ``seconds``."""
        wait_until(lambda: False, seconds, 0.2, self._consume)

    def read_to_end(self, timeout: float = 60.0) -> None:
        """Read until every partition is read up to the end it has now (a fixed time is not
        enough on a loaded machine: a reader that stopped early saw stale final segments)."""
        topic = self.topic
        metadata = self.consumer.list_topics(topic, timeout=10)
        ends = {}
        for partition in metadata.topics[topic].partitions:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            ends[partition] = high

        def done() -> bool:
            last: dict[int, int] = {}
            for msg in self.messages:
                last[msg.partition()] = max(last.get(msg.partition(), -1), msg.offset())
            return all(high == 0 or last.get(p, -1) + 1 >= high for p, high in ends.items())

        assert wait_until(done, timeout, 0.2, self._consume), (ends, len(self.messages))

    def until(self, done: Callable[[list[dict[str, Any]]], bool], timeout: float) -> bool:
        """Read until ``done(received)`` or ``timeout``; the test asserts on what it got."""
        return wait_until(lambda: done(self.received), timeout, 0.5, self.poll)

    def unique(self) -> dict[str, dict[str, Any]]:
        """The changes received, by change id (a re-sent change is the same change)."""
        return {change["change_id"]: change for change in self.received}

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def worker_factory(tmp_path: Path, run_records: RunRecords) -> Iterator[WorkerFactory]:
    """Start worker subprocesses; any still running when the test ends is killed."""
    workers: list[WorkerProcess] = []

    def start(settings: Settings) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log", run_records)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.kill()
