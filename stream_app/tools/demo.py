"""`stream-app demo`: the whole product end to end on this machine, then everything stopped.

Local broker -> topics -> a warm start from eleven months of Online Retail (bootstrap) -> worker
(subprocess, as in production) -> the file's next events replayed into the input topics, with a
few malformed messages -> the example email/push subscriber prints predictive segment changes
(named clusters, scored tiers) as they arrive -> counts, dead letters and metrics -> worker and
broker stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Final

from stream_app.contracts.events import Event
from stream_app.errors import UserError
from stream_app.kafka.local import LocalKafka
from stream_app.kafka.topics import admin_client, create_topics, topic_specs
from stream_app.live.workerproc import TOOL_READY_TIMEOUT_S, worker_process
from stream_app.settings import Settings
from stream_app.tools.bootstrap import BootstrapRequest, render_summary, run_bootstrap
from stream_app.tools.datasets import DatasetFormat, RowError, read_dataset
from stream_app.tools.publish import make_producer, publish
from stream_app.tools.subscriber import Interest, describe, run_subscriber

DEFAULT_DATASET: Final = Path("../shared/datasets/online_retail/online_retail.csv.gz")
# Online Retail's history up to here warms the models (bootstrap); the rest streams in live.
WARM_UNTIL: Final = datetime(2011, 11, 1, tzinfo=UTC)
SHOWN_CHANGES: Final = 25


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


@contextmanager
def _broker(settings: Settings) -> Iterator[None]:
    kafka = LocalKafka(settings)
    started = kafka.start()
    try:
        yield
    finally:
        if started:
            kafka.stop()
            print("broker stopped", flush=True)


def _with_garbage(settings: Settings) -> None:
    producer = make_producer(settings)
    for topic, value in (
        (settings.clickstream_topic, b'{"event_type": "page_view", "oops'),
        (
            settings.transactions_topic,
            b'{"event_id": "x", "event_type": "purchase", "amount": 9.5}',
        ),
    ):
        producer.produce(topic, key=b"demo-garbage", value=value)
    producer.flush(10)


def _limited(
    items: Iterable[Event | RowError], limit: int, after: datetime | None
) -> Iterator[Event | RowError]:
    events = (i for i in items if not isinstance(i, RowError))
    return islice((e for e in events if after is None or e.event_time >= after), limit)


def _warm_start(settings: Settings, path: Path, fmt: DatasetFormat) -> datetime | None:
    """Bootstrap the models and customer states from the file's history before WARM_UNTIL, so
    the live part is scored by models that learned from eleven months (without it a new
    deployment shows "warming up" and "unscored" for a month). None: no history to use."""
    if fmt != "online-retail":
        return None
    _say(
        f"warm start: bootstrapping {path.name} up to {WARM_UNTIL:%Y-%m-%d} (stream-app bootstrap)"
    )
    request = BootstrapRequest(path=path, fmt=fmt, until=WARM_UNTIL, show_progress=False)
    summary = run_bootstrap(settings, request)
    print("  " + render_summary(summary, settings, request))
    return WARM_UNTIL


def run_demo(
    settings: Settings, dataset: Path | None, limit: int, fmt: DatasetFormat = "online-retail"
) -> int:
    path = dataset or DEFAULT_DATASET
    if not path.is_file():
        raise UserError(f"dataset not found: {path} (pass --dataset)")
    run = f"demo-{int(time.time())}"
    settings = settings.renamed(run)
    log_path = settings.state_dir / "demo-worker.log"
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    _say(f"starting the local Kafka broker on {settings.bootstrap_servers}")
    with _broker(settings):
        _say("creating topics")
        for topic, outcome in create_topics(settings).items():
            print(f"  {topic}: {outcome}")
        after = _warm_start(settings, path, fmt)
        # Publish the backlog first: a max-speed replay into a running worker compresses event
        # time ~25,000x, so cross-topic jitter of a few ms exceeds the allowed lateness.
        since = "" if after is None else f" from {after:%Y-%m-%d} on"
        _say(f"replaying {limit} events of {path.name}{since} into the input topics (+2 malformed)")
        _with_garbage(settings)
        summary = publish(_limited(read_dataset(path, fmt), limit, after), settings)
        print(f"  published {summary.published} events in {summary.elapsed_s:.2f}s")
        _say("starting the worker (stream-app worker)")
        with worker_process(settings, log_path) as worker:
            worker.wait_ready(TOOL_READY_TIMEOUT_S)
            _say(f"the example subscriber (first {SHOWN_CHANGES} segment changes)")
            shown: list[str] = []

            def act(change: object) -> None:
                if len(shown) < SHOWN_CHANGES:
                    shown.append(describe(change))  # type: ignore[arg-type]
                    print("  " + shown[-1], flush=True)

            state = run_subscriber(
                settings, "demo-email", Interest(include_replay=True), act, idle_timeout_s=8.0
            )
            print(
                f"  ... {state.received} changes received, {state.repeats} duplicates "
                f"dropped, {state.gaps} sequence gaps"
            )
            _say("worker counts (GET /counts) and a few metrics (GET /metrics)")
            print("  " + (worker.get("/counts") or b"unavailable").decode())
            metrics = (worker.get("/metrics") or b"").decode().splitlines()
            for line in metrics:
                if line.startswith(
                    ("stream_app_segment_changes_total", "stream_app_dead_letters_total")
                ):
                    print("  " + line)
            _say("stopping")
        _delete_topics(settings)
    return 0


def _delete_topics(settings: Settings) -> None:
    """The demo's topics are its own (named after the run): remove them, best effort."""
    names = [spec.topic for spec in topic_specs(settings)]
    for future in admin_client(settings.bootstrap_servers).delete_topics(names).values():
        with suppress(Exception):
            future.result(timeout=10)
