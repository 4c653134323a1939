"""Live worker benchmark on the real local broker: throughput from a backlog (ours vs naive
per-event Faust, same run) and event-to-segment-change latency at a fixed rate.

    .venv/bin/python -m load_tests.bench_live --events 20000 --rate 1000 --duration 20

Throughput is measured for three workers over the same pre-published backlog, one after the
other: ``throughput`` (the worker as configured by default), ``per_event`` (the same code with
batches of one, no state cache and Faust's default buffers: what the worker did before issue #4)
and ``naive_faust`` (``load_tests.baselines.naive_faust``: the per-event agent a user would write
first; skipped if that module is absent). ``ratio_vs_naive`` is ours over naive_faust (else over
per_event). ``worker_cpu_us_per_event`` is the least noisy figure on a shared machine.

Everything runs on this machine: the broker, the generator and the worker share its cores.

Superseded by the load harness, ``python -m load_tests run --scenario steady --rate 5000
--duration 60 --baseline --report DIR`` (realistic traffic, latency percentiles over time, lag,
CPU per process, baselines side by side, a report with pass/fail per objective). Kept while other
scripts still import ``generate`` from here.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer

from load_tests.measure import percentile
from load_tests.systems import SystemKind, SystemProcess
from stream_app.contracts.events import ClickEvent, ClickType, Event, Origin, TransactionEvent
from stream_app.errors import UserError
from stream_app.kafka.local import LocalKafka, free_ports
from stream_app.kafka.topics import create_topics
from stream_app.live.workerproc import wait_until
from stream_app.settings import Settings
from stream_app.tools.publish import make_producer, publish

CLICK_MIX = [ClickType.PRODUCT_VIEW] * 6 + [
    ClickType.PAGE_VIEW,
    ClickType.SEARCH,
    ClickType.CART_ADD,
]


def generate(n: int, customers: int, seed: int, start: datetime, step_s: float) -> Iterator[Event]:
    """A seeded stream: views, searches, cart adds and ~3% purchases over `customers` people."""
    rng = random.Random(seed)
    for i in range(n):
        customer = f"cust-{rng.randrange(customers)}"
        at = start + timedelta(seconds=i * step_s)
        if rng.random() < 0.03:
            yield TransactionEvent(
                event_id=f"tx-{seed}-{i}",
                customer_id=customer,
                event_time=at,
                event_type="purchase",
                order_id=f"o-{seed}-{i}",
                amount=Decimal(rng.randrange(500, 20000)) / 100,
                currency="EUR",
                origin=Origin.LIVE,
            )
        else:
            yield ClickEvent(
                event_id=f"ck-{seed}-{i}",
                customer_id=customer,
                event_time=at,
                event_type=rng.choice(CLICK_MIX),
                session_id=f"s-{customer}-{i // 200}",
                category=f"cat-{rng.randrange(20)}",
                origin=Origin.LIVE,
            )


NAIVE_MODULE = "load_tests.baselines.naive_faust"
PER_EVENT: dict[str, Any] = {  # the worker before issue #4: per-event path, Faust's default buffers
    "batch_max_events": 1,
    "state_cache_size": 0,
    "producer_buffer_max_messages": 100,
    "stream_buffer_maxsize": 4096,
    "producer_linger_s": 0.0,
    "producer_max_batch_size": 16384,
}


def events_processed(counts: dict[str, Any]) -> int:
    """Valid events processed (the benchmark's traffic has no malformed ones)."""
    return sum(counts["events"].values())


def start_worker(settings: Settings, log: Path, kind: SystemKind) -> SystemProcess:
    worker = SystemProcess(kind, settings, log)
    worker.start(create=False)
    return worker


def cpu_seconds(worker: SystemProcess) -> float:
    fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(
    base: Settings,
    name: str,
    port: int,
    events: int,
    kind: SystemKind = SystemKind.WORKER,
    **overrides: Any,
) -> dict[str, Any]:
    """Publish a backlog first, then time the worker from ready to the last event processed."""
    settings = base.renamed(f"bench-{name}", web_port=port, **overrides)
    create_topics(settings)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    publish(generate(events, events // 10, seed=7, start=start, step_s=0.05), settings)
    worker = start_worker(settings, base.state_dir / f"{name}.log", kind)
    try:
        worker.wait_ready()
        began, cpu0 = time.monotonic(), cpu_seconds(worker)
        worker.wait_for(lambda counts: events_processed(counts) >= events, math.inf, every=0.1)
        elapsed = time.monotonic() - began
        cpu = cpu_seconds(worker) - cpu0
    finally:
        worker.stop()
    return {
        "events": events,
        "seconds": round(elapsed, 2),
        "events_per_second": round(events / elapsed, 1),
        "worker_cpu_share": round(cpu / elapsed, 2),
        "worker_cpu_us_per_event": round(cpu / events * 1e6),
    }


def latency(base: Settings, port: int, rate: float, duration: float) -> dict[str, Any]:
    """Produce live events at `rate`/s with event time = now; every event of a new customer
    yields an `entry` change, whose arrival a subscriber timestamps."""
    settings = base.renamed("bench-latency", web_port=port)
    create_topics(settings)
    worker = start_worker(settings, base.state_dir / "latency.log", SystemKind.WORKER)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "bench-latency-reader",  # not the app id: that is the worker's own group
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([settings.segment_changes_topic])
    producer = make_producer(settings, **{"linger.ms": 1})
    latencies: list[float] = []
    try:
        worker.wait_ready()
        # Steady state: first a backlog past the cluster model's warm-up (its one-off seeding
        # pauses the worker ~1 s), then the measured live traffic.
        warm = settings.segmentation.cluster_warmup + 1000
        start = datetime.now(UTC) - timedelta(hours=2)
        publish(generate(warm, warm // 5, seed=11, start=start, step_s=0.5), settings)
        worker.wait_for(lambda counts: events_processed(counts) >= warm, math.inf)
        total = int(rate * duration)
        began = time.monotonic()
        for i in range(total):
            due = began + i / rate
            while time.monotonic() < due:
                _drain(consumer, latencies, 0)
            event = ClickEvent(
                event_id=f"live-{i}",
                customer_id=f"live-{i}",
                event_time=datetime.now(UTC),
                event_type=ClickType.PAGE_VIEW,
            )
            publish([event], settings, producer=producer)
        producer.flush(10)
        wait_until(
            lambda: len(latencies) >= total, 15, 0.2, lambda t: _drain(consumer, latencies, t)
        )
        achieved = total / (time.monotonic() - began)
    finally:
        consumer.close()
        worker.stop()
    second_half = latencies[len(latencies) // 2 :]

    def ms(values: list[float], q: float) -> float | None:
        found = percentile(values, q)
        return None if found is None else round(found * 1000, 1)

    return {
        "target_rate": rate,
        "achieved_rate": round(achieved, 1),
        "changes_received": len(latencies),
        "expected": total,
        "p50_ms": ms(latencies, 50),
        "p95_ms": ms(latencies, 95),
        "p99_ms": ms(latencies, 99),
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
        "second_half_p50_ms": ms(second_half, 50),
        "second_half_p99_ms": ms(second_half, 99),
    }


def _drain(consumer: Consumer, latencies: list[float], timeout: float) -> None:
    for msg in consumer.consume(500, timeout=timeout):
        if msg.error() is None:
            change = orjson.loads(msg.value())
            if change["customer_id"].startswith("live-"):  # not the warm-up backlog
                sent = datetime.fromisoformat(change["event_time"]).timestamp()
                latencies.append(time.time() - sent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--out", type=Path, default=Path("load_tests/results/live.json"))
    args = parser.parse_args()
    try:
        result = run(args.events, args.rate, args.duration)
    except UserError as exc:  # a worker that exited or never became ready: one line
        raise SystemExit(f"bench_live: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


def run(events: int, rate: float, duration: float) -> dict[str, Any]:
    kafka_port, controller_port, *web = free_ports(6)
    naive_available = importlib.util.find_spec(NAIVE_MODULE) is not None
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        base = Settings(
            kafka_port=kafka_port,
            kafka_controller_port=controller_port,
            state_dir=Path(tmp),
            partitions=1,
        )
        kafka = LocalKafka(base)
        kafka.start()
        try:
            ours = throughput(base, "tuned", web[0], events)
            per_event = throughput(base, "perevent", web[1], events, **PER_EVENT)
            naive = (
                throughput(base, "naive", web[3], events, SystemKind.NAIVE)
                if naive_available
                else None
            )
            lat = latency(base, web[2], rate, duration)
        finally:
            kafka.stop()
    reference = naive or per_event
    return {
        "machine": f"{os.cpu_count()} vCPU, broker + generator + worker on the same machine",
        "throughput": ours,
        "per_event": per_event,
        "naive_faust": naive,
        "ratio_vs_naive": round(ours["events_per_second"] / reference["events_per_second"], 2),
        "cpu_ratio_vs_naive": round(
            reference["worker_cpu_us_per_event"] / ours["worker_cpu_us_per_event"], 2
        ),
        "latency": lat,
    }


if __name__ == "__main__":
    main()
