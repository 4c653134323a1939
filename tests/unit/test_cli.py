"""The `stream-app` command as users run it (a subprocess): a mistake is one line, exit code 2.

Each test checks the whole contract: exit code 2, exactly one line on stderr starting with
``error:``, no traceback, nothing on stdout, and that the long work never started. No broker is
needed: every mistake here is found before a command connects to one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.kafka.local import free_ports

needs_procfs = pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux procfs")


def run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m stream_app.cli ARGS` with ``env`` added to this (settings-free) environment."""
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a refused command (after checking the rest of the contract)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert done.stdout == ""
    return lines[0]


@pytest.fixture
def events(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    path.write_text("{}\n")
    return path


@pytest.fixture
def listening() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def replay(tmp_path: Path, events: Path, *outputs: str) -> subprocess.CompletedProcess[str]:
    args = ["replay", str(events), "--format", "events", "--offline", "--no-progress", *outputs]
    return run_cli(tmp_path, *args)


# --- output paths ---------------------------------------------------------------------------------


def test_replay_report_in_a_missing_folder_is_refused_before_the_replay(
    tmp_path: Path, events: Path
) -> None:
    out, report = tmp_path / "changes.jsonl", tmp_path / "missing" / "report.json"
    line = error_line(replay(tmp_path, events, "--out", str(out), "--report", str(report)))
    assert line == f"error: --report {report}: directory {report.parent} does not exist"
    assert not out.exists()  # the replay never started: it would have created --out first


def test_replay_out_in_a_missing_folder_is_refused(tmp_path: Path, events: Path) -> None:
    out = tmp_path / "missing" / "changes.jsonl"
    line = error_line(replay(tmp_path, events, "--out", str(out)))
    assert line == f"error: --out {out}: directory {out.parent} does not exist"


def test_replay_out_that_is_a_folder_is_refused(tmp_path: Path, events: Path) -> None:
    line = error_line(replay(tmp_path, events, "--out", str(tmp_path)))
    assert line == f"error: --out {tmp_path} is a directory, not a file"


def test_replay_out_that_is_the_input_is_refused_and_the_input_kept(
    tmp_path: Path, events: Path
) -> None:
    line = error_line(replay(tmp_path, events, "--out", str(events)))
    assert line == f"error: --out {events} is the same file as the input"
    assert events.read_text() == "{}\n"


@needs_procfs
def test_replay_report_where_nothing_can_be_written_is_refused(
    tmp_path: Path, events: Path
) -> None:
    line = error_line(replay(tmp_path, events, "--report", "/proc/report.json"))
    assert line.startswith("error: --report /proc/report.json cannot be written: ")


def test_compare_out_in_a_missing_folder_is_refused(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("")
    out = tmp_path / "missing" / "diff.json"
    line = error_line(run_cli(tmp_path, "compare", "a.jsonl", "b.jsonl", "--out", str(out)))
    assert line == f"error: --out {out}: directory {out.parent} does not exist"


def test_schemas_dir_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    line = error_line(run_cli(tmp_path, "schemas", "--dir", "plain/schemas"))
    assert line == "error: --dir plain/schemas: plain is not a directory"


# --- settings -------------------------------------------------------------------------------------


def test_invalid_log_level_names_the_variable(tmp_path: Path) -> None:
    line = error_line(run_cli(tmp_path, "config", STREAM_APP_LOG_LEVEL="LOUD"))
    assert line == (
        "error: invalid setting STREAM_APP_LOG_LEVEL: "
        "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'LOUD'"
    )


def test_log_level_in_lower_case_is_accepted(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "config", STREAM_APP_LOG_LEVEL="debug")
    assert done.returncode == 0, done.stderr
    assert '"log_level": "DEBUG"' in done.stdout


@pytest.mark.parametrize(
    "command",
    [["config"], ["worker"], ["replay", "events.jsonl", "--format", "events", "--offline"]],
    ids=lambda command: command[0],
)
def test_unknown_variable_is_refused_with_the_closest_name(
    tmp_path: Path, events: Path, command: list[str]
) -> None:
    done = run_cli(tmp_path, *command, STREAM_APP_PARTITONS="4", STREAM_APP_STATE_DIR=str(tmp_path))
    line = error_line(done)
    assert (
        line == "error: unknown setting STREAM_APP_PARTITONS (did you mean STREAM_APP_PARTITIONS?)"
    )


def test_unknown_nested_knob_is_refused_with_the_closest_knob(tmp_path: Path) -> None:
    line = error_line(run_cli(tmp_path, "config", STREAM_APP_SEGMENTATION__SEDE="3"))
    assert line == (
        "error: unknown setting STREAM_APP_SEGMENTATION__SEDE "
        "(did you mean STREAM_APP_SEGMENTATION__SEED?)"
    )


def test_the_test_commands_own_variables_are_not_settings(tmp_path: Path) -> None:
    done = run_cli(
        tmp_path,
        "config",
        STREAM_APP_TEST_BOOTSTRAP="127.0.0.1:9092",
        STREAM_APP_TEST_RUN_DIR=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr


# --- the worker's port and folders ----------------------------------------------------------------


def test_worker_on_a_port_in_use_is_refused(tmp_path: Path, listening: int) -> None:
    done = run_cli(
        tmp_path,
        "worker",
        STREAM_APP_WEB_PORT=str(listening),
        STREAM_APP_STATE_DIR=str(tmp_path / "state"),
        STREAM_APP_BOOTSTRAP_SERVERS="127.0.0.1:1",  # if the check ever failed: no broker there
    )
    assert error_line(done) == (
        f"error: web port {listening} on 127.0.0.1 is already in use (another worker?); "
        "stop it or choose another port with STREAM_APP_WEB_PORT"
    )
    assert not (tmp_path / "state").exists()


def test_worker_with_a_state_folder_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    done = run_cli(
        tmp_path,
        "worker",
        STREAM_APP_WEB_PORT=str(free_ports(1)[0]),
        STREAM_APP_STATE_DIR="plain/state",
        STREAM_APP_BOOTSTRAP_SERVERS="127.0.0.1:1",
    )
    assert error_line(done) == "error: STREAM_APP_STATE_DIR plain/state: plain is not a directory"


def test_demo_checks_the_web_port_before_starting_a_broker(tmp_path: Path, listening: int) -> None:
    done = run_cli(
        tmp_path,
        "demo",
        "--dataset",
        "missing.csv",  # checked after the port: the port must come first
        STREAM_APP_WEB_PORT=str(listening),
        STREAM_APP_STATE_DIR=str(tmp_path / "state"),
    )
    assert f"web port {listening} on 127.0.0.1 is already in use" in error_line(done)


def test_kafka_start_with_a_state_folder_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    done = run_cli(tmp_path, "kafka", "start", STREAM_APP_STATE_DIR="plain/state")
    assert error_line(done) == "error: STREAM_APP_STATE_DIR plain/state: plain is not a directory"
