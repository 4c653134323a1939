"""The one worker-subprocess runner (``stream_app.live.workerproc.WorkerProcess``), on a stand-in
child: a few lines of Python serving ``/ready`` and ``/counts`` on the Settings' web port, as the
worker and the baselines do. No broker."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest

from stream_app.errors import UserError
from stream_app.kafka.local import free_ports
from stream_app.live import workerproc
from stream_app.live.workerproc import WorkerProcess, worker_process
from stream_app.settings import Settings

SERVER = """
import http.server, json, os, signal, sys
if sys.argv[1:] == ["ignore-sigterm"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

class Pages(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/ready": {"recovered": True}, "/counts": {"events": {"click": 2}}}.get(self.path)
        self.send_response(404 if body is None else 200)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass

print("serving", os.environ["STREAM_APP_WEB_PORT"], flush=True)
http.server.HTTPServer(("127.0.0.1", int(os.environ["STREAM_APP_WEB_PORT"])), Pages).serve_forever()
"""


def settings(tmp_path: Path) -> Settings:
    return Settings(
        partitions=2, web_host="127.0.0.1", web_port=free_ports(1)[0], state_dir=tmp_path
    )


def stand_in(
    tmp_path: Path, *command: str, pythonpath: Sequence[Path] = (), workdir: Path | None = None
) -> WorkerProcess:
    return WorkerProcess(
        settings(tmp_path),
        tmp_path / "child.log",
        command=("-c", *(command or [SERVER])),
        pythonpath=pythonpath,
        workdir=workdir,
    )


def test_it_starts_waits_asks_and_stops_gracefully(tmp_path: Path) -> None:
    child = stand_in(tmp_path)
    child.start()
    try:
        assert child.alive() and child.pid is not None
        assert child.wait_ready(timeout=30) >= 0
        assert child.counts() == {"events": {"click": 2}}
        assert child.wait_for(lambda counts: counts["events"]["click"] == 2) == child.counts()
        assert child.get("/nothing") is None  # an error status is no answer
        assert child.get_json("/ready") == {"recovered": True}
    finally:
        assert child.stop(timeout=10) == 0
    assert not child.alive() and child.pid is None and not child.ignored_sigterm
    assert child.stop() == 0  # idempotent
    assert f"serving {child.settings.web_port}" in child.log_tail()


def test_the_child_gets_exactly_its_settings_and_the_folders_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAM_APP_PARTITIONS", "9")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    child = stand_in(tmp_path, pythonpath=[tmp_path / "checkout"], workdir=tmp_path)
    env = child.environment()
    assert env["STREAM_APP_PARTITIONS"] == "2"
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path / "checkout"), "/elsewhere"])
    assert env["PYTHONUNBUFFERED"] == "1"
    script = "import os, pathlib; print('in', pathlib.Path.cwd(), os.environ['PYTHONPATH'])"
    child = stand_in(tmp_path, script, pythonpath=[tmp_path / "checkout"], workdir=tmp_path)
    child.start()
    child.process.wait(30)  # type: ignore[union-attr]
    child.kill()
    assert child.exit_code == 0
    assert child.log_tail() == f"in {tmp_path} {tmp_path / 'checkout'}{os.pathsep}/elsewhere"


def test_a_child_that_exits_before_it_is_ready_fails_with_its_log(tmp_path: Path) -> None:
    child = stand_in(tmp_path, "import sys; print('no broker here'); sys.exit(3)")
    child.start()
    with pytest.raises(UserError, match=r"worker exited with 3 before it was ready: no broker"):
        child.wait_ready(timeout=30)
    child.kill()
    assert child.exit_code == 3


def test_sigterm_ignored_means_sigkill_and_kill_is_by_its_own_pid(tmp_path: Path) -> None:
    child = stand_in(tmp_path, SERVER, "ignore-sigterm")
    child.start()
    child.wait_ready(timeout=30)
    assert child.stop(timeout=0.5) == -signal.SIGKILL
    assert child.ignored_sigterm
    child.start()  # the same runner again: its log is appended to
    child.wait_ready(timeout=30)
    child.kill()
    assert child.exit_code == -signal.SIGKILL and child.pid is None
    assert child.log_tail().count("serving") == 2


def test_the_tools_runner_keeps_a_fresh_log_and_says_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class StandIn(WorkerProcess):
        def __init__(self, settings: Settings, log_path: Path, fresh_log: bool) -> None:
            super().__init__(settings, log_path, command=("-c", SERVER), fresh_log=fresh_log)

    monkeypatch.setattr(workerproc, "WorkerProcess", StandIn)
    log = tmp_path / "demo-worker.log"
    log.write_text("an older run\n")
    said: list[str] = []
    with worker_process(settings(tmp_path), log, echo=said.append) as worker:
        worker.wait_ready(timeout=30)
    assert said == [f"worker stopped (exit 0); its JSON log: {log}"]
    assert log.read_text().startswith("serving")
