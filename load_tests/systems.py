"""What a load run talks to: the broker (ours, or one that is already running) and the system under
test (the stream_app worker, or a baseline), each a subprocess configured by STREAM_APP_* variables.

Every system serves the same small HTTP interface on its web port: ``/ready`` (200 once it owns
its partitions), ``/counts`` (events and dead letters it has processed, the worker's format) and,
where it has one, ``/metrics`` (Prometheus text).

The integration tests (tests/conftest.py) and the benchmarks start their workers with the same
pieces: :class:`SystemProcess` (with ``Settings.renamed`` and ``stream_app.live.workerproc``'s
:func:`http_get` and :func:`wait_until`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, NoReturn

import orjson

from stream_app.errors import UserError
from stream_app.kafka.local import LocalKafka, free_ports
from stream_app.kafka.topics import admin_client, create_topics, topic_specs, wait_for_broker
from stream_app.live.workerproc import http_get, wait_until
from stream_app.settings import Settings, is_prefixed

READY_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 30.0
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


def child_env(settings: Settings) -> dict[str, str]:
    """A child's whole environment: ours without any ``STREAM_APP_*`` variable, plus exactly
    those of ``settings``."""
    inherited = {k: v for k, v in os.environ.items() if not is_prefixed(k)}
    return {**inherited, **settings.to_env()}


def processed_count(counts: dict[str, Any]) -> int:
    """Input messages completely handled: valid events plus dead letters. A late event is counted
    in both (it is read as an event, then refused), so it is subtracted once."""
    events = sum(counts.get("events", {}).values())
    letters = counts.get("dead_letters", {})
    return int(events + sum(letters.values()) - letters.get("late_event", 0))


class SystemProcess:
    """A system under test in a subprocess (`start` it), configured only by its Settings' variables;
    stopped with SIGTERM (then SIGKILL) by :meth:`stop`. A mistake it reports (exited, never
    ready) goes through :meth:`fail`, a UserError here (a test's pytest.fail in conftest)."""

    def __init__(self, kind: SystemKind, settings: Settings, log_path: Path) -> None:
        self.kind = kind
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.ignored_sigterm = False  # the last stop() had to SIGKILL it

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
        """Create its topics (unless ``create`` is False) and start it, its output appended to
        ``log_path``, in the log's folder (what it writes there stays with the run)."""
        if create:
            create_topics(self.settings)
        env = child_env(self.settings)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, *COMMANDS[self.kind]],
                env=env,
                cwd=self.log_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def fail(self, message: str) -> NoReturn:
        raise UserError(f"{message} (log {self.log_path})")

    def _exited(self) -> str:
        code = self.exit_code if self.process is None else self.process.returncode
        return f"{self.kind} exited with {code}"

    def get_json(self, path: str) -> Any:
        """The decoded JSON of a 2xx answer to ``path``; None if it is not up, not ready (an
        error status) or not JSON."""
        answer = http_get(self.url + path)
        if answer is None or not 200 <= answer[0] < 300:
            return None
        try:
            return orjson.loads(answer[1])
        except orjson.JSONDecodeError:
            return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Block until ``/ready`` answers 200; returns the seconds it took."""
        started = time.monotonic()

        def ready() -> bool:
            if not self.alive():
                self.fail(f"{self._exited()} before it was ready: {self.log_tail(3, ' | ')}")
            return self.get_json("/ready") is not None

        if not wait_until(ready, timeout):
            self.fail(f"{self.kind} was not ready after {timeout:g}s")
        return time.monotonic() - started

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 60.0,
        every: float = 0.2,
    ) -> dict[str, Any]:
        """Poll ``/counts`` until ``predicate`` holds; fail if it exits or never does."""
        last: dict[str, Any] | None = None

        def matched() -> bool:
            nonlocal last
            if not self.alive():
                self.fail(self._exited())
            last = self.counts()
            return last is not None and predicate(last)

        if not wait_until(matched, timeout, every) or last is None:
            self.fail(f"{self.kind} counts never matched (last {last}) in {timeout}s")
        return last

    def counts(self) -> dict[str, Any] | None:
        """``/counts`` (events and dead letters processed), or None while it is not serving."""
        found = self.get_json("/counts")
        return found if isinstance(found, dict) else None

    def processed(self) -> int | None:
        counts = self.counts()
        return None if counts is None else processed_count(counts)

    def metrics_text(self) -> str | None:
        answer = http_get(self.url + "/metrics")
        if answer is None or not 200 <= answer[0] < 300:
            return None
        return answer[1].decode(errors="replace")

    def log_tail(self, lines: int = 20, separator: str = "\n") -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return separator.join(text.splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, SIGKILL if it ignores it. Idempotent. Returns the exit code."""
        self.ignored_sigterm = False
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.ignored_sigterm = True
        self.kill()
        return self.exit_code

    def kill(self) -> None:
        """SIGKILL (the crash path) unless it has exited; then it is reaped. Idempotent."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.exit_code = self.process.returncode
        self.process = None
