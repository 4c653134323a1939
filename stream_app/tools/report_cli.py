"""`stream-app report CHANGES --out report.html`: the segment report from a changes file (as
``replay --offline --out`` writes it) or from a topic (``kafka:segment-changes``, read from its
start to its current end without a consumer group).

``--dataset FILE --format F`` gives the events that judge the emitted scores (the replayed file:
what each customer really did next); ``--replay-report R.json`` gives the clusters' centres.
Every input is checked before the long work starts; a mistake is one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_app.contracts.events import Event
from stream_app.errors import UserError
from stream_app.progress import StatusLine
from stream_app.settings import Settings
from stream_app.tools.compare import KAFKA_PREFIX, lines_of
from stream_app.tools.datasets import DatasetFormat, RowError, read_dataset
from stream_app.tools.preflight import require_distinct, require_writable_file
from stream_app.tools.report import (
    ReportFigures,
    build_figures,
    change_log,
    read_replay_report,
)
from stream_app.tools.report_page import decimal, number, render_report


@dataclass(frozen=True)
class ReportRequest:
    changes: str  # a file, or kafka:TOPIC
    out: Path
    dataset: Path | None = None
    fmt: DatasetFormat | None = None
    replay_report: Path | None = None
    title: str = "Segment report"
    show_progress: bool = True


def request_from(args: argparse.Namespace) -> ReportRequest:
    return ReportRequest(
        changes=args.changes,
        out=args.out,
        dataset=args.dataset,
        fmt=args.format,
        replay_report=args.replay_report,
        title=args.title,
        show_progress=not args.no_progress,
    )


def check(request: ReportRequest) -> None:
    """Every mistake the inputs can show before anything is read."""
    if (request.dataset is None) != (request.fmt is None):
        raise UserError("--dataset and --format go together (the events that judge the scores)")
    for path, flag in ((request.dataset, "--dataset"), (request.replay_report, "--replay-report")):
        if path is not None and not path.is_file():
            raise UserError(f"{flag}: no such file: {path}")
    from_file = not request.changes.startswith(KAFKA_PREFIX)
    require_distinct(
        {
            "the changes file": Path(request.changes) if from_file else None,
            "--dataset": request.dataset,
            "--replay-report": request.replay_report,
            "--out": request.out,
        }
    )
    require_writable_file(request.out, "--out")


def run_report(request: ReportRequest, settings: Settings) -> ReportFigures:
    """Read, compute, write the page; returns the figures it shows."""
    check(request)
    status = StatusLine(sys.stderr, enabled=request.show_progress)
    replay_report = None
    if request.replay_report is not None:
        replay_report = read_replay_report(
            request.replay_report.read_bytes(), str(request.replay_report)
        )
    from_topics = request.changes.startswith(KAFKA_PREFIX)
    models_source = None
    if replay_report is None and from_topics:
        replay_report, models_source = clusters_from_models_topic(settings)
    status.show(f"reading changes from {request.changes}", final=False)
    unit = "message" if request.changes.startswith(KAFKA_PREFIX) else "line"
    log = change_log(lines_of(request.changes, settings), unit)
    events = None
    if request.dataset is not None and request.fmt is not None:
        status.show(f"reading events from {request.dataset}")
        events = list(_events(read_dataset(request.dataset, request.fmt)))
    status.show("judging scores and drawing the report")
    sources = {"changes": request.changes}
    if request.dataset is not None:
        sources["events"] = str(request.dataset)
    if request.replay_report is not None:
        sources["replay report"] = str(request.replay_report)
    if models_source is not None:
        sources["cluster centres"] = models_source
    figures = build_figures(
        log,
        settings.segmentation,
        events=events,
        events_source=str(request.dataset),
        replay_report=replay_report,
        sources=sources,
    )
    request.out.write_text(render_report(figures, request.title), encoding="utf-8")
    status.clear()
    return figures


def clusters_from_models_topic(settings: Settings) -> tuple[dict[str, Any] | None, str | None]:
    """The clusters (id, profile, centre) of the newest model record on the models topic, in
    the replay report's shape, and where they came from; (None, None) if there is none (or it
    fails a check: the page then says where centres come from)."""
    from confluent_kafka import KafkaException

    from stream_app.core.model_format import SnapshotError, record_version
    from stream_app.core.models import SegmentModels
    from stream_app.live.trainer import latest_model_record

    try:
        record = latest_model_record(settings, timeout=10.0)
    except KafkaException:  # no models topic: the page says where centres come from
        return None, None
    if record is None:
        return None, None
    models = SegmentModels(settings.segmentation)
    try:
        models.restore(record, settings.model_signing_keys)
    except SnapshotError:
        return None, None
    clusters = models.clusters
    rows = [
        {"id": cid, "profile": clusters.profile(cid).name, "centre": clusters.profile(cid).traits}
        for cid in range(len(clusters.sizes))
    ]
    topic = settings.model_snapshots_topic
    return {"clusters": rows}, f"{KAFKA_PREFIX}{topic} ({record_version(record)})"


def _events(items: Iterator[Event | RowError]) -> Iterator[Event]:
    for item in items:
        if not isinstance(item, RowError):
            yield item


def summary_line(figures: ReportFigures, out: Path) -> str:
    """The one line a report command ends with."""
    s = figures.summary
    line = f"wrote {out}: {number(s.customers)} customers, {number(s.changes)} changes"
    if figures.outcomes is not None:
        aucs = ", ".join(
            f"{name} AUC {decimal(q.auc)}" for name, q in figures.outcomes.quality.items()
        )
        line += f", {aucs}"
    return line


def run_report_command(args: argparse.Namespace, settings: Settings) -> int:
    request = request_from(args)
    figures = run_report(request, settings)
    print(summary_line(figures, request.out))
    return 0
