"""The load harness end to end against the session broker: a short smoke run of the real worker.

It checks the harness (traffic in, worker started and stopped, subscriber, probes, report
files), not the speed: the figures only have to be consistent with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from load_tests.__main__ import run_load
from load_tests.objectives import Objectives
from load_tests.scenarios import Progress, RunOptions, ScenarioName, measure_capacity
from load_tests.systems import SystemKind, broker
from stream_app.settings import Settings

pytestmark = pytest.mark.integration

RATE = 150.0
DURATION_S = 6.0


def test_smoke_scenario_writes_a_sane_report(kafka_broker: Settings, tmp_path: Path) -> None:
    report = tmp_path / "report"
    options = RunOptions(
        scenario=ScenarioName.SMOKE,
        rate=RATE,
        duration_s=DURATION_S,
        partitions=2,
        malformed_rate=0.03,
        drain_timeout_s=20,
        bootstrap=kafka_broker.bootstrap_servers,
        report_dir=report,
        progress=False,
    )
    run_load(options, Objectives(), "test")

    names = {path.name for path in report.iterdir()}
    assert {"report.json", "report.md", "throughput.png", "latency.png", "lag.png"} <= names
    data: dict[str, Any] = orjson.loads((report / "report.json").read_bytes())
    (run,) = data["runs"]
    s = run["summary"]
    assert run["system"] == "worker"
    assert s["exit_code"] == 0  # stopped with SIGTERM, drained, exited cleanly
    assert s["drained"] is True
    # Everything sent was processed; every malformed message came back as a dead letter.
    assert s["sent_total"] == pytest.approx(RATE * DURATION_S, abs=2)
    assert s["generator_kept_up"] is True
    assert s["input_rate"] == pytest.approx(RATE, rel=0.1)
    counts = s["counts"]
    processed = sum(counts["events"].values()) + sum(counts["dead_letters"].values())
    assert processed == s["sent_total"]
    assert counts.get("rerouted", 0) == 0  # keys were partitioned with murmur2, as Faust does
    assert s["malformed_sent"] > 0
    assert s["dead_letters_received"] == s["malformed_sent"]
    # New customers' first events give segment changes, timed end to end.
    latency = s["latency"]
    assert latency["count"] > 0
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"] < 60_000
    assert s["duplicates_seen"] == 0 and s["sequence_gaps_seen"] == 0
    # Per-second rows and per-process resources.
    assert len(run["rows"]) >= DURATION_S
    assert {"system", "generator", "harness"} <= set(s["cpu"])
    assert s["cpu"]["system"]["mean_percent"] > 0
    assert run["metrics"]["stream_app_events_in"]
    # A smoke run measures none of the objectives, and says so.
    assert {v["status"] for v in data["verdicts"]} == {"not measured"}
    markdown = (report / "report.md").read_text()
    assert "| objective | target | measured | result | note |" in markdown
    assert "vCPU" in markdown


def test_capacity_of_the_faust_floor_counts_the_whole_backlog(
    kafka_broker: Settings, tmp_path: Path
) -> None:
    """The capacity measurement (as --baseline runs it) on the Faust floor baseline: the whole
    backlog is consumed, timed and its CPU measured."""
    options = RunOptions(
        capacity_events=3000,
        partitions=2,
        bootstrap=kafka_broker.bootstrap_servers,
        report_dir=tmp_path / "report",
        progress=False,
    )
    with broker(options.bootstrap, tmp_path / "broker") as kafka:
        found = measure_capacity(SystemKind.FLOOR, options, kafka, tmp_path, Progress(False))
    assert found["system"] == "faust-floor"
    assert found["events"] == 3000
    assert found["processed"] == 3000
    assert found["events_per_s"] is not None
    assert found["events_per_s"] > 0
    assert found["events_per_cpu_s"] is not None
    assert found["events_per_cpu_s"] > 0
