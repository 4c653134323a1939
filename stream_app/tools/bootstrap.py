"""Warm start from history: `stream-app bootstrap FILE --format F [--until TIME] [--emit]`.

A new deployment otherwise says nothing for a month: every customer stays "cluster 0, warming
up" and ``unscored`` until purchase labels mature. The bootstrap runs the history file through
the offline replay (:func:`stream_app.tools.replay.replay_offline`, the very processing the live
agents do), then writes what it learned where a worker starting afterwards finds it:

* the models to the compacted model-snapshots topic, as the worker's snapshot timer does (key
  ``app_id``, value ``SegmentModels.snapshot()``, partition 0), so the worker restores them,
  and again under ``<app_id>/bootstrap``, which the trainer's versions never replace;
* every customer's state to the customers table's changelog, so the worker's table recovery
  loads it: key the customer id, value the worker's envelope (``live.store.encode_record``) with
  an empty outbox (history is delivered) and no offsets (the live inputs are new), on the
  partition the customer's input events go to. Faust's changelog partition is its source
  partition, and its RocksDB recovery stores a record's raw key and value bytes as they are
  (the table's key and value types are ``bytes``, so reads use the raw codec too). No
  :class:`~stream_app.live.store.DeliveryMarker` is written: its absence reads as "batch 0
  written and delivered", which is exactly what empty outboxes say. Each state's due time is in
  the record, and a worker rebuilds its due-time index from its partition's records when the
  partition starts, so the customers' lifecycle timers fire live.

The history's segment changes are not sent unless ``--emit``; then they go to
``segment-changes`` (and ``segment-membership``) keyed by customer, marked ``origin: replay``.
The states themselves are written with ``origin: live``: the time-driven changes a worker fires
for them later (a customer going at risk next week) are the deployment's own news.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from confluent_kafka import Producer

from stream_app.contracts.events import Event, Origin, SegmentChange, encode
from stream_app.core.processor import MemoryStore, Processor
from stream_app.core.state import CustomerState
from stream_app.errors import UserError
from stream_app.kafka.ranges import partitions_of, range_consumer, watermarks
from stream_app.kafka.topics import require_topics
from stream_app.live.model_log import bootstrap_key, newest_key
from stream_app.live.pipeline import membership_record
from stream_app.live.store import Delivery, encode_record, partition_of
from stream_app.progress import Progress
from stream_app.settings import Settings
from stream_app.tools.datasets import DatasetFormat, RowError, read_dataset
from stream_app.tools.publish import POLL_EVERY, make_producer, send
from stream_app.tools.replay import (
    OUTSIDE_WINDOW,
    Window,
    as_replay,
    cold_start,
    replay_offline,
)
from stream_app.tools.rewind import active_members

BROKER_WAIT_S: Final = 10.0
FLUSH_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True)
class BootstrapRequest:
    path: Path
    fmt: DatasetFormat
    until: datetime | None = None
    emit: bool = False
    force: bool = False
    show_progress: bool = True


@dataclass
class BootstrapSummary:
    events: int = 0
    outside_window: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    customers: int = 0
    records_written: int = 0
    snapshot_bytes: int = 0
    model_version: str = ""
    purchase_labels: int = 0
    churn_labels: int = 0
    warm: bool = False
    cold_start: str | None = None
    history_changes: int = 0
    emitted: int = 0
    overwrote: int = 0  # changelog records found before (with --force)
    replay_s: float = 0.0
    write_s: float = 0.0


def history(
    path: Path, fmt: DatasetFormat, until: datetime | None, outside: Counter[str]
) -> Iterator[Event | RowError]:
    """The file's events before ``until`` (all without it), in event-time order, each marked
    replay whatever the file says; RowErrors pass through, and the events left out are counted
    in ``outside``."""
    for item in Window(None, until).select(read_dataset(path, fmt), outside):
        yield item if isinstance(item, RowError) else as_replay(item)


def changelog_record(state: CustomerState, partitions: int) -> tuple[int, bytes, bytes]:
    """(partition, key, value) of one customer's state as the worker's table stores it."""
    live = replace(state, origin=Origin.LIVE)
    key = state.customer_id.encode()
    return partition_of(state.customer_id, partitions), key, encode_record(live, Delivery())


def check_target(settings: Settings, request: BootstrapRequest) -> int:
    """Before any work: the broker answers, the topics exist, no worker runs, the changelog has
    the settings' partition count and holds no state (unless ``force``). Returns the records it
    holds."""
    changelog = settings.customers_changelog_topic
    needed = [changelog, settings.model_snapshots_topic]
    if request.emit:
        needed += [settings.segment_changes_topic, settings.segment_membership_topic]
    require_topics(settings, needed, BROKER_WAIT_S)
    members = active_members(settings, settings.app_id)
    if members:
        # Even with --force: a running worker reads neither these records nor the snapshot
        # until it restarts (an active partition's changelog is read only at assignment), and
        # its snapshot timer overwrites the bootstrapped models.
        raise UserError(
            f"consumer group {settings.app_id!r} has {members} active member(s): stop the "
            "workers first (a running worker would not see the bootstrap)"
        )
    consumer = range_consumer(settings, f"{settings.app_id}-bootstrap-check")
    try:
        partitions = partitions_of(consumer, changelog)
        if len(partitions) != settings.partitions:
            raise UserError(
                f"topic {changelog!r} has {len(partitions)} partitions but the settings say "
                f"{settings.partitions} (STREAM_APP_PARTITIONS): the worker would look for "
                "customers on other partitions"
            )
        held = 0
        for partition in partitions:
            low, high = watermarks(consumer, changelog, partition)
            held += max(high - low, 0)
    finally:
        consumer.close()
    if held and not request.force:
        raise UserError(
            f"topic {changelog!r} already holds {held:,} records: a bootstrap would overwrite "
            "the state of live customers (stop the workers and add --force to overwrite anyway)"
        )
    return held


class _Deliveries:
    """Counts the broker's acknowledgements; keeps the first failure."""

    def __init__(self) -> None:
        self.failed = 0
        self.first: str | None = None

    def __call__(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed += 1
            self.first = self.first or str(err)

    def check(self, producer: Producer, what: str) -> None:
        if producer.flush(FLUSH_TIMEOUT_S) > 0:
            raise UserError(
                f"the broker did not acknowledge every {what} within {FLUSH_TIMEOUT_S:g}s"
            )
        if self.failed:
            raise UserError(f"{self.failed:,} {what} were not written: {self.first}")


def write_states(
    producer: Producer,
    settings: Settings,
    states: Iterable[CustomerState],
    acks: _Deliveries,
    progress: Progress | None = None,
) -> int:
    topic, partitions, written = settings.customers_changelog_topic, settings.partitions, 0
    for state in states:
        partition, key, value = changelog_record(state, partitions)
        send(producer, topic, key, value, acks, partition=partition)
        written += 1
        if written % POLL_EVERY == 0:
            producer.poll(0)
            if progress is not None:
                progress.update(written)
    if progress is not None:
        progress.finish(written)
    return written


def emit_changes(
    producer: Producer,
    settings: Settings,
    changes: list[SegmentChange],
    acks: _Deliveries,
    progress: Progress | None = None,
) -> int:
    """The history's changes as the worker sends them: to segment-changes keyed by customer (the
    murmur2 partitioner places them), each followed by the customer's membership record."""
    sent = 0
    for change in changes:
        key = change.customer_id.encode()
        send(producer, settings.segment_changes_topic, key, encode(change), acks)
        send(producer, settings.segment_membership_topic, key, membership_record(change), acks)
        sent += 1
        if sent % POLL_EVERY == 0:
            producer.poll(0)
            if progress is not None:
                progress.update(sent)
    if progress is not None:
        progress.finish(sent)
    return sent


def run_bootstrap(settings: Settings, request: BootstrapRequest) -> BootstrapSummary:
    if not request.path.is_file():
        raise UserError(f"no such file: {request.path}")
    summary = BootstrapSummary(overwrote=check_target(settings, request))
    producer = make_producer(settings, acks="all")  # connects while the history is replayed

    started = time.monotonic()
    outside = Counter[str]()
    changes: list[SegmentChange] = []
    replayed = Progress(sys.stderr, enabled=request.show_progress)
    result, processor, _ = replay_offline(
        history(request.path, request.fmt, request.until, outside),
        settings.segmentation,
        progress=replayed,
        on_change=changes.append if request.emit else None,
    )
    summary.replay_s = time.monotonic() - started
    store = processor.store
    assert isinstance(store, MemoryStore)
    summary.customers = len(store)
    _describe(summary, result.events, result.invalid, outside, processor)
    summary.history_changes = sum(result.changes_by_component.values())

    started = time.monotonic()
    acks = _Deliveries()
    snapshot = processor.models.snapshot()
    summary.snapshot_bytes = len(snapshot)
    for key in (newest_key(settings.app_id), bootstrap_key(settings.app_id)):
        # Under its own key too: the trainer's versions replace it under the app key, and it
        # still scores what comes before the first of them (after compaction too).
        send(producer, settings.model_snapshots_topic, key, snapshot, acks, partition=0)
    written = Progress(sys.stderr, enabled=request.show_progress, verb="written", total=len(store))
    summary.records_written = write_states(producer, settings, store, acks, written)
    acks.check(producer, "state record")  # the states are durable before any change leaves
    if request.emit:
        sent = Progress(
            sys.stderr, enabled=request.show_progress, verb="emitted", total=len(changes)
        )
        summary.emitted = emit_changes(producer, settings, changes, acks, sent)
        acks.check(producer, "segment change")
    summary.write_s = time.monotonic() - started
    return summary


def _describe(
    summary: BootstrapSummary,
    events: int,
    invalid: Counter[str],
    outside: Counter[str],
    processor: Processor,
) -> None:
    models = processor.models
    summary.events = events
    summary.invalid = invalid
    summary.outside_window = outside[OUTSIDE_WINDOW]
    summary.model_version = models.version
    summary.purchase_labels = models.purchase.labels
    summary.churn_labels = models.churn.labels
    summary.warm = (
        models.purchase.warmed_up and models.churn.warmed_up and not models.clusters.warming_up
    )
    summary.cold_start = cold_start(processor)


def render_summary(summary: BootstrapSummary, settings: Settings, request: BootstrapRequest) -> str:
    """The one paragraph the command prints at the end."""
    until = f" before {request.until.isoformat()}" if request.until else ""
    notes = []
    if summary.outside_window:
        notes.append(f"{summary.outside_window:,} later events left out")
    invalid = sum(summary.invalid.values())
    if invalid:
        notes.append(f"{invalid:,} invalid rows skipped")
    noted = f" ({'; '.join(notes)})" if notes else ""
    plural = "partition" if settings.partitions == 1 else "partitions"
    overwrote = (
        f"; over {summary.overwrote:,} records already there, --force" if summary.overwrote else ""
    )
    warm = (
        "The models are warm: scores and named clusters from the first live event."
        if summary.warm
        else f"The models are NOT warm. {summary.cold_start}"
    )
    emitted = (
        f"{summary.emitted:,} history changes were sent to {settings.segment_changes_topic} "
        "marked origin replay."
        if request.emit
        else f"Nothing was sent to {settings.segment_changes_topic} (the history's "
        f"{summary.history_changes:,} changes stay unsent; --emit sends them marked replay)."
    )
    return (
        f"Bootstrapped {summary.customers:,} customers in {summary.replay_s:.1f}s from "
        f"{summary.events:,} events of {request.path.name}{until}{noted}, and wrote "
        f"{summary.records_written:,} customer states to {settings.customers_changelog_topic} "
        f"({settings.partitions} {plural}){overwrote} and model {summary.model_version} "
        f"({summary.snapshot_bytes:,} bytes) to {settings.model_snapshots_topic} in "
        f"{summary.write_s:.1f}s. Labels learned: {summary.purchase_labels:,} purchase, "
        f"{summary.churn_labels:,} churn. {warm} {emitted} Start the workers now: they restore "
        "the models and recover these customers as their table."
    )
