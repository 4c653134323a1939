"""A worker as a child process (`stream-app worker`), as in production: start, wait, stop.

Used by commands that need a worker for a while (`demo`, `shadow`). The child gets exactly the
given Settings through ``STREAM_APP_*`` variables (none inherited from this process).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from stream_app.errors import UserError
from stream_app.settings import ENV_PREFIX, Settings


def _without_settings(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(ENV_PREFIX)}


@contextmanager
def worker_process(
    settings: Settings, log_path: Path, echo: Callable[[str], None] = print
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a worker until the block ends, then SIGTERM it (graceful: offsets committed, model
    snapshot written) and SIGKILL only if it has not stopped within 30 s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", "worker"],
            env={**_without_settings(os.environ), **settings.to_env()},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        echo(f"worker stopped (exit {proc.returncode}); its JSON log: {log_path}")


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


def get(settings: Settings, path: str) -> bytes | None:
    """GET a path of the worker's web server; the body of a 200, else None."""
    answer = http_get(f"http://{settings.web_host}:{settings.web_port}{path}")
    return answer[1] if answer is not None and answer[0] == 200 else None


def wait_ready(settings: Settings, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    """Until ``/ready`` says the worker has its partitions and has recovered its tables."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise UserError(f"the worker exited with {proc.returncode}; see its log")
        return b'"recovered":true' in (get(settings, "/ready") or b"")

    if not wait_until(ready, timeout, every=0.5):
        raise UserError("the worker did not become ready in time; see its log")
