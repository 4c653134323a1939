"""`stream-app demo`: the whole product end to end on this machine, then everything stopped.

Local broker -> topics -> a warm start from eleven months of Online Retail (bootstrap) -> worker
(subprocess, as in production) -> the file's last month played into the input topics as live
traffic, a day of event time per second, with a few malformed messages -> the example
email/push subscriber prints predictive segment changes (named clusters, scored tiers, lifecycle
moves and their reasons) as they arrive -> counts, dead letters and metrics -> worker and broker
stopped.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import islice
from pathlib import Path
from typing import Final

from stream_app.contracts.events import Component, Event, Origin, SegmentChange
from stream_app.errors import UserError
from stream_app.kafka.local import LocalKafka
from stream_app.kafka.topics import admin_client, create_topics, topic_specs
from stream_app.live.workerproc import TOOL_READY_TIMEOUT_S, worker_process
from stream_app.settings import Settings
from stream_app.tools.bootstrap import BootstrapRequest, render_summary, run_bootstrap
from stream_app.tools.compare import KAFKA_PREFIX
from stream_app.tools.datasets import DatasetFormat, RowError, read_dataset
from stream_app.tools.publish import make_producer, publish
from stream_app.tools.report_cli import ReportRequest, run_report, summary_line
from stream_app.tools.subscriber import Interest, describe, run_subscriber

DEFAULT_DATASET: Final = Path("../shared/datasets/online_retail/online_retail.csv.gz")
# Online Retail's history up to here warms the models (bootstrap); the rest streams in live.
WARM_UNTIL: Final = datetime(2011, 11, 1, tzinfo=UTC)
DAY_S: Final = 86400.0
# What the subscriber shows of each day of event time: a tally, and the first change of these
# kinds with its reason (entries are every new customer: counted, not shown).
SHOWN_KINDS: Final = (Component.CLUSTER, Component.PROPENSITY, Component.LIFECYCLE)
WARMING_UP: Final = "warming up"
SUBSCRIBER_IDLE_S: Final = 8.0


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
    items: Iterable[Event | RowError], limit: int | None, after: datetime | None
) -> Iterator[Event | RowError]:
    events = (i for i in items if not isinstance(i, RowError))
    return islice((e for e in events if after is None or e.event_time >= after), limit)


@dataclass
class Ticker:
    """What the subscriber receives, at a pace a person can follow: for each day of event time
    one tally line, and the first cluster move, tier change and lifecycle move of that day with
    its reason."""

    say: Callable[[str], None] = print
    day: date | None = None
    today: Counter[str] = field(default_factory=Counter)
    shown: set[Component] = field(default_factory=set)
    received: Counter[str] = field(default_factory=Counter)
    # Changes that leave the customer unscored or in a cluster still warming up (a warm
    # start should leave almost none: issue 14, < 1%).
    cold: int = 0

    def act(self, change: SegmentChange) -> None:
        day = change.event_time.date()
        if self.day is None or day > self.day:
            self._close_day()
            self.day, self.today, self.shown = day, Counter(), set()
        self.today[change.component.value] += 1
        self.received[change.component.value] += 1
        now = change.current
        if now.propensity_tier.value == "unscored" or now.cluster_profile.startswith(WARMING_UP):
            self.cold += 1
        if change.component in SHOWN_KINDS and change.component not in self.shown:
            self.shown.add(change.component)
            self.say("    " + describe(change))

    def finish(self) -> None:
        self._close_day()
        self.day = None

    def _close_day(self) -> None:
        if self.day is not None and self.today:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.today.items()))
            self.say(f"  {self.day:%a %Y-%m-%d}: {sum(self.today.values())} changes ({kinds})")


class LiveTraffic(threading.Thread):
    """Publishes events in the background, event time played `days_per_second` days a second;
    :meth:`finish` waits for it and raises what it raised."""

    def __init__(
        self, settings: Settings, items: Iterable[Event | RowError], days_per_second: float
    ) -> None:
        super().__init__(name="demo-live-traffic", daemon=True)
        self._settings, self._items, self._speed = settings, items, days_per_second * DAY_S
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            publish(self._items, self._settings, speed=self._speed)
        except BaseException as exc:  # handed to the main thread by finish()
            self.failure = exc

    def finish(self) -> None:
        self.join()
        if self.failure is not None:
            raise self.failure


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
    settings: Settings,
    dataset: Path | None,
    limit: int | None = None,
    fmt: DatasetFormat = "online-retail",
    days_per_second: float = 1.0,
) -> int:
    path = dataset or DEFAULT_DATASET
    if not path.is_file():
        raise UserError(f"dataset not found: {path} (pass --dataset)")
    if not days_per_second > 0:
        raise UserError(f"--days-per-second must be positive, not {days_per_second}")
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
        _say("starting the worker (stream-app worker)")
        with worker_process(settings, log_path) as worker:
            worker.wait_ready(TOOL_READY_TIMEOUT_S)
            since = "" if after is None else f" from {after:%Y-%m-%d} on"
            _say(
                f"live traffic: {path.name}{since}, {days_per_second:g} day(s) of event time "
                "per second (+2 malformed messages); the example subscriber shows each day"
            )
            _with_garbage(settings)
            # Played as today's traffic: its changes say `live`, so a campaign acts on them.
            live = _limited(read_dataset(path, fmt, origin=Origin.LIVE), limit, after)
            feed = LiveTraffic(settings, live, days_per_second)
            feed.start()
            ticker = Ticker()
            state = run_subscriber(
                settings,
                "demo-email",
                Interest(),  # a campaign's subscriber: live changes only
                ticker.act,
                idle_timeout_s=SUBSCRIBER_IDLE_S,
            )
            feed.finish()
            ticker.finish()
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(ticker.received.items()))
            print(
                f"  ... {state.received} changes received, {state.acted} acted on ({kinds}), "
                f"{state.repeats} repeats ignored, {state.gaps} sequence gaps; "
                f"{ticker.cold} left a customer unscored or warming up"
            )
            _say("worker counts (GET /counts) and a few metrics (GET /metrics)")
            print("  " + (worker.get("/counts") or b"unavailable").decode())
            metrics = (worker.get("/metrics") or b"").decode().splitlines()
            for line in metrics:
                if line.startswith(
                    ("stream_app_segment_changes_total", "stream_app_dead_letters_total")
                ):
                    print("  " + line)
            _write_report(settings, path, fmt)
            _say("stopping")
        _delete_topics(settings)
    return 0


def _write_report(settings: Settings, dataset: Path, fmt: DatasetFormat) -> Path:
    """The segment report of what the live part emitted (stream-app report), its scores judged
    against what the file says each customer did next."""
    out = (settings.state_dir / "demo-report.html").resolve()
    _say("the segment report (stream-app report)")
    request = ReportRequest(
        changes=f"{KAFKA_PREFIX}{settings.segment_changes_topic}",
        out=out,
        dataset=dataset,
        fmt=fmt,
        title="stream_app demo: the last month of Online Retail, played live",
        show_progress=False,
    )
    figures = run_report(request, settings)
    print("  " + summary_line(figures, out))
    print(f"  open it in a browser: file://{out}")
    return out


def _delete_topics(settings: Settings) -> None:
    """The demo's topics are its own (named after the run): remove them, best effort."""
    names = [spec.topic for spec in topic_specs(settings)]
    for future in admin_client(settings.bootstrap_servers).delete_topics(names).values():
        with suppress(Exception):
            future.result(timeout=10)
