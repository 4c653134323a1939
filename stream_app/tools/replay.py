"""Offline replay: a dataset through the same Processor the live agents use, in-process.

Deterministic: the same file and settings give byte-identical `changes.jsonl` (processing time is
simulated as the trigger's event time, and every model is seeded).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import orjson

from stream_app.contracts.events import (
    Component,
    DeadLetterReason,
    Event,
    Origin,
    SegmentChange,
    encode,
)
from stream_app.core.features import DAY
from stream_app.core.learning import Epochs
from stream_app.core.models import WARM_UP_LABELS, SegmentModels
from stream_app.core.one_process_trainer import OneProcessTrainer
from stream_app.core.processor import MemoryStore, Processor, Status
from stream_app.errors import UserError
from stream_app.progress import Progress
from stream_app.settings import SegmentationSettings, Settings
from stream_app.tools.datasets import DatasetFormat, RowError, read_dataset
from stream_app.tools.preflight import require_distinct, require_writable_file
from stream_app.tools.score_audit import ScoreAudit

FLAP_COMPONENTS: Final = (Component.CLUSTER, Component.PROPENSITY, Component.LIFECYCLE)
OUTSIDE_WINDOW: Final = "outside_window"


class FlapMeter:
    """Share of segment changes that undo the customer's previous change of the same component
    within the dwell window (A -> B, then B -> A soon after)."""

    def __init__(self, window_seconds: float) -> None:
        self.window = window_seconds
        self.last: dict[tuple[str, Component], tuple[float, str, str]] = {}
        self.changes = 0
        self.flaps = 0

    def observe(self, change: SegmentChange) -> None:
        if change.component not in FLAP_COMPONENTS or change.previous is None:
            return
        before, after = _component_value(change)
        at = change.event_time.timestamp()
        key = (change.customer_id, change.component)
        self.changes += 1
        last = self.last.get(key)
        if (
            last is not None
            and at - last[0] <= self.window
            and (before, after) == (last[2], last[1])
        ):
            self.flaps += 1
        self.last[key] = (at, before, after)

    @property
    def rate(self) -> float:
        return self.flaps / self.changes if self.changes else 0.0


def _component_value(change: SegmentChange) -> tuple[str, str]:
    prev, cur = change.previous, change.current
    assert prev is not None
    if change.component is Component.CLUSTER:
        return str(prev.cluster), str(cur.cluster)
    if change.component is Component.PROPENSITY:
        return prev.propensity_tier.value, cur.propensity_tier.value
    return prev.lifecycle.value, cur.lifecycle.value


@dataclass
class ReplayResult:
    events: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    changes_by_component: Counter[str] = field(default_factory=Counter)
    process_seconds: float = 0.0


def replay_offline(
    items: Iterable[Event | RowError],
    settings: SegmentationSettings,
    out: IO[bytes] | None = None,
    progress: Progress | None = None,
    on_change: Callable[[SegmentChange], object] | None = None,
    epochs: Epochs | None = None,
    start: Processor | None = None,
) -> tuple[ReplayResult, Processor, Meters]:
    """Run every event through a fresh Processor (or `start`: one that replayed a history
    before, as a bootstrap did); write each change as one JSON line to `out` (and hand it to
    `on_change`). With `epochs`, the models learn as a ``learning=shared`` deployment's do
    (``core.one_process_trainer``; from `start`'s models, as its trainer continues from the
    bootstrapped version); without, as they score (``in_process``)."""
    processor = start or Processor(settings, SegmentModels(settings), MemoryStore())
    shared = (
        None if epochs is None else OneProcessTrainer(processor, epochs, warm=start is not None)
    )
    result = ResultSink(settings, out, on_change)
    clock = time.perf_counter
    for item in items:
        if isinstance(item, RowError):
            result.data.invalid[item.reason] += 1
            continue
        if not result.data.events:
            # The whole file is parsed and sorted by now and lives until the end: move it out of
            # the cyclic collector's sight, so each full collection stops rescanning ~10^5 events.
            gc.freeze()
        started = clock()
        if shared is not None:
            result.emit(shared.before(item.event_time.timestamp()))
        outcome = processor.process(item)
        result.data.process_seconds += clock() - started
        result.data.events += 1
        result.data.statuses[outcome.status.value] += 1
        if outcome.status is Status.LATE:
            result.data.invalid[DeadLetterReason.LATE_EVENT.value] += 1
        elif outcome.status is Status.FUTURE:
            result.data.invalid[DeadLetterReason.FUTURE_EVENT.value] += 1
        if outcome.status is Status.APPLIED:
            result.meters.scores.event(item)
        result.emit(outcome.changes)
        if progress is not None and result.data.events % 1024 == 0:
            progress.update(result.data.events)
    started = clock()
    if shared is None:
        result.emit(processor.advance(processor.max_event_time))
    else:
        result.emit(shared.finish())
    result.data.process_seconds += clock() - started
    gc.unfreeze()
    if progress is not None:
        progress.finish(result.data.events)
    return result.data, processor, result.meters


def learning_epochs(settings: Settings) -> Epochs | None:
    """What `replay_offline` needs to learn as a deployment with these settings does."""
    return settings.epochs() if settings.learning == "shared" else None


@dataclass
class Meters:
    """What a replay measures about its own output: flaps, and the emitted scores judged
    against what happened next in the stream."""

    flaps: FlapMeter
    scores: ScoreAudit


class ResultSink:
    def __init__(
        self,
        settings: SegmentationSettings,
        out: IO[bytes] | None,
        on_change: Callable[[SegmentChange], object] | None = None,
    ) -> None:
        self.data = ReplayResult()
        self.out = out
        self.on_change = on_change
        self.meters = Meters(
            FlapMeter(settings.cluster_min_dwell_hours * 3600), ScoreAudit(settings)
        )

    def emit(self, changes: list[SegmentChange]) -> None:
        for change in changes:
            self.data.changes_by_component[change.component.value] += 1
            self.meters.flaps.observe(change)
            self.meters.scores.change(change)
            if self.out is not None:
                self.out.write(encode(change) + b"\n")
            if self.on_change is not None:
                self.on_change(change)


def cold_start(processor: Processor) -> str | None:
    """Plain sentences when a propensity model or the clusters never warmed up, and what to
    change."""
    s, models = processor.s, processor.models
    cold = [
        (name, model.labels, horizon)
        for name, model, horizon in (
            ("purchase", models.purchase, s.purchase_horizon_days),
            ("churn", models.churn, s.churn_horizon_days),
        )
        if not model.warmed_up
    ]
    sentences = [_clusters_cold(processor)] if models.clusters.warming_up else []
    if cold:
        parts = [
            f"the {name} model learned from {labels} of the {WARM_UP_LABELS} matured labels it "
            f"needs (a label matures {horizon:g} days after it is taken)"
            for name, labels, horizon in cold
        ]
        sentences.insert(
            0,
            "Tiers and scores stayed unscored: "
            + "; ".join(parts)
            + ". Replay more history, or shorten STREAM_APP_SEGMENTATION__PURCHASE_HORIZON_DAYS / "
            "CHURN_HORIZON_DAYS.",
        )
    elif models.purchase.labels < s.tier_warm_up_labels:
        sentences.insert(
            0,
            f"Purchase tiers stayed unscored: the purchase model learned from "
            f"{models.purchase.labels} of the {s.tier_warm_up_labels} matured labels tiers wait "
            "for (its scores are reported). Replay more history, or lower "
            "STREAM_APP_SEGMENTATION__TIER_WARM_UP_LABELS.",
        )
    return " ".join(sentences) or None


def _clusters_cold(processor: Processor) -> str:
    """Why every customer is still in cluster 0, "warming up"."""
    clusters, s = processor.models.clusters, processor.s
    first = clusters.first_seen_at
    span = 0.0 if first is None else max(0.0, processor.max_event_time - first) / DAY
    return (
        f"Clusters stayed warming up: they start after {s.cluster_warmup:,} observations over "
        f"at least {s.cluster_warmup_days:g} days of event time, and this replay gave "
        f"{clusters.warmup_seen:,} over {span:.2f} days. Replay more history, or lower "
        "STREAM_APP_SEGMENTATION__CLUSTER_WARMUP / CLUSTER_WARMUP_DAYS."
    )


def build_report(result: ReplayResult, processor: Processor, meters: Meters) -> dict[str, Any]:
    models = processor.models
    store = processor.store
    assert isinstance(store, MemoryStore)
    states = list(store)
    lifecycle = Counter(st.membership.stage.value for st in states if st.membership)
    members = Counter(st.membership.cluster for st in states if st.membership)
    sizes = store.sizes()
    purchase, churn = models.purchase.quality(), models.churn.quality()
    return {
        "events": result.events,
        "applied": result.statuses.get(Status.APPLIED.value, 0),
        "duplicates": result.statuses.get(Status.DUPLICATE.value, 0),
        "invalid": dict(sorted(result.invalid.items())),
        "customers": len(states),
        "segment_changes": dict(sorted(result.changes_by_component.items())),
        "events_per_second": round(result.events / result.process_seconds, 1)
        if result.process_seconds
        else None,
        "purchase_auc": purchase["roc_auc"],
        "purchase_log_loss": purchase["log_loss"],
        "purchase_ece": purchase["ece"],
        "purchase_labels": purchase["labels"],
        "churn_auc": churn["roc_auc"],
        "churn_log_loss": churn["log_loss"],
        "churn_ece": churn["ece"],
        "churn_labels": churn["labels"],
        "clusters": [
            {
                "id": cid,
                "members": members.get(cid, 0),
                "observations": models.clusters.sizes[cid],
                "profile": models.clusters.profile(cid).name,
                "centre": models.clusters.profile(cid).traits,
            }
            for cid in range(len(models.clusters.sizes))
        ],
        "cluster_renames": [
            {"after_observations": n, "cluster": cid, "from": old, "to": new}
            for n, cid, old, new in models.clusters.renames
        ],
        "cluster_reseeds": [
            {"after_observations": n, "cluster": dead, "split_from": donor}
            for n, dead, donor in models.clusters.reseeds
        ],
        "lifecycle": dict(sorted(lifecycle.items())),
        "flap_rate": round(meters.flaps.rate, 5),
        **meters.scores.report(),
        "largest_scaled_input": {
            "purchase": round(models.purchase.largest_scaled_input, 2),
            "churn": round(models.churn.largest_scaled_input, 2),
        },
        "cold_start": cold_start(processor),
        "state_bytes_per_customer": {
            "mean": round(sum(sizes) / len(sizes), 1) if sizes else 0,
            "max": max(sizes, default=0),
        },
        "model_version": models.version,
        "segment_definition_version": processor.s.version,
    }


def run_replay_command(args: argparse.Namespace, settings: Settings) -> int:
    path: Path = args.file
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    if not args.to_kafka:
        _require_outputs(path, args.out, args.report)
    window = Window(
        parse_instant(args.start, "--from") if args.start else None,
        parse_instant(args.until, "--until") if args.until else None,
    )
    fmt: DatasetFormat = args.format
    outside = Counter[str]()
    items: Iterable[Event | RowError] = window.select(read_dataset(path, fmt), outside)
    if args.limit is not None:
        items = _limited(items, args.limit)
    if args.to_kafka:
        return _to_kafka(items, settings, _speed(args.speed), outside, not args.no_progress)
    progress = Progress(sys.stderr, enabled=not args.no_progress)
    out = args.out.open("wb") if args.out else None
    try:
        result, processor, meters = replay_offline(
            items, settings.segmentation, out, progress, epochs=learning_epochs(settings)
        )
    finally:
        if out is not None:
            out.close()
    report = build_report(result, processor, meters)
    report["outside_window"] = outside[OUTSIDE_WINDOW]
    report["learning"] = settings.learning
    rendered = orjson.dumps(report, option=orjson.OPT_INDENT_2)
    if args.report:
        args.report.write_bytes(rendered + b"\n")
    summary = {k: report[k] for k in ("events", "customers", "segment_changes", "invalid")}
    print(orjson.dumps(summary).decode())
    return 0


def _require_outputs(source: Path, out: Path | None, report: Path | None) -> None:
    """Before the replay: both outputs can be written, and neither overwrites the input."""
    require_distinct({"the input": source, "--out": out, "--report": report})
    for path, flag in ((out, "--out"), (report, "--report")):
        if path is not None:
            require_writable_file(path, flag)


def parse_instant(text: str, flag: str) -> datetime:
    """An ISO 8601 date or time from the command line; without a zone it means UTC."""
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(
            f"{flag} must be an ISO 8601 date or time such as 2011-06-01 or "
            f"2011-06-01T12:00:00Z, not {text!r}"
        ) from None
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Window:
    """Event-time bounds of a replay: ``start`` inclusive, ``until`` exclusive (either open)."""

    start: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.start is not None and self.until is not None and self.until <= self.start:
            raise UserError("--until must be later than --from")

    def contains(self, event_time: datetime) -> bool:
        return (self.start is None or event_time >= self.start) and (
            self.until is None or event_time < self.until
        )

    def select(
        self, items: Iterable[Event | RowError], outside: Counter[str]
    ) -> Iterator[Event | RowError]:
        """The events inside the window (RowErrors pass through); counts the others."""
        for item in items:
            if isinstance(item, RowError) or self.contains(item.event_time):
                yield item
            else:
                outside[OUTSIDE_WINDOW] += 1


def _limited(items: Iterable[Event | RowError], limit: int) -> Iterable[Event | RowError]:
    seen = 0
    for item in items:
        if not isinstance(item, RowError):
            if seen >= limit:
                return
            seen += 1
        yield item


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        factor = float(text)
    except ValueError:
        factor = -1.0
    if not (0 < factor < math.inf):  # also refuses nan
        raise UserError(f"--speed must be 'max' or a positive factor, not {text!r}")
    return factor


def as_replay(event: Event) -> Event:
    """The replay marker: whatever a file says, a replayed event is backfill, so its segment
    changes say ``origin: replay`` and a live campaign never fires on it."""
    if event.origin is Origin.REPLAY:
        return event
    return event.model_copy(update={"origin": Origin.REPLAY})


def _to_kafka(
    items: Iterable[Event | RowError],
    settings: Settings,
    speed: float | None,
    outside: Counter[str],
    show_progress: bool,
) -> int:
    from stream_app.kafka.topics import require_topics
    from stream_app.tools.publish import make_producer, publish

    require_topics(settings, settings.input_topics)
    started = time.monotonic()
    producer = make_producer(settings)  # connects (and gets its idempotence id) while we read
    errors: list[Event | RowError] = []
    events: list[Event] = []
    for item in items:  # the file is sorted in memory anyway (read_dataset)
        if isinstance(item, RowError):
            errors.append(item)
        else:
            events.append(as_replay(item))
    read_s = time.monotonic() - started
    span = (
        (events[0].event_time.timestamp(), events[-1].event_time.timestamp())
        if events and speed is not None
        else None
    )
    progress = Progress(sys.stderr, enabled=show_progress, verb="published", total=len(events))
    summary = publish(
        [*errors, *events],
        settings,
        speed=speed,
        producer=producer,
        progress=progress,
        event_span=span,
        flush=True,
    )
    report = {
        "published": summary.published,
        "invalid": dict(sorted(summary.invalid.items())),
        "outside_window": outside[OUTSIDE_WINDOW],
        "speed": "max" if speed is None else speed,
        "read_s": round(read_s, 3),
        "publish_s": round(summary.elapsed_s, 3),
        "elapsed_s": round(time.monotonic() - started, 3),
        "events_per_second": round(summary.rate, 1),
    }
    print(orjson.dumps(report).decode())
    return 0
