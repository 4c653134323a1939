"""The suite is hermetic: ``STREAM_APP_*`` variables exported in the developer's shell change
nothing, in the tests or in the worker processes they start (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_app.live.workerproc import child_env
from stream_app.settings import NOT_SETTINGS, Settings, is_prefixed

ROOT = Path(__file__).resolve().parents[2]

# Each of these broke some unit test before the suite cleaned the environment.
EXPORTED = {
    "STREAM_APP_PARTITIONS": "7",
    "STREAM_APP_LOG_LEVEL": "LOUD",
    "STREAM_APP_SEGMENTATION__SEED": "3",
    "STREAM_APP_SEGMENTATION__CLUSTER_COUNT": "3",
    "STREAM_APP_MAX_EVENT_BYTES": "300",
    "STREAM_APP_STATE_DIR": "/nonexistent/state",
    "STREAM_APP_BOGUS": "1",
    "stream_app_web_port": "1",
}


def test_no_setting_reaches_a_test() -> None:
    assert [name for name in os.environ if is_prefixed(name) and name not in NOT_SETTINGS] == []
    defaults = Settings()
    assert (defaults.partitions, defaults.log_level, defaults.segmentation.seed) == (4, "INFO", 42)


def test_a_worker_gets_exactly_the_variables_of_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAM_APP_BOGUS", "1")
    monkeypatch.setenv("STREAM_APP_PARTITIONS", "9")
    monkeypatch.setenv("STREAM_APP_TEST_BOOTSTRAP", "127.0.0.1:9092")
    settings = Settings(partitions=3)
    env = child_env(settings)
    assert {k: v for k, v in env.items() if is_prefixed(k)} == settings.to_env()
    assert env["STREAM_APP_PARTITIONS"] == "3"
    assert env["PATH"] == os.environ["PATH"]


def test_the_suite_passes_with_settings_exported() -> None:
    """A pytest run of a few modules (and of the check above) with every variable exported."""
    selected = [
        f"{Path(__file__).relative_to(ROOT)}::test_no_setting_reaches_a_test",
        "tests/unit/test_settings.py",
        "tests/unit/test_processor.py",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selected],
        cwd=ROOT,
        env={**os.environ, **EXPORTED},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
