"""A worker as a child process (`stream-app worker`), as in production: start, wait, stop.

Used by commands that need a worker for a while (`demo`, `shadow`). The child gets exactly the
given Settings through ``STREAM_APP_*`` variables (none inherited from this process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def get(settings: Settings, path: str) -> bytes | None:
    """GET a path of the worker's web server; None while it does not answer."""
    url = f"http://{settings.web_host}:{settings.web_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body: bytes = response.read()
            return body
    except OSError:
        return None


def wait_ready(settings: Settings, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    """Until ``/ready`` says the worker has its partitions and has recovered its tables."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the worker exited with {proc.returncode}; see its log")
        if b'"recovered":true' in (get(settings, "/ready") or b""):
            return
        time.sleep(0.5)
    raise UserError("the worker did not become ready in time; see its log")
