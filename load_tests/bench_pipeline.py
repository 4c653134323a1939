"""The live step without Faust or Kafka: how much of a worker's time is ours.

    .venv/bin/python -m load_tests.bench_pipeline --events 20000

Feeds the same synthetic stream as bench_live through `LivePipeline` with sinks that discard,
twice: per event into a store that serialises every state (the worker before issue #4), and in
batches of ``--batch`` into the worker's TableStore over a dict (state cache, one write per
customer per batch). Compare with bench_live's worker throughput: the difference is Faust,
aiokafka, RocksDB and the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

from load_tests.bench_live import generate
from stream_app.contracts.events import ClickEvent, MessageOrigin, encode
from stream_app.live.pipeline import LivePipeline, RawMessage
from stream_app.live.store import TableStore
from stream_app.settings import Settings


class DiscardingSinks:
    async def change(self, customer_id: str, value: bytes) -> None:
        return None  # acknowledged at once

    async def membership(self, customer_id: str, value: bytes) -> None:
        return None

    async def dead_letter(self, key: bytes | None, value: bytes) -> None:
        return None

    async def reroute(self, topic: str, key: bytes, value: bytes) -> None:
        return None


async def discard_examples(key: bytes, value: bytes) -> None:
    return None


async def run(events: int, batch: int = 0, learning: str = "") -> float:
    """`learning`: "" learns in process and records nothing (the worker before issue 14);
    "in_process" also records the examples (deterministic mode); "shared" scores with a fixed
    version and only collects them (the trainer learns elsewhere)."""
    stream = generate(
        events, events // 10, seed=7, start=datetime(2024, 1, 1, tzinfo=UTC), step_s=0.05
    )
    messages = [
        ("clickstream" if isinstance(e, ClickEvent) else "transactions", encode(e), e.customer_id)
        for e in stream
    ]
    table: dict[bytes, bytes] = {}
    pipeline = LivePipeline(
        Settings(partitions=1, learning="shared" if learning == "shared" else "in_process"),
        # Per event (batch 0): no state cache, a table write per event, as before batching.
        lambda partition: TableStore(table, partition, 1, cache_size=100_000 if batch else 0),
        DiscardingSinks(),
        examples_sink=discard_examples if learning else None,
    )
    if learning == "shared":
        # No trainer here: score with one version alone (as `models pin` does), or every event
        # would wait for the versions of its time.
        pipeline.offer_models(pipeline.models, pinned=True)
    offsets = {"clickstream": 0, "transactions": 0}
    raw: list[RawMessage] = []
    for topic, encoded, customer in messages:
        offsets[topic] += 1
        origin = MessageOrigin(topic=topic, partition=0, offset=offsets[topic])
        raw.append((customer.encode(), encoded, origin, None))
    started = time.perf_counter()
    if batch:
        for start in range(0, len(raw), batch):
            await pipeline.handle_batch(raw[start : start + batch])
    else:
        for key, value, origin, _ in raw:
            await pipeline.handle(key, value, origin)
    return len(messages) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    rates = sorted(asyncio.run(run(args.events)) for _ in range(3))
    print(f"LivePipeline without Faust/Kafka, per event: {rates[1]:,.0f} events/s (median of 3)")
    rates = sorted(asyncio.run(run(args.events, args.batch)) for _ in range(3))
    print(
        f"LivePipeline without Faust/Kafka, batches of {args.batch}: "
        f"{rates[1]:,.0f} events/s (median of 3)"
    )
    # Where learning happens (issue 14), paired: the three modes take turns, five rounds.
    modes = ("", "in_process", "shared")
    paired: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(5):
        for mode in modes:
            paired[mode].append(asyncio.run(run(args.events, args.batch, mode)))
    base = sorted(paired[""])[2]
    for mode in modes:
        rate = sorted(paired[mode])[2]
        print(
            f"learning {mode or 'in process, unrecorded'}: {rate:,.0f} events/s "
            f"(median of 5, {rate / base:.2f}x the unrecorded)"
        )


if __name__ == "__main__":
    main()
