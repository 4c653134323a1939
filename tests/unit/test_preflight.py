"""Tests for stream_app.tools.preflight: the checks a command makes before its long work."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.errors import UserError
from stream_app.kafka.local import free_ports
from stream_app.settings import Settings
from stream_app.tools.preflight import (
    require_distinct,
    require_free_port,
    require_worker_can_start,
    require_writable_dir,
    require_writable_file,
)

needs_procfs = pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux procfs")


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something listens on (the worker of another user, say)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# --- files ----------------------------------------------------------------------------------------


def test_a_new_file_in_a_folder_passes_and_is_not_left_behind(tmp_path: Path) -> None:
    require_writable_file(tmp_path / "changes.jsonl", "--out")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_passes_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("previous\n")
    require_writable_file(path, "--report")
    assert path.read_text() == "previous\n"


def test_a_device_passes() -> None:
    require_writable_file(Path(os.devnull), "--out")


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("missing/changes.jsonl", r"^--out .*/missing/changes\.jsonl: directory .*/missing does"),
        ("a-file/changes.jsonl", r"^--out .*/a-file/changes\.jsonl: .*/a-file is not a directory$"),
        ("a-folder", r"^--out .*/a-folder is a directory, not a file$"),
    ],
)
def test_an_impossible_file_is_one_line(tmp_path: Path, relative: str, message: str) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(UserError, match=message):
        require_writable_file(tmp_path / relative, "--out")


@needs_procfs
def test_a_folder_nobody_can_write_in_is_one_line() -> None:
    """/proc refuses new files even to root (the tests may run as root, so no chmod here)."""
    with pytest.raises(UserError, match=r"^--report /proc/report\.json cannot be written: "):
        require_writable_file(Path("/proc/report.json"), "--report")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write read-only files")
def test_a_read_only_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("")
    path.chmod(0o444)
    with pytest.raises(UserError, match="cannot be written: Permission denied"):
        require_writable_file(path, "--report")


def test_distinct_outputs_pass(tmp_path: Path) -> None:
    devnull = Path(os.devnull)
    require_distinct({"--out": tmp_path / "a", "--report": tmp_path / "b", "--x": None})
    require_distinct({"--out": devnull, "--report": devnull})


def test_an_output_that_is_the_input_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    source.write_text("{}\n")
    with pytest.raises(UserError, match=r"^--out .*events\.jsonl is the same file as the input$"):
        require_distinct({"the input": source, "--out": tmp_path / "." / "events.jsonl"})


def test_two_outputs_on_one_new_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--report .* is the same file as --out$"):
        require_distinct({"--out": tmp_path / "x.json", "--report": tmp_path / "x.json"})


# --- folders --------------------------------------------------------------------------------------


def test_an_existing_or_creatable_folder_passes(tmp_path: Path) -> None:
    require_writable_dir(tmp_path, "STREAM_APP_STATE_DIR")
    require_writable_dir(tmp_path / "not" / "yet", "STREAM_APP_STATE_DIR")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    with pytest.raises(UserError, match=r"^STREAM_APP_STATE_DIR .*/plain/state: .*/plain is not a"):
        require_writable_dir(tmp_path / "plain" / "state", "STREAM_APP_STATE_DIR")


@needs_procfs
def test_a_folder_that_cannot_be_written_is_one_line() -> None:
    with pytest.raises(UserError, match=r"^--dir /proc/schemas: cannot write in /proc: "):
        require_writable_dir(Path("/proc/schemas"), "--dir")


# --- the worker's port ----------------------------------------------------------------------------


def test_a_free_port_passes() -> None:
    require_free_port("127.0.0.1", free_ports(1)[0])


def test_a_port_in_use_is_one_line_naming_the_variable(listening: int) -> None:
    with pytest.raises(UserError) as raised:
        require_free_port("127.0.0.1", listening)
    assert str(raised.value) == (
        f"web port {listening} on 127.0.0.1 is already in use (another worker?); stop it or "
        "choose another port with STREAM_APP_WEB_PORT"
    )


def test_a_port_in_use_on_all_interfaces_is_refused(listening: int) -> None:
    with pytest.raises(UserError, match="already in use"):
        require_free_port("0.0.0.0", listening)


def test_an_address_of_another_machine_is_one_line() -> None:
    with pytest.raises(
        UserError, match=r"^cannot listen on 192\.0\.2\.1:6066 .*STREAM_APP_WEB_HOST"
    ):
        require_free_port("192.0.2.1", 6066)  # TEST-NET-1: never an address of this machine


def test_a_host_that_does_not_resolve_is_one_line() -> None:
    with pytest.raises(UserError, match=r"^web host 'no-such-host\.invalid' does not resolve"):
        require_free_port("no-such-host.invalid", 6066)


def test_worker_checks_its_port_and_its_state_folder(tmp_path: Path, listening: int) -> None:
    free = free_ports(1)[0]
    require_worker_can_start(Settings(web_port=free, state_dir=tmp_path / "state"))
    with pytest.raises(UserError, match="STREAM_APP_WEB_PORT"):
        require_worker_can_start(Settings(web_port=listening, state_dir=tmp_path))
    (tmp_path / "plain").write_text("")
    with pytest.raises(UserError, match="STREAM_APP_STATE_DIR"):
        require_worker_can_start(Settings(web_port=free, state_dir=tmp_path / "plain" / "s"))
