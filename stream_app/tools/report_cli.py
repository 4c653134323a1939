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
