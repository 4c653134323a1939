"""The segment report's figures: plain functions over segment changes, in event time only.

Every figure is computed from the changes themselves (a changes file or the segment-changes
topic), except two that need more than the changes say:

* the quality of the emitted scores and the buy rate by tier need what really happened next, so
  they take the events (the replayed dataset) and judge each score with
  :class:`~stream_app.tools.score_audit.ScoreAudit`, the replay's own audit;
* the clusters' centres are the model's, so they come from the offline replay's report JSON.

Changes are deduplicated by ``change_id`` and put in event-time order (ties by customer and
sequence); a customer's segment at any moment is their change with the highest sequence so far.
Days and months are UTC calendar days and months of event time. No wall clock is read.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import orjson
from pydantic import ValidationError

from stream_app.contracts.events import (
    Component,
    Event,
    Lifecycle,
    PropensityTier,
    ScoreName,
    Segment,
    SegmentChange,
    describe_errors,
)
from stream_app.errors import UserError
from stream_app.settings import SegmentationSettings
from stream_app.tools.score_audit import (
    TIERS,
    Judged,
    ScoreAudit,
    expected_calibration_error,
    roc_auc,
)

DIMENSIONS: Final = ("cluster", "tier", "lifecycle")
DIMENSION_OF: Final = {
    Component.CLUSTER: "cluster",
    Component.PROPENSITY: "tier",
    Component.LIFECYCLE: "lifecycle",
}
FUNNEL_STAGES: Final = (
    Lifecycle.NEW,
    Lifecycle.ACTIVE,
    Lifecycle.AT_RISK,
    Lifecycle.LAPSED,
    Lifecycle.REACTIVATED,
)
SCORE_NAMES: Final[tuple[ScoreName, ...]] = ("purchase_propensity", "churn_risk")
_TIER_ORDER: Final = {t.value: i for i, t in enumerate(PropensityTier)}
_STAGE_ORDER: Final = {s.value: i for i, s in enumerate(Lifecycle)}


# --- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeLog:
    """The changes a report is about, once each, in event-time order."""

    changes: list[SegmentChange]
    duplicates_dropped: int = 0


def parse_change(record: bytes | str | Mapping[str, Any] | SegmentChange) -> SegmentChange:
    """One change from its JSON (bytes, text or decoded dict); a UserError says what is wrong."""
    if isinstance(record, SegmentChange):
        return record
    try:
        if isinstance(record, bytes | str):
            return SegmentChange.model_validate_json(record)
        return SegmentChange.model_validate(record)
    except ValidationError as exc:
        raise UserError(f"not a segment change: {describe_errors(exc)}") from None


def change_log(
    records: Iterable[bytes | str | Mapping[str, Any] | SegmentChange], unit: str = "line"
) -> ChangeLog:
    """Parse, drop repeated change ids (a redelivered change) and sort by event time. A record
    that is not a change is named by its position (``line 4: ...``)."""
    seen: set[str] = set()
    changes: list[SegmentChange] = []
    duplicates = 0
    for position, record in enumerate(records, start=1):
        if isinstance(record, bytes | str) and not record.strip():
            continue
        try:
            change = parse_change(record)
        except UserError as exc:
            raise UserError(f"{unit} {position}: {exc}") from None
        if change.change_id in seen:
            duplicates += 1
            continue
        seen.add(change.change_id)
        changes.append(change)
    changes.sort(key=lambda c: (c.event_time, c.customer_id, c.sequence))
    return ChangeLog(changes, duplicates)


def day_of(instant: datetime) -> date:
    return instant.astimezone(UTC).date()


def month_of(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m")


def segment_value(segment: Segment, dimension: str) -> str:
    """What a segment is along one dimension: ``c3``, ``high``, ``at_risk``."""
    if dimension == "cluster":
        return f"c{segment.cluster}"
    if dimension == "tier":
        return segment.propensity_tier.value
    return segment.lifecycle.value


def value_order(dimension: str, value: str) -> tuple[int, str]:
    """Clusters by number, tiers and stages in their natural order."""
    if dimension == "cluster":
        return (int(value[1:]), value)
    order = _TIER_ORDER if dimension == "tier" else _STAGE_ORDER
    return (order.get(value, len(order)), value)


# --- the headline ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    customers: int
    changes: int
    duplicates_dropped: int
    first_event: datetime | None
    last_event: datetime | None
    changes_by_component: dict[str, int]
    changes_by_origin: dict[str, int]


def summarize(log: ChangeLog) -> Summary:
    changes = log.changes
    return Summary(
        customers=len({c.customer_id for c in changes}),
        changes=len(changes),
        duplicates_dropped=log.duplicates_dropped,
        first_event=changes[0].event_time if changes else None,
        last_event=changes[-1].event_time if changes else None,
        changes_by_component=_ordered_counts(
            Counter(c.component.value for c in changes), [m.value for m in Component]
        ),
        changes_by_origin=dict(sorted(Counter(c.origin.value for c in changes).items())),
    )


def _ordered_counts(counts: Counter[str], order: Sequence[str]) -> dict[str, int]:
    return {k: counts[k] for k in order if counts[k]}


# --- segment sizes over time ----------------------------------------------------------------


@dataclass(frozen=True)
class DailySizes:
    """Each customer's current segment at the end of each day, counted per dimension."""

    days: list[date]
    customers: list[int]  # customers seen by the end of each day
    sizes: dict[str, dict[str, list[int]]]  # dimension -> value -> count at the end of each day

    def final(self, dimension: str) -> dict[str, int]:
        return {value: counts[-1] for value, counts in self.sizes[dimension].items()}


def sizes_by_day(changes: Sequence[SegmentChange]) -> DailySizes:
    """Segment sizes at the end of every day from the first change's day to the last's (a day
    without changes repeats the day before)."""
    if not changes:
        return DailySizes([], [], {d: {} for d in DIMENSIONS})
    current: dict[str, SegmentChange] = {}
    counts: dict[str, Counter[str]] = {d: Counter() for d in DIMENSIONS}
    history: dict[str, dict[str, list[int]]] = {d: defaultdict(list) for d in DIMENSIONS}
    days, customers = _calendar(changes), []
    position = 0
    for day in days:
        while position < len(changes) and day_of(changes[position].event_time) == day:
            _apply(changes[position], current, counts)
            position += 1
        customers.append(len(current))
        for dimension in DIMENSIONS:
            _snapshot(history[dimension], counts[dimension], len(customers))
    return DailySizes(days, customers, {d: _sorted_series(d, history[d]) for d in DIMENSIONS})


def _calendar(changes: Sequence[SegmentChange]) -> list[date]:
    first, last = day_of(changes[0].event_time), day_of(changes[-1].event_time)
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _apply(
    change: SegmentChange, current: dict[str, SegmentChange], counts: dict[str, Counter[str]]
) -> None:
    """Move the customer to the change's segment, unless a later change already did."""
    before = current.get(change.customer_id)
    if before is not None and before.sequence >= change.sequence:
        return
    current[change.customer_id] = change
    for dimension in DIMENSIONS:
        if before is not None:
            counts[dimension][segment_value(before.current, dimension)] -= 1
        counts[dimension][segment_value(change.current, dimension)] += 1


def _snapshot(series: dict[str, list[int]], counts: Counter[str], length: int) -> None:
    for value, count in counts.items():
        series[value].extend([0] * (length - 1 - len(series[value])))  # not seen before today
        series[value].append(count)


def _sorted_series(dimension: str, series: dict[str, list[int]]) -> dict[str, list[int]]:
    return {v: series[v] for v in sorted(series, key=lambda v: value_order(dimension, v))}


# --- flows between segments -----------------------------------------------------------------


@dataclass(frozen=True)
class Transitions:
    """How many changes of one component moved customers from each value to each other."""

    dimension: str
    labels: list[str]
    counts: dict[tuple[str, str], int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def transitions(changes: Iterable[SegmentChange]) -> dict[str, Transitions]:
    """Previous -> current for every cluster, propensity and lifecycle change (entries, which
    have no previous segment, are the funnel's business)."""
    counts: dict[str, Counter[tuple[str, str]]] = {d: Counter() for d in DIMENSION_OF.values()}
    for change in changes:
        dimension = DIMENSION_OF.get(change.component)
        if dimension is None or change.previous is None:
            continue
        move = (
            segment_value(change.previous, dimension),
            segment_value(change.current, dimension),
        )
        counts[dimension][move] += 1
    return {d: _matrix(d, c) for d, c in counts.items()}


def _matrix(dimension: str, counts: Counter[tuple[str, str]]) -> Transitions:
    labels = sorted({v for move in counts for v in move}, key=lambda v: value_order(dimension, v))
    return Transitions(dimension, labels, dict(sorted(counts.items())))


# --- the lifecycle funnel -------------------------------------------------------------------


def lifecycle_funnel(changes: Iterable[SegmentChange]) -> dict[str, int]:
    """Customers who were ever in each lifecycle stage, in the stages' order."""
    reached: dict[str, set[str]] = {s.value: set() for s in FUNNEL_STAGES}
    for change in changes:
        for segment in (change.previous, change.current):
            if segment is not None:
                reached[segment.lifecycle.value].add(change.customer_id)
    return {stage: len(customers) for stage, customers in reached.items()}


# --- model versions over time ---------------------------------------------------------------


@dataclass(frozen=True)
class VersionSpan:
    version: str
    first_event: datetime
    last_event: datetime
    changes: int
    customers: int


def model_versions(changes: Iterable[SegmentChange]) -> list[VersionSpan]:
    """Each model version that emitted a change: from when to when, how much, in first-use
    order."""
    spans: dict[str, list[SegmentChange]] = defaultdict(list)
    for change in changes:
        spans[change.model_version].append(change)
    found = [
        VersionSpan(
            version,
            min(c.event_time for c in emitted),
            max(c.event_time for c in emitted),
            len(emitted),
            len({c.customer_id for c in emitted}),
        )
        for version, emitted in spans.items()
    ]
    return sorted(found, key=lambda s: (s.first_event, s.version))


# --- cluster profiles -----------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterProfile:
    cluster: int
    name: str
    members: int  # customers in it after the last change
    centre: dict[str, float] | None  # feature -> centre in standard deviations (replay report)


def cluster_profiles(
    changes: Sequence[SegmentChange],
    final_sizes: Mapping[str, int],
    replay_report: Mapping[str, Any] | None = None,
) -> list[ClusterProfile]:
    """Every cluster a change named or the replay report lists, with its newest name (the
    report's, else the newest change's), its members and its centre."""
    names = {c.current.cluster: c.current.cluster_profile for c in changes}
    centres: dict[int, dict[str, float]] = {}
    for row in clusters_of(replay_report):
        names[row["id"]] = row["profile"]
        centres[row["id"]] = row["centre"]
    return [
        ClusterProfile(cid, names[cid], final_sizes.get(f"c{cid}", 0), centres.get(cid))
        for cid in sorted(names)
    ]


def clusters_of(replay_report: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The replay report's clusters (id, profile name, centre), checked; [] without a report."""
    if replay_report is None:
        return []
    rows = replay_report.get("clusters")
    if not isinstance(rows, list) or not all(_cluster_row(r) for r in rows):
        raise UserError(
            "the replay report has no valid 'clusters' list (write one with "
            "`stream-app replay ... --offline --report FILE`)"
        )
    return rows


def _cluster_row(row: object) -> bool:
    return (
        isinstance(row, dict)
        and isinstance(row.get("id"), int)
        and isinstance(row.get("profile"), str)
        and isinstance(row.get("centre"), dict)
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in row["centre"].values()
        )
    )


def profile_features(profiles: Sequence[ClusterProfile]) -> list[str]:
    """The features of the centres, in the model's order (the first centre's)."""
    features: dict[str, None] = {}
    for profile in profiles:
        features.update(dict.fromkeys(profile.centre or {}))
    return list(features)


# --- emitted scores against what happened next ----------------------------------------------


@dataclass(frozen=True)
class PeriodQuality:
    period: str  # YYYY-MM of the scores' event time
    judged: int
    mean_score: float
    positive_rate: float
    auc: float | None  # None when every outcome of the month was the same
    ece: float | None


@dataclass(frozen=True)
class ScoreQuality:
    """How the scores a change carried (a propensity change's purchase propensity, a lifecycle
    change's churn risk) ranked and were calibrated against their outcome."""

    score: ScoreName
    judged: int
    positive_rate: float | None
    auc: float | None
    ece: float | None
    reliability: list[dict[str, Any]]  # bin, count, mean_score, observed_rate
    periods: list[PeriodQuality]


@dataclass(frozen=True)
class TierBuyRate:
    tier: str
    entered: int  # entries into the tier whose purchase horizon has passed
    bought_share: float | None  # of those, the share who bought within the horizon


def audit_scores(
    changes: Iterable[SegmentChange], events: Iterable[Event], settings: SegmentationSettings
) -> ScoreAudit:
    """The replay's score audit, fed with the changes and the events that judge them."""
    audit = ScoreAudit(settings)
    for event in events:
        audit.event(event)
    for change in changes:
        audit.change(change)
    return audit


def score_quality(audit: ScoreAudit, name: ScoreName) -> ScoreQuality:
    judged = audit.judged(name)
    overall = _quality(judged)
    return ScoreQuality(
        score=name,
        judged=len(judged),
        positive_rate=overall.positive_rate if judged else None,
        auc=overall.auc,
        ece=overall.ece,
        reliability=expected_calibration_error(
            [j.score for j in judged], [j.outcome for j in judged]
        )["reliability"],
        periods=[_quality(group, period) for period, group in _by_month(judged).items()],
    )


def _by_month(judged: Iterable[Judged]) -> dict[str, list[Judged]]:
    months: dict[str, list[Judged]] = defaultdict(list)
    for item in judged:
        months[month_of(item.at)].append(item)
    return dict(sorted(months.items()))


def _quality(judged: Sequence[Judged], period: str = "all") -> PeriodQuality:
    scores, outcomes = [j.score for j in judged], [j.outcome for j in judged]
    count = len(judged) or 1
    return PeriodQuality(
        period=period,
        judged=len(judged),
        mean_score=round(sum(scores) / count, 4),
        positive_rate=round(sum(outcomes) / count, 4),
        auc=roc_auc(scores, outcomes),
        ece=expected_calibration_error(scores, outcomes)["ece"],
    )


def buy_rate_by_tier(audit: ScoreAudit) -> list[TierBuyRate]:
    rates = audit.report()["buy_rate_by_tier_entered"]
    return [
        TierBuyRate(tier, rates[tier]["entered"], rates[tier]["bought_within_horizon"])
        for tier in TIERS
    ]


# --- everything -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcomes:
    """What judged the scores: the horizons used and where the events came from."""

    source: str
    purchase_horizon_days: float
    churn_horizon_days: float
    quality: dict[str, ScoreQuality]
    buy_rates: list[TierBuyRate]


@dataclass(frozen=True)
class ReportFigures:
    summary: Summary
    sizes: DailySizes
    flows: dict[str, Transitions]
    funnel: dict[str, int]
    versions: list[VersionSpan]
    clusters: list[ClusterProfile]
    outcomes: Outcomes | None  # None: no events were given to judge the scores with
    sources: dict[str, str] = field(default_factory=dict)


def build_figures(
    log: ChangeLog,
    settings: SegmentationSettings,
    *,
    events: Iterable[Event] | None = None,
    events_source: str = "",
    replay_report: Mapping[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
) -> ReportFigures:
    sizes = sizes_by_day(log.changes)
    return ReportFigures(
        summary=summarize(log),
        sizes=sizes,
        flows=transitions(log.changes),
        funnel=lifecycle_funnel(log.changes),
        versions=model_versions(log.changes),
        clusters=cluster_profiles(log.changes, sizes.final("cluster"), replay_report),
        outcomes=None if events is None else judge(log, events, events_source, settings),
        sources=dict(sources or {}),
    )


def judge(
    log: ChangeLog, events: Iterable[Event], source: str, settings: SegmentationSettings
) -> Outcomes:
    audit = audit_scores(log.changes, events, settings)
    return Outcomes(
        source=source,
        purchase_horizon_days=settings.purchase_horizon_days,
        churn_horizon_days=settings.churn_horizon_days,
        quality={name: score_quality(audit, name) for name in SCORE_NAMES},
        buy_rates=buy_rate_by_tier(audit),
    )


def read_replay_report(raw: bytes, source: str) -> dict[str, Any]:
    """A replay report JSON (``replay --offline --report``), with its clusters checked."""
    try:
        report = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UserError(f"{source} is not JSON: {exc}") from None
    if not isinstance(report, dict):
        raise UserError(f"{source} is not a replay report (expected a JSON object)")
    clusters_of(report)
    return report
