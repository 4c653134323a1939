"""Measurement from outside the system under test, as a subscriber and an operator see it.

* :class:`Subscriber` reads ``segment-changes`` and ``dead-letters`` like any downstream consumer
  (assigned partitions, no consumer group) and timestamps every arrival. The end-to-end latency of
  a change is its arrival time minus its ``event_time`` (the trigger's event time, which the
  generator sets to the moment it hands the event to its producer).
* :class:`Probe` reads what Kafka knows: the input topics' end offsets (events in) and the
  committed offsets of the system's consumer group (the lag ``kafka-consumer-groups.sh`` shows).
* :class:`ProcessWatch` reads CPU and RSS of each process (worker, broker, generator, harness)
  with psutil.
* :func:`parse_metrics` turns the worker's Prometheus text into a compact dict.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupTopicPartitions, TopicPartition

from stream_app.kafka.topics import admin_client

SUBSCRIBER_BATCH: Final = 2000


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile (q in [0, 100]) of unsorted values: the smallest value with at
    least q% of the values at or below it, always one of the values (never interpolated); None
    when empty. Every percentile the load tests and benchmarks report is this one."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    ordered = sorted(values_ms)  # once: sorting it again for each percentile is linear

    def pick(q: float) -> float | None:
        found = percentile(ordered, q)
        return None if found is None else round(found, 2)

    return {
        "count": len(ordered),
        "p50_ms": pick(50),
        "p95_ms": pick(95),
        "p99_ms": pick(99),
        "max_ms": pick(100),
        "mean_ms": round(sum(ordered) / len(ordered), 2) if ordered else None,
    }


@dataclass
class SecondBucket:
    changes: int = 0
    dead_letters: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)


class Subscriber:
    """Reads the output topics on a thread; everything is bucketed by second since ``t0``."""

    def __init__(
        self,
        bootstrap: str,
        changes_topic: str,
        dead_letters_topic: str,
        partitions: int,
        t0: float,
        event_prefix: str,
        sent_at: Callable[[float], float] = lambda event_time: event_time,
        bootstrapped: bool = False,
    ) -> None:
        """`sent_at`: when the record of an event time was sent (the generator's EventClock;
        by default the event time itself, the wall clock at the send). `bootstrapped`: the
        customers may have a history, so a customer's first change here may continue a
        sequence (only gaps after it count)."""
        self.t0 = t0
        self._sent_at = sent_at
        self._bootstrapped = bootstrapped
        self.changes_topic = changes_topic
        self.prefix = event_prefix
        self.buckets: dict[int, SecondBucket] = defaultdict(SecondBucket)
        self.all_latencies = array("d")
        self.latency_seconds = array("i")  # the arrival second of each latency sample
        self.components: dict[str, int] = defaultdict(int)
        self.last_sequence: dict[str, int] = {}
        self.duplicates = 0
        self.gaps = 0
        self.other_triggers = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"load-test-subscriber-{int(t0 * 1000)}",  # required, never joined
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 50,
            }
        )
        self._consumer.assign(
            [
                TopicPartition(topic, p, OFFSET_BEGINNING)
                for topic in (changes_topic, dead_letters_topic)
                for p in range(partitions)
            ]
        )
        self._thread = threading.Thread(target=self._run, name="subscriber", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                first = self._consumer.poll(0.1)
                if first is None:
                    continue
                batch = [first, *self._consumer.consume(SUBSCRIBER_BATCH, 0)]
                self._take(batch, time.time())
        finally:
            self._consumer.close()

    def _take(self, messages: Iterable[Any], arrived: float) -> None:
        second = int(arrived - self.t0)
        with self._lock:
            bucket = self.buckets[second]
            for msg in messages:
                if msg.error() is not None:
                    continue
                if msg.topic() != self.changes_topic:
                    bucket.dead_letters += 1
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        reason = orjson.loads(msg.value())["reason"]
                        bucket.dead_letter_reasons[reason] = (
                            bucket.dead_letter_reasons.get(reason, 0) + 1
                        )
                    continue
                change = orjson.loads(msg.value())
                customer, sequence = change["customer_id"], change["sequence"]
                last = self.last_sequence.get(customer, 0)
                if self._bootstrapped and customer not in self.last_sequence:
                    last = sequence - 1  # continues the bootstrapped history
                if sequence <= last:
                    self.duplicates += 1  # a redelivery: a subscriber drops it by change_id
                    continue
                if sequence > last + 1:
                    self.gaps += 1
                self.last_sequence[customer] = sequence
                bucket.changes += 1
                self.components[change["component"]] += 1
                if not change["reason"]["trigger_event_id"].startswith(self.prefix):
                    self.other_triggers += 1  # time-driven (no event of ours to time from)
                    continue
                sent = self._sent_at(datetime.fromisoformat(change["event_time"]).timestamp())
                latency_ms = (arrived - sent) * 1000
                bucket.latencies_ms.append(latency_ms)
                self.all_latencies.append(latency_ms)
                self.latency_seconds.append(second)

    def take_second(self, second: int) -> SecondBucket:
        with self._lock:
            return self.buckets.pop(second, SecondBucket())

    def latencies_between(self, start: int, end: int) -> list[float]:
        """Latency samples whose change arrived in seconds [start, end)."""
        with self._lock:
            return [
                v
                for v, s in zip(self.all_latencies, self.latency_seconds, strict=True)
                if start <= s < end
            ]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Probe:
    """End offsets of the inputs and the committed offsets of a consumer group."""

    def __init__(self, bootstrap: str, topics: Sequence[str], partitions: int, group: str) -> None:
        self.group = group
        self.partitions = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        self._admin = admin_client(bootstrap)
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"{group}-probe",
                "enable.auto.commit": False,
            }
        )

    def end_offsets(self) -> int | None:
        total = 0
        try:
            for tp in self.partitions:
                _low, high = self._consumer.get_watermark_offsets(tp, timeout=2)
                total += max(high, 0)
        except Exception:
            return None
        return total

    def committed(self) -> int | None:
        try:
            request = [ConsumerGroupTopicPartitions(self.group, self.partitions)]
            future = self._admin.list_consumer_group_offsets(request, request_timeout=2)[self.group]
            result = future.result(timeout=3)
        except Exception:
            return None
        total: int = sum(max(tp.offset, 0) for tp in result.topic_partitions)
        return total

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._consumer.close()


@dataclass
class ProcessSample:
    cpu_percent: float | None
    rss_mb: float | None


class ProcessWatch:
    """CPU (% of one core, over the last interval) and RSS of named processes."""

    def __init__(self) -> None:
        import psutil  # type: ignore[import-untyped]

        self._psutil = psutil
        self._procs: dict[str, Any] = {}
        self._last: dict[str, tuple[float, float]] = {}
        psutil.cpu_percent(None)

    def watch(self, name: str, pid: int | None) -> None:
        if pid is None:
            self._procs.pop(name, None)
            return
        with contextlib.suppress(self._psutil.Error):
            proc = self._psutil.Process(pid)
            self._procs[name] = proc
            times = proc.cpu_times()
            self._last[name] = (time.monotonic(), times.user + times.system)

    def cpu_seconds(self, name: str) -> float | None:
        """User + system CPU seconds the process has used so far."""
        proc = self._procs.get(name)
        if proc is None:
            return None
        try:
            times = proc.cpu_times()
        except self._psutil.Error:
            return None
        used: float = times.user + times.system
        return used

    def sample(self) -> dict[str, ProcessSample]:
        out: dict[str, ProcessSample] = {}
        for name, proc in list(self._procs.items()):
            try:
                times = proc.cpu_times()
                rss = proc.memory_info().rss / 2**20
            except self._psutil.Error:
                out[name] = ProcessSample(None, None)
                continue
            if rss <= 0:  # exited (a zombie until reaped)
                out[name] = ProcessSample(None, None)
                continue
            now, used = time.monotonic(), times.user + times.system
            before = self._last.get(name)
            self._last[name] = (now, used)
            cpu = None
            if before is not None and now > before[0]:
                cpu = round(100 * (used - before[1]) / (now - before[0]), 1)
            out[name] = ProcessSample(cpu, round(rss, 1))
        return out

    def machine_cpu(self) -> float:
        """Whole-machine CPU busy % since the last call (100 = every core busy)."""
        value: float = self._psutil.cpu_percent(None)
        return value


def parse_metrics(text: str | None) -> dict[str, Any]:
    """The worker's Prometheus metrics as {name: value or {labels: value}}; histograms as
    count, sum, mean and a bucket-interpolated p99 estimate."""
    if not text:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            buckets: list[tuple[float, float]] = []
            count = total = 0.0
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets.append((float(sample.labels["le"]), sample.value))
                elif sample.name.endswith("_count"):
                    count = sample.value
                elif sample.name.endswith("_sum"):
                    total = sample.value
            out[family.name] = _histogram_summary(family.name, buckets, count, total)
            continue
        values: dict[str, float] = {}
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) or "value"
            values[label] = sample.value
        if values:
            out[family.name] = values.get("value") if list(values) == ["value"] else values
    return out


def _histogram_summary(
    name: str, buckets: list[tuple[float, float]], count: float, total: float
) -> dict[str, Any]:
    """A ``*_seconds`` histogram in ms; any other (e.g. events per batch) in its own unit."""
    if name.endswith("_seconds"):
        return {
            "count": int(count),
            "sum_s": round(total, 4),
            "mean_ms": round(1000 * total / count, 3) if count else None,
            "p50_ms_estimate": _bucket_quantile(buckets, 0.50, 1000),
            "p99_ms_estimate": _bucket_quantile(buckets, 0.99, 1000),
        }
    return {
        "count": int(count),
        "sum": round(total, 4),
        "mean": round(total / count, 3) if count else None,
        "p50_estimate": _bucket_quantile(buckets, 0.50),
        "p99_estimate": _bucket_quantile(buckets, 0.99),
    }


def _bucket_quantile(
    buckets: list[tuple[float, float]], q: float, scale: float = 1.0
) -> float | None:
    """Linear interpolation inside the bucket holding the quantile (as PromQL does), times
    `scale` (1000: seconds to ms)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    target = q * buckets[-1][1]
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= target:
            if math.isinf(bound):
                return round(previous_bound * scale, 3)
            share = (
                (target - previous_count) / (count - previous_count)
                if count > previous_count
                else 1
            )
            return round((previous_bound + (bound - previous_bound) * share) * scale, 3)
        previous_bound, previous_count = bound, count
    return None
