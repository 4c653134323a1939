"""Replay publishing benchmark: `replay --to-kafka --speed max` on the whole Online Retail file.

    .venv/bin/python -m load_tests.bench_publish [--runs 5] [--out load_tests/results/publish.json]

Starts its own broker (free ports) unless ``--bootstrap`` is given. Per run, into fresh topics:
- "ours": the command itself, ``stream-app replay FILE --format online-retail --to-kafka``, in a
  subprocess; its summary gives ``read_s`` (read, parse, sort) and ``publish_s`` (pydantic ->
  orjson encode, murmur2 partitioning, idempotent lz4 producer; first produce to last ack);
- "baseline": the same messages pre-encoded, handed to a bare confluent-kafka Producer with the
  same configuration in a tight loop: the ceiling for this producer on this machine.
Reading and parsing the file (``read_s``) is reported separately: it is the same for every
publishing strategy. The ratio ours/baseline is the figure that travels across
machines; the broker shares the machine's cores with the publisher.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from stream_app.contracts.events import Event, encode
from stream_app.kafka.local import LocalKafka, free_ports
from stream_app.kafka.topics import create_topics
from stream_app.live.workerproc import child_env
from stream_app.settings import Settings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.publish import make_producer, topic_for
from stream_app.tools.replay import as_replay

ROOT = Path(__file__).resolve().parents[1]
ONLINE_RETAIL = ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"


def fresh_topics(base: Settings) -> Settings:
    settings = base.renamed(f"bench-{uuid.uuid4().hex[:8]}")
    create_topics(settings)
    return settings


def run_ours(base: Settings) -> dict[str, Any]:
    """The real command in a subprocess; its summary line has read_s and publish_s."""
    settings = fresh_topics(base)
    command = [sys.executable, "-m", "stream_app.cli", "replay", str(ONLINE_RETAIL)]
    done = subprocess.run(
        [*command, "--format", "online-retail", "--to-kafka", "--no-progress"],
        env=child_env(settings),
        capture_output=True,
        check=True,
    )
    summary: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])
    return summary


def run_baseline(base: Settings, events: list[Event]) -> float:
    settings = fresh_topics(base)
    messages = [
        (
            topic_for(e, settings),
            e.customer_id.encode(),
            encode(e),
            int(e.event_time.timestamp() * 1000),
        )
        for e in events
    ]
    producer = make_producer(settings)
    time.sleep(1.0)  # like the command, which connects while it reads the file
    started = time.monotonic()
    for topic, key, value, timestamp in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value, timestamp=timestamp)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60)
    return time.monotonic() - started


def measure(base: Settings, runs: int) -> dict[str, Any]:
    items = list(read_dataset(ONLINE_RETAIL, "online-retail"))
    events = [as_replay(i) for i in items if not isinstance(i, RowError)]
    ours: list[dict[str, Any]] = []
    baseline: list[float] = []
    for _ in range(runs):  # interleaved, so both see the same machine conditions
        ours.append(run_ours(base))
        baseline.append(run_baseline(base, events))
    assert all(o["published"] == len(events) for o in ours)
    ours_s = statistics.median(o["publish_s"] for o in ours)
    read_s = statistics.median(o["read_s"] for o in ours)
    base_s = statistics.median(baseline)
    return {
        "file": str(ONLINE_RETAIL),
        "events": len(events),
        "rows_rejected": len(items) - len(events),
        "runs": runs,
        "ours_read_s": [o["read_s"] for o in ours],
        "ours_publish_s": [o["publish_s"] for o in ours],
        "baseline_publish_s": [round(x, 4) for x in baseline],
        "ours_events_per_s": round(len(events) / ours_s),
        "baseline_events_per_s": round(len(events) / base_s),
        "ours_vs_baseline": round(base_s / ours_s, 3),
        "read_rows_per_s": round(len(items) / read_s),
        "command_end_to_end_events_per_s": round(
            statistics.median(len(events) / o["elapsed_s"] for o in ours)
        ),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--out", type=Path, default=ROOT / "load_tests/results/publish.json")
    args = parser.parse_args()
    if args.bootstrap:
        result = measure(Settings(bootstrap_servers=args.bootstrap), args.runs)
    else:
        port, controller = free_ports(2)
        with tempfile.TemporaryDirectory() as state:
            base = Settings(kafka_port=port, kafka_controller_port=controller, state_dir=state)
            kafka = LocalKafka(base)
            kafka.start()
            try:
                result = measure(base, args.runs)
            finally:
                kafka.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
