"""Shared fixtures: one real Kafka broker per test session, and isolated settings per test.

The broker is started by the same launcher users run (`stream-app kafka start`), on free ports,
with its state in a temporary folder; the jar cache is the user's own (shared across runs). Set
``STREAM_APP_TEST_BOOTSTRAP=host:port`` to run the integration tests against an existing broker
instead. Each test gets its own topic names, app id, state folder and web port, so tests never
see each other's messages or consumer groups.

Hermetic: every test runs without the developer's ``STREAM_APP_*`` settings (only the test
command's own variables, ``NOT_SETTINGS``, are kept), and a worker subprocess gets exactly the
variables of its Settings.

Processes this session starts are recorded in ``$STREAM_APP_TEST_RUN_DIR`` when it is set
(`scripts/test.sh` sets it), so the test command can stop exactly those if the session is killed,
and never a user's worker or another session's broker. A record is removed once the session has
stopped its process itself. ``NAME.pid`` holds ``PID START MODE`` (START: the process's start time
from /proc, ``-`` without procfs; MODE: ``group`` when it leads its own process group, else
``single``); ``NAME.kafka`` is a symlink to a local broker's own pid file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import hypothesis
import orjson
import pytest

from load_tests.systems import renamed
from stream_app.kafka.local import LocalKafka, free_ports
from stream_app.kafka.topics import admin_client, create_topics, topic_specs, wait_for_broker
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


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``STREAM_APP_*`` variables that make a child process load exactly ``settings``."""
    return settings.to_env()


def child_env(settings: Settings) -> dict[str, str]:
    """A child's whole environment: ours without any ``STREAM_APP_*`` variable (not even the test
    command's), plus exactly those of ``settings``."""
    inherited = {k: v for k, v in os.environ.items() if not is_prefixed(k)}
    return {**inherited, **settings_env(settings)}


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
        return renamed(kafka_broker, f"test-{suffix}", **{**values, **overrides})

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
        names = [spec.topic for spec in topic_specs(settings)]
        futures = admin_client(settings.bootstrap_servers).delete_topics(
            names, operation_timeout=10
        )
        for future in futures.values():
            with contextlib.suppress(Exception):
                future.result()


class WorkerProcess:
    """`python -m stream_app.cli worker` in a subprocess, configured only through the environment.

    That is how it runs in production, so the tests exercise the real entry point, its signal
    handling and its shutdown, not an in-process imitation.
    """

    def __init__(
        self, settings: Settings, log_path: Path, records: RunRecords | None = None
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.records = records or RunRecords(None)
        env = child_env(settings)
        env["PYTHONUNBUFFERED"] = "1"
        with log_path.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stream_app.cli", "worker"],
                cwd=log_path.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.record = self.records.process(self.process.pid, group=False)

    @property
    def counts_url(self) -> str:
        return f"http://{self.settings.web_host}:{self.settings.web_port}/counts"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no worker log)"
        return "\n".join(text.splitlines()[-lines:])

    def counts(self) -> dict[str, Any] | None:
        """The worker's `/counts` JSON, or None while its web server is not up."""
        try:
            with urllib.request.urlopen(self.counts_url, timeout=2) as response:
                data: dict[str, Any] = orjson.loads(response.read())
                return data
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        """Poll `/counts` until ``predicate`` holds; fail with the worker's log if it never does."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            last = self.counts()
            if last is not None and predicate(last):
                return last
            time.sleep(0.2)
        pytest.fail(f"worker counts never matched (last {last}) in {timeout}s:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> None:
        self.wait_for(lambda _: True, timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"worker ignored SIGTERM for {timeout}s:\n{self.log_tail()}")
        self.records.forget(self.record)
        return code

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.records.forget(self.record)


WorkerFactory = Callable[[Settings], WorkerProcess]


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
