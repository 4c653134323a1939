"""Baseline: the Faust floor, the worker's Kafka and table I/O with none of its work.

The worker's Faust app (``stream_app.live.app.faust_app``: the same buffers, producer and RocksDB
settings), the same agent shape (one agent over both inputs, no auto-ack, batches of what the
fetcher has already delivered, up to ``batch_max_events``), and per batch the I/O a worker does:
one RocksDB table write (with its changelog record) per customer, then a segment change (1,000
bytes) and a membership record (250 bytes) sent for every ``FLOOR_CHANGE_EVERY``-th event (default
7: the worker emits 0.13 changes per event on the load tests' capacity backlog), then the acks.
No decoding, no features, no models, no policy, no dead letters. ``FLOOR_TABLE=0`` leaves out the
table writes and ``FLOOR_CHANGE_EVERY=0`` the sends, to see Faust's ingest alone.

Its capacity is the most any Faust worker doing this I/O can reach on this machine, whatever its
segmentation costs: if it is below a target, the target needs something other than a faster
segmentation core.

Configured by STREAM_APP_* variables like the worker; serves ``/ready`` and ``/counts``.

    python -m load_tests.baselines.faust_floor
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Final

from load_tests.baselines.faust_common import add_harness_pages, run
from stream_app.live import faust_internals
from stream_app.live.app import faust_app, more_coming, raw_topic
from stream_app.settings import Settings

CHANGE: Final = b"c" * 1000  # about the size of a SegmentChange as JSON
MEMBERSHIP: Final = b"m" * 250  # about the size of a membership record


def create_floor_app(settings: Settings) -> Any:
    app = faust_app(settings)
    customers = app.Table(
        "customers",
        key_type=bytes,
        value_type=bytes,
        partitions=settings.partitions,
        options={"block_cache_size": settings.rocksdb_block_cache_bytes},
    )
    inputs = raw_topic(app, *settings.input_topics)
    counted: Counter[str] = Counter()
    max_batch = settings.batch_max_events
    change_every = int(os.environ.get("FLOOR_CHANGE_EVERY", "7"))
    write_table = os.environ.get("FLOOR_TABLE", "1") != "0"

    async def handle(batch: list[Any]) -> None:
        latest: dict[bytes, Any] = {}
        for event in batch:
            latest[event.key or b""] = event
        for key, event in latest.items() if write_table else ():
            with faust_internals.as_current_event(event):
                customers[key] = event.value
        for n, event in enumerate(batch, start=counted["floor"]):
            if not change_every or n % change_every:
                continue
            key = event.key or b""
            await faust_internals.send_raw(app, settings.segment_changes_topic, key, CHANGE)
            await faust_internals.send_raw(app, settings.segment_membership_topic, key, MEMBERSHIP)
        for event in batch:
            event.ack()
        counted["floor"] += len(batch)

    async def floor(stream: Any) -> None:
        queue = faust_internals.stream_queue(stream)
        batch: list[Any] = []
        async for event in stream.noack().events():
            batch.append(event)
            if len(batch) < max_batch and await more_coming(queue):
                continue
            await handle(batch)
            batch = []

    app.agent(inputs, name="faust-floor")(floor)

    add_harness_pages(app, lambda: {"events": dict(counted), "dead_letters": {}})
    return app


def main() -> None:
    run(create_floor_app)


if __name__ == "__main__":
    main()
