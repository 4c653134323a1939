"""Health that tells the truth: /ready is 503 while the broker is down and 200 after it is back,
and the outage does not flood the log. The test runs its own broker, so it can stop it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from stream_app.kafka.local import LocalKafka, free_ports
from stream_app.kafka.topics import create_topics
from stream_app.live.workerproc import http_get, wait_until
from stream_app.settings import Settings

if TYPE_CHECKING:
    from conftest import RunRecords, WorkerProcess

pytestmark = pytest.mark.integration


def ready_status(settings: Settings) -> int:
    answer = http_get(f"http://{settings.web_host}:{settings.web_port}/ready", timeout=3)
    return 0 if answer is None else answer[0]  # 0: not serving yet


def wait_for_status(settings: Settings, status: int, timeout: float) -> float:
    started = time.monotonic()
    if not wait_until(lambda: ready_status(settings) == status, timeout, every=0.5):
        raise AssertionError(f"/ready never answered {status} within {timeout}s")
    return time.monotonic() - started


def test_ready_is_503_during_a_broker_outage_and_200_after_it(
    settings_factory: Callable[..., Settings],
    worker_factory: Callable[[Settings], WorkerProcess],
    tmp_path: Path,
    run_records: RunRecords,
) -> None:
    port, controller = free_ports(2)
    settings = settings_factory(
        kafka_port=port,
        kafka_controller_port=controller,
        bootstrap_servers=f"127.0.0.1:{port}",
        partitions=1,
        broker_probe_interval_s=1.0,
        log_repeat_interval_s=30.0,
    )
    kafka = LocalKafka(settings.model_copy(update={"state_dir": tmp_path / "own-broker"}))
    record = run_records.broker(kafka)  # stopped by the test command if this session dies
    try:
        assert kafka.start() is True
        create_topics(settings)
        worker = worker_factory(settings)
        wait_for_status(settings, 200, timeout=90)
        kafka.stop()
        lines_before = len(worker.log_tail(100_000).splitlines())
        took = wait_for_status(settings, 503, timeout=20)
        assert took < 10
        time.sleep(30)  # half a minute of outage
        outage_lines = len(worker.log_tail(100_000).splitlines()) - lines_before
        assert outage_lines < 200, worker.log_tail(60)  # was ~3,000 in 30 s, one per attempt
        assert kafka.start() is True
        wait_for_status(settings, 200, timeout=90)
        assert worker.stop() == 0, worker.log_tail()
    finally:
        kafka.stop()
        run_records.forget(record)
