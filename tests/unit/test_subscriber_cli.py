"""`stream-app subscribe` mistakes, as users run it: one line on stderr, exit code 2, no traceback.

Each is found before the subscriber connects to a broker (none is needed here), except the last:
an unreachable broker, also one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import error_line, run_cli

from stream_app.kafka.local import free_ports
from stream_app.tools.subscriber import Ledger


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tier", "hgh"], "error: --tier hgh is not one of unscored, low, medium, high"),
        (
            ["--lifecycle", "lapsed", "--lifecycle", "gone"],
            "error: --lifecycle gone is not one of new, active, at_risk, lapsed, reactivated",
        ),
        (["--cluster", "three"], "error: stream-app subscribe: argument --cluster: invalid int"),
        (["--batch-size", "0"], "error: --batch-size must be 1 or more"),
        (["--idle-timeout", "-1"], "error: --idle-timeout must be 0 (never stop) or more seconds"),
    ],
)
def test_a_flag_mistake_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    assert error_line(run_cli(tmp_path, "subscribe", *args)).startswith(message)
    assert list(tmp_path.iterdir()) == []  # no state file was made


def test_a_state_file_in_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "state.sqlite3"
    line = error_line(run_cli(tmp_path, "subscribe", "--state", str(missing)))
    assert line == f"error: --state {missing}: directory {missing.parent} does not exist"


def test_another_groups_state_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "push.sqlite3"
    owner = {
        "group": "push-hot",
        "changes_topic": "segment-changes",
        "membership_topic": "segment-membership",
    }
    Ledger(state, owner).close()
    line = error_line(run_cli(tmp_path, "subscribe", "--group", "email", "--state", str(state)))
    assert line == (
        f"error: state file {state} belongs to group push-hot (not email): pass another --state"
    )


def test_an_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    done = run_cli(
        tmp_path,
        "subscribe",
        "--state",
        str(tmp_path / "s.sqlite3"),
        STREAM_APP_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
    )
    assert error_line(done).startswith(f"error: Kafka at 127.0.0.1:{port} did not answer within")
