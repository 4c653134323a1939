"""A worker as a child process (`stream-app worker`), as in production: start it, wait until it
is ready, ask its web server, stop it (SIGTERM, then SIGKILL) or kill it (the crash path).

The one runner of a worker subprocess (:class:`WorkerProcess`): `demo` and `shadow` use it for a
while (:func:`worker_process`), the load harness launches its systems with it
(``load_tests.systems.SystemProcess`` picks which system's command to run) and the integration
tests start their workers with it (``tests/conftest.py``: failures become test failures, and
the process is recorded for the test command's cleanup).

The child gets exactly the given Settings through ``STREAM_APP_*`` variables (none inherited from
this process): :func:`child_env`.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

import orjson

from stream_app.errors import UserError
from stream_app.settings import Settings, is_prefixed

WORKER_COMMAND: Final = ("-m", "stream_app.cli", "worker")
READY_TIMEOUT_S: Final = 120.0
TOOL_READY_TIMEOUT_S: Final = 90.0  # what `demo` and `shadow` give their worker
STOP_TIMEOUT_S: Final = 30.0


def child_env(settings: Settings) -> dict[str, str]:
    """A child's whole environment: ours without any ``STREAM_APP_*`` variable, plus exactly
    those of ``settings``."""
    inherited = {k: v for k, v in os.environ.items() if not is_prefixed(k)}
    return {**inherited, **settings.to_env()}


def run_cli(
    settings: Settings, *args: str, cwd: Path | None = None, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """`stream-app ARGS` as an operator runs it, configured by `settings` alone (the
    environment of :func:`child_env`); its output captured as text, its exit code not
    checked."""
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", *args],
        cwd=cwd,
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
    """GET ``url``: the status and body of the answer (an error status too), or None while
    nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        body = b""
        with contextlib.suppress(OSError):
            body = exc.read()
        return int(exc.code), body
    except OSError:  # refused, reset, timed out (URLError is one)
        return None


def wait_until(
    done: Callable[[], bool],
    timeout: float,
    every: float = 0.2,
    pause: Callable[[float], object] = time.sleep,
) -> bool:
    """Ask ``done`` every ``every`` seconds (``pause`` waits, or does the work between two asks,
    e.g. consumes a topic) until it says yes; False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        pause(every)
    return False


class WorkerProcess:
    """A worker (or a system serving the worker's web interface: ``/ready``, ``/counts``,
    ``/metrics``) in a subprocess, configured only by its Settings' variables.

    :meth:`start` launches ``python COMMAND`` (``-m stream_app.cli worker`` unless told otherwise)
    with its output in ``log_path``; :meth:`stop` is SIGTERM (then SIGKILL), :meth:`kill` SIGKILL.
    Only the process this object started is ever signalled, by its pid. A mistake it reports
    (exited, never ready) goes through :meth:`fail`, a UserError here (a subclass may fail a
    test instead).

    ``pythonpath``: folders put first on the child's PYTHONPATH (the tests' and the load harness'
    checkout, so the child runs the code the parent runs); ``workdir``: the child's working
    directory (default this process's); ``fresh_log``: truncate the log instead of appending."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        *,
        command: Sequence[str] = WORKER_COMMAND,
        name: str = "worker",
        pythonpath: Sequence[Path] = (),
        workdir: Path | None = None,
        fresh_log: bool = False,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.command = tuple(command)
        self.name = name
        self.pythonpath = tuple(pythonpath)
        self.workdir = workdir
        self.fresh_log = fresh_log
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

    def environment(self) -> dict[str, str]:
        """The child's environment: :func:`child_env`, unbuffered output, ``pythonpath`` first."""
        env = child_env(self.settings)
        env["PYTHONUNBUFFERED"] = "1"
        if self.pythonpath:
            folders = [*map(str, self.pythonpath), env.get("PYTHONPATH")]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, folders))
        return env

    def start(self) -> None:
        """Start it, its output (stdout and stderr) in ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb" if self.fresh_log else "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, *self.command],
                env=self.environment(),
                cwd=self.workdir,
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
        return f"{self.name} exited with {code}"

    def get(self, path: str) -> bytes | None:
        """The body of a 2xx answer to ``path``; None if it is not up or answers an error."""
        answer = http_get(self.url + path)
        if answer is None or not 200 <= answer[0] < 300:
            return None
        return answer[1]

    def get_json(self, path: str) -> Any:
        """The decoded JSON of a 2xx answer to ``path``; None if it is not up, not ready (an
        error status) or not JSON."""
        body = self.get(path)
        if body is None:
            return None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Block until ``/ready`` answers 200 (the worker has its partitions and has recovered
        its tables); returns the seconds it took."""
        started = time.monotonic()

        def ready() -> bool:
            if not self.alive():
                self.fail(f"{self._exited()} before it was ready: {self.log_tail(3, ' | ')}")
            return self.get_json("/ready") is not None

        if not wait_until(ready, timeout):
            self.fail(f"{self.name} was not ready after {timeout:g}s")
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
            self.fail(f"{self.name} counts never matched (last {last}) in {timeout}s")
        return last

    def counts(self) -> dict[str, Any] | None:
        """``/counts`` (events and dead letters processed), or None while it is not serving."""
        found = self.get_json("/counts")
        return found if isinstance(found, dict) else None

    def metrics_text(self) -> str | None:
        body = self.get("/metrics")
        return None if body is None else body.decode(errors="replace")

    def log_tail(self, lines: int = 20, separator: str = "\n") -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return separator.join(text.splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful: offsets committed, model snapshot written), wait, SIGKILL if it
        ignores it. Idempotent. Returns the exit code."""
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


@contextlib.contextmanager
def worker_process(
    settings: Settings, log_path: Path, echo: Callable[[str], None] = print
) -> Iterator[WorkerProcess]:
    """Run a worker (a fresh ``log_path``) until the block ends, then stop it and say so."""
    worker = WorkerProcess(settings, log_path, fresh_log=True)
    worker.start()
    try:
        yield worker
    finally:
        code = worker.stop()
        echo(f"worker stopped (exit {code}); its JSON log: {log_path}")
