"""A single-node Apache Kafka broker (KRaft, combined broker+controller) on 127.0.0.1.

The machines we develop on have Java and Maven but no Docker engine, so the broker runs from
Kafka's own artifacts: Maven resolves them once into a per-version cache outside the repository,
and ``java -cp <jars> kafka.Kafka`` runs them. Everything else (config, data, logs, pid file) lives
under ``settings.kafka_dir``, so one state folder is one broker. Storage is formatted once per
state folder and reused on restart. Nothing here runs at import time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from stream_app.errors import UserError
from stream_app.kafka.topics import admin_client, broker_answers
from stream_app.settings import Settings

log = logging.getLogger(__name__)

SLF4J_VERSION: Final = "1.7.36"
RELOAD4J_VERSION: Final = "1.2.25"
KAFKA_MAIN: Final = "kafka.Kafka"
STOP_TIMEOUT_S: Final = 30.0
MAVEN_TIMEOUT_S: Final = 900.0
NOT_RUNNING_EXIT: Final = 3  # LSB convention for `status` of a stopped service

Echo = Callable[[str], None]


@dataclass(frozen=True)
class KafkaPaths:
    """Where one local broker keeps its files (all absolute, under ``settings.kafka_dir``)."""

    root: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaPaths:
        return cls(settings.kafka_dir.expanduser().resolve())

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def server_properties(self) -> Path:
        return self.root / "config" / "server.properties"

    @property
    def log4j_properties(self) -> Path:
        return self.root / "config" / "log4j.properties"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"

    @property
    def console_log(self) -> Path:
        """The JVM's own stdout/stderr: only JVM-level failures (bad -Xmx, no class) land here."""
        return self.logs / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "kafka.pid"

    @property
    def cluster_id_file(self) -> Path:
        return self.root / "cluster.id"

    @property
    def formatted_marker(self) -> Path:
        return self.data / "meta.properties"


@dataclass(frozen=True)
class KafkaStatus:
    """What ``status`` found: a live pid, whether it answers, and where to look."""

    running: bool
    answering: bool
    pid: int | None
    bootstrap: str
    log_file: Path

    def describe(self) -> str:
        if self.running and self.answering:
            return f"running (pid {self.pid}, bootstrap {self.bootstrap}, log {self.log_file})"
        if self.running:
            return (
                f"running but not answering (pid {self.pid}, bootstrap {self.bootstrap}, "
                f"log {self.log_file})"
            )
        return f"stopped (bootstrap {self.bootstrap})"


# --- rendering (pure) -------------------------------------------------------------------------


def render_pom(kafka_version: str) -> str:
    """A packaging-``pom`` project whose runtime dependencies are exactly the broker's jars."""
    deps = [
        ("org.apache.kafka", "kafka_2.13", kafka_version),
        ("org.slf4j", "slf4j-reload4j", SLF4J_VERSION),
        ("ch.qos.reload4j", "reload4j", RELOAD4J_VERSION),
    ]
    rendered = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.stream_app</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{kafka_version}</version>
  <packaging>pom</packaging>
  <dependencies>
{rendered}
  </dependencies>
</project>
"""


def render_server_properties(settings: Settings, data_dir: Path) -> str:
    """KRaft combined mode on loopback, sized for one node (replication factors of 1)."""
    port, controller = settings.kafka_port, settings.kafka_controller_port
    if port == controller:
        raise UserError(f"kafka_port and kafka_controller_port are both {port}; they must differ")
    entries = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": str(settings.partitions),
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # After a crash (SIGKILL) the restarted controller refuses the broker's new registration
        # until the old incarnation's session expires: 9 s by default, 4 s here.
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "4000",
        # Topics are pre-created (`stream-app topics create`); Faust creates its internal
        # topics through the admin API, which this setting does not affect.
        "auto.create.topics.enable": "false",
    }
    lines = ["# Written by stream_app.kafka.local on every start; edits are overwritten."]
    lines += [f"{key}={value}" for key, value in entries.items()]
    return "\n".join(lines) + "\n"


def render_log4j(server_log: Path) -> str:
    """One rolling file for the broker, so failures have a real log to point at."""
    return f"""log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={server_log}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=3
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.request.logger=WARN
"""


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, as StorageTool does.

    Kafka never hands out ids starting with "-" (they would read as a command-line flag).
    """
    while True:
        cluster_id = urlsafe_b64encode(secrets.token_bytes(16)).decode("ascii").rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def jvm_command(java: str, settings: Settings, paths: KafkaPaths, libs: Path) -> list[str]:
    """The broker's command line (what ``kafka-server-start.sh`` would run, minus the script)."""
    return [
        java,
        f"-Xmx{settings.kafka_heap}",
        "-Djava.awt.headless=true",
        "-XX:+ExitOnOutOfMemoryError",
        f"-Dlog4j.configuration=file:{paths.log4j_properties}",
        f"-Dkafka.logs.dir={paths.logs}",
        "-cp",
        f"{libs}/*",
        KAFKA_MAIN,
        str(paths.server_properties),
    ]


# --- prerequisites and artifacts --------------------------------------------------------------


def require_tools(*, need_maven: bool) -> str:
    """Return the ``java`` executable, or say exactly which prerequisite is missing."""
    missing = [tool for tool, needed in (("java", True), ("mvn", need_maven)) if needed]
    missing = [tool for tool in missing if shutil.which(tool) is None]
    if missing:
        names = " and ".join(f"`{tool}`" for tool in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(
            f"{names} {verb} not on PATH, so the local Kafka broker cannot run here; "
            "install a JDK 17+ and Maven, or use `docker compose up` instead"
        )
    java = shutil.which("java")
    assert java is not None
    return java


def jar_cache(settings: Settings) -> Path:
    """The per-version jar folder, shared by every state folder and checkout of this user."""
    return settings.cache_dir.expanduser().resolve() / "kafka" / settings.kafka_version / "libs"


def _cached_jars(libs: Path, version: str) -> bool:
    return (libs / f"kafka_2.13-{version}.jar").is_file()


def resolve_jars(settings: Settings, echo: Echo) -> Path:
    """Resolve Kafka's runtime jars with Maven into the cache (first run only)."""
    libs = jar_cache(settings)
    if _cached_jars(libs, settings.kafka_version):
        return libs
    require_tools(need_maven=True)
    home = libs.parent
    home.mkdir(parents=True, exist_ok=True)
    pom = home / "pom.xml"
    pom.write_text(render_pom(settings.kafka_version))
    staging = home / f".libs-{os.getpid()}-{secrets.token_hex(4)}"
    echo(f"resolving Kafka {settings.kafka_version} with Maven into {libs} (first run only)")
    _run_maven(pom, staging)
    try:
        staging.rename(libs)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    if not _cached_jars(libs, settings.kafka_version):
        raise UserError(f"Maven finished but {libs} has no kafka_2.13 jar; delete it and retry")
    return libs


def _run_maven(pom: Path, output: Path) -> None:
    command = [
        "mvn",
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={output}",
        "-DincludeScope=runtime",
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=MAVEN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(output, ignore_errors=True)
        raise UserError(f"Maven did not resolve Kafka within {MAVEN_TIMEOUT_S:g}s") from exc
    if done.returncode != 0:
        shutil.rmtree(output, ignore_errors=True)
        hint = _first_line(done.stdout + done.stderr, ("[ERROR]",))
        raise UserError(f"Maven could not resolve Kafka (exit {done.returncode}): {hint}")


_EXCEPTION_LINE: Final = re.compile(r"^[\w.$]+(Exception|Error)\b")


def _first_line(text: str, markers: tuple[str, ...] = ()) -> str:
    """The first line carrying one of ``markers`` (else the first non-blank line), shortened.

    The first error is the cause; the ones after it are usually its consequences. When the error
    is followed by a Java exception, the exception's message is the informative part.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    marked = [i for i, line in enumerate(lines) if any(m in line for m in markers)]
    index = marked[0] if marked else 0
    if not lines:
        return "no output"
    chosen = lines[index]
    if index + 1 < len(lines) and _EXCEPTION_LINE.match(lines[index + 1]):
        chosen = lines[index + 1]
    return chosen if len(chosen) <= 240 else chosen[:237] + "..."


# --- process helpers --------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now (all held open together, so they are distinct)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _pid_runs_kafka(pid: int, server_properties: Path) -> bool:
    """True if ``pid`` is alive and is *our* broker, so a recycled pid is never signalled."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path(f"/proc/{pid}/cmdline")
    if not Path("/proc/self").exists():  # no procfs (macOS): trust the pid file
        return True
    try:
        argv = proc.read_bytes().split(b"\0")
    except OSError:
        return False
    # A zombie has an empty command line; it is dead for our purposes.
    return KAFKA_MAIN.encode() in argv and str(server_properties).encode() in argv


# --- the launcher -----------------------------------------------------------------------------


class LocalKafka:
    """Start, stop and inspect the local broker described by ``settings``.

    ``echo`` receives the human-readable progress lines (the CLI prints them; tests log them).
    """

    def __init__(self, settings: Settings, echo: Echo | None = None) -> None:
        self.settings = settings
        self.paths = KafkaPaths.from_settings(settings)
        self.bootstrap = f"127.0.0.1:{settings.kafka_port}"
        self._echo: Echo = echo or log.info
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offsets: dict[Path, int] = {}

    # -- queries --

    def pid(self) -> int | None:
        """The pid in the pid file, if the file exists and holds a number."""
        try:
            return int(self.paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None  # our child: poll() also reaps it
        return _pid_runs_kafka(pid, self.paths.server_properties)

    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and self._alive(pid)

    def status(self) -> KafkaStatus:
        pid = self.pid()
        running = pid is not None and self._alive(pid)
        answering = running and broker_answers(admin_client(self.bootstrap), 3.0)
        return KafkaStatus(
            running, answering, pid if running else None, self.bootstrap, self.log_file
        )

    @property
    def log_file(self) -> Path:
        return self.paths.server_log

    # -- start --

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One start or stop at a time per state folder, so two CLIs never race on the pid file."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        with (self.paths.root / "launcher.lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def start(self) -> bool:
        """Start the broker and wait until it answers; False if it was already running."""
        with self._exclusive():
            return self._start()

    def _start(self) -> bool:
        pid = self.pid()
        if pid is not None and self._alive(pid):
            self._wait_until_answering(pid, stop_on_timeout=False)
            return False
        self.paths.pid_file.unlink(missing_ok=True)
        self._check_ports_free()
        java = require_tools(
            need_maven=not _cached_jars(jar_cache(self.settings), self.settings.kafka_version)
        )
        libs = resolve_jars(self.settings, self._echo)
        self._write_config()
        self._format_storage_once(java, libs)
        self._spawn(java, libs)
        assert self._proc is not None
        self._wait_until_answering(self._proc.pid, stop_on_timeout=True)
        return True

    def _check_ports_free(self) -> None:
        for name, port in (
            ("kafka_port", self.settings.kafka_port),
            ("kafka_controller_port", self.settings.kafka_controller_port),
        ):
            if _port_in_use(port):
                env = f"STREAM_APP_{name.upper()}"
                raise UserError(
                    f"port {port} on 127.0.0.1 is already in use (another broker?); "
                    f"stop it or choose another port with {env}"
                )

    def _write_config(self) -> None:
        for folder in (self.paths.data, self.paths.logs, self.paths.server_properties.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.paths.server_properties.write_text(
            render_server_properties(self.settings, self.paths.data)
        )
        self.paths.log4j_properties.write_text(render_log4j(self.paths.server_log))

    def _format_storage_once(self, java: str, libs: Path) -> None:
        """Format the data folder the first time; later starts reuse it (and its cluster id)."""
        if self.paths.formatted_marker.exists():
            return
        if self.paths.cluster_id_file.exists():
            cluster_id = self.paths.cluster_id_file.read_text().strip()
        else:
            cluster_id = new_cluster_id()
            self.paths.cluster_id_file.write_text(cluster_id + "\n")
        command = [
            java,
            f"-Dlog4j.configuration=file:{self.paths.log4j_properties}",
            "-cp",
            f"{libs}/*",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.paths.server_properties),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            hint = _first_line(done.stdout + done.stderr, ("ERROR", "Exception"))
            raise UserError(f"formatting Kafka storage in {self.paths.data} failed: {hint}")

    def _spawn(self, java: str, libs: Path) -> None:
        """Run the JVM in its own session, so it outlives the CLI process that started it."""
        command = jvm_command(java, self.settings, self.paths, libs)
        self._log_offsets = {
            path: path.stat().st_size if path.exists() else 0
            for path in (self.paths.console_log, self.paths.server_log)
        }
        with self.paths.console_log.open("ab") as console:
            self._proc = subprocess.Popen(
                command,
                cwd=self.paths.root,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        temporary = self.paths.pid_file.with_suffix(".tmp")
        temporary.write_text(f"{self._proc.pid}\n")
        temporary.replace(self.paths.pid_file)

    def _wait_until_answering(self, pid: int, *, stop_on_timeout: bool) -> None:
        timeout = self.settings.kafka_start_timeout_s
        deadline = time.monotonic() + timeout
        admin = admin_client(self.bootstrap)
        while time.monotonic() < deadline:
            if not self._alive(pid):
                self.paths.pid_file.unlink(missing_ok=True)
                raise UserError(f"Kafka exited while starting: {self._failure_hint()}")
            if not _port_in_use(self.settings.kafka_port):
                time.sleep(0.2)
                continue
            if broker_answers(admin, 1.0):
                return
            time.sleep(0.2)
        if stop_on_timeout:
            self._stop(STOP_TIMEOUT_S)
        outcome = "was stopped" if stop_on_timeout else "is still running (`stream-app kafka stop`)"
        raise UserError(
            f"Kafka did not answer on {self.bootstrap} within {timeout:g}s and {outcome}; "
            f"see {self.log_file}"
        )

    def _failure_hint(self) -> str:
        """The last error this start wrote (JVM console first, then the broker log), and where."""
        sources = ((self.paths.console_log, ()), (self.paths.server_log, (" ERROR ", " FATAL ")))
        for path, markers in sources:
            try:
                with path.open("rb") as handle:
                    handle.seek(self._log_offsets.get(path, 0))
                    text = handle.read().decode(errors="replace")
            except OSError:
                continue
            if text.strip():
                return f"{_first_line(text, markers)} (see {path})"
        return f"no output (see {self.paths.server_log})"

    # -- stop --

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """SIGTERM our broker, SIGKILL it after ``timeout`` s; False if nothing was running."""
        if not self.paths.root.exists():
            return False
        with self._exclusive():
            return self._stop(timeout)

    def _stop(self, timeout: float) -> bool:
        pid = self.pid()
        if pid is None or not self._alive(pid):
            self.paths.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        if not self._wait_for_exit(pid, timeout):
            log.warning("Kafka (pid %d) ignored SIGTERM for %gs; killing it", pid, timeout)
            os.kill(pid, signal.SIGKILL)
            self._wait_for_exit(pid, 10.0)
        self.paths.pid_file.unlink(missing_ok=True)
        self._proc = None
        return True

    def _wait_for_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive(pid):
                return True
            time.sleep(0.1)
        return not self._alive(pid)


def run_kafka_command(action: str, settings: Settings) -> int:
    """`stream-app kafka start|stop|status`; status exits 3 when the broker is stopped."""
    kafka = LocalKafka(settings, echo=lambda line: print(line, file=sys.stderr))
    if action == "start":
        started = kafka.start()
        state = "started" if started else "already running"
        print(f"Kafka {state}: {kafka.status().describe()}")
        return 0
    if action == "stop":
        print("Kafka stopped" if kafka.stop() else "Kafka was not running")
        return 0
    if action == "status":
        current = kafka.status()
        print(current.describe())
        return 0 if current.running else NOT_RUNNING_EXIT
    raise UserError(f"unknown kafka action {action!r} (use start, stop or status)")
