"""The segment report as one self-contained HTML page: inline CSS and SVG, no script, no font,
no image, and a Content-Security-Policy that lets the page load nothing else.

Every key figure is also text in the DOM with a stable id or ``data-*`` attributes
(``data-value`` holds the exact figure, the text is its rounded form), so a browser test can
read it back. Everything taken from the input (customer-facing names, versions, paths) is
escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Final

import orjson

from stream_app.charts import (
    PAGE_STYLE,
    SEGMENT_COLOURS,
    Axis,
    Bar,
    Series,
    Span,
    bar_chart,
    colour,
    count_axis,
    esc,
    heat_table,
    label_axis,
    line_chart,
    share_axis,
    timeline,
)
from stream_app.tools.report import (
    ClusterProfile,
    DailySizes,
    Outcomes,
    ReportFigures,
    ScoreQuality,
    Summary,
    Transitions,
    VersionSpan,
    profile_features,
)

CSP: Final = "default-src 'none'; style-src 'unsafe-inline'"
TIMELINE_ROWS: Final = 30  # model versions drawn (shared learning cuts one a day; all in the table)
DIMENSION_TITLES: Final = {
    "cluster": "Behavioural cluster",
    "tier": "Purchase-propensity tier",
    "lifecycle": "Lifecycle stage",
}
SCORE_TITLES: Final = {
    "purchase_propensity": ("Purchase propensity", "bought within"),
    "churn_risk": ("Churn risk", "went silent for"),
}


def render_report(figures: ReportFigures, title: str = "Segment report") -> str:
    sections = [
        _header(figures, title),
        _sizes_section(figures.sizes, figures.clusters),
        _flows_section(figures.flows, figures.clusters),
        _clusters_section(figures.clusters),
        _quality_section(figures.outcomes),
        _buy_rate_section(figures.outcomes),
        _funnel_section(figures.funnel),
        _versions_section(figures.versions),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{PAGE_STYLE}</style></head>"
        f"<body><main>{''.join(sections)}</main></body></html>\n"
    )


# --- formatting -----------------------------------------------------------------------------


def number(value: int) -> str:
    return f"{value:,}"


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def decimal(value: float | None, places: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{places}f}"


def instant(value: datetime | None) -> str:
    return "n/a" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def data_value(value: object) -> str:
    """The exact figure as a data-value attribute: JSON, so null stays null."""
    if isinstance(value, datetime):
        value = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return f'data-value="{esc(orjson.dumps(value).decode())}"'


def _kpi(figure_id: str, value: object, text: str, label: str) -> str:
    return (
        f'<div class="kpi"><b id="{figure_id}" {data_value(value)}>{esc(text)}</b>'
        f"<span>{esc(label)}</span></div>"
    )


def cluster_label(cluster: str, profiles: Sequence[ClusterProfile]) -> str:
    names = {f"c{p.cluster}": p.name for p in profiles}
    return f"{cluster} {names[cluster]}" if cluster in names else cluster


# --- header ---------------------------------------------------------------------------------


def _header(figures: ReportFigures, title: str) -> str:
    s: Summary = figures.summary
    kpis = [
        _kpi("total-customers", s.customers, number(s.customers), "customers"),
        _kpi("total-changes", s.changes, number(s.changes), "segment changes"),
        _kpi("first-event", s.first_event, instant(s.first_event), "first change (event time)"),
        _kpi("last-event", s.last_event, instant(s.last_event), "last change (event time)"),
        _kpi(
            "model-versions", len(figures.versions), number(len(figures.versions)), "model versions"
        ),
    ]
    components = ", ".join(f"{k} {number(v)}" for k, v in s.changes_by_component.items())
    origins = ", ".join(f"{k} {number(v)}" for k, v in s.changes_by_origin.items())
    sources = "".join(
        f"<li>{esc(name)}: <code>{esc(where)}</code></li>"
        for name, where in figures.sources.items()
    )
    return (
        f'<header><h1 id="report-title">{esc(title)}</h1>'
        f'<p class="note">Changes by component: {esc(components or "none")}. By origin: '
        f"{esc(origins or 'none')}. Repeated change ids dropped: "
        f'<span id="duplicates-dropped" {data_value(s.duplicates_dropped)}>'
        f"{number(s.duplicates_dropped)}</span>.</p>"
        f'<div class="kpis">{"".join(kpis)}</div>'
        f'<ul class="note">{sources}</ul></header>'
    )


# --- segment sizes --------------------------------------------------------------------------


def _sizes_section(sizes: DailySizes, profiles: Sequence[ClusterProfile]) -> str:
    if not sizes.days:
        return _empty("sizes", "Segment sizes over time", "No changes to count.")
    days = [d.isoformat() for d in sizes.days]
    x = label_axis(days, title="day (event time, UTC)")
    top = max(sizes.customers)
    charts = []
    for dimension, title in DIMENSION_TITLES.items():
        series = [
            Series(
                cluster_label(value, profiles) if dimension == "cluster" else value,
                [(float(i), float(n)) for i, n in enumerate(counts)],
                SEGMENT_COLOURS.get(value, colour(i)),
            )
            for i, (value, counts) in enumerate(sizes.sizes[dimension].items())
        ]
        charts.append(
            f"<h3>{esc(title)}</h3>"
            + line_chart(f"sizes-{dimension}", x, count_axis(top, "customers"), series)
        )
    return (
        '<section id="sizes"><h2>Segment sizes over time</h2>'
        '<p class="note">Each customer counted in their current segment at the end of each day.'
        "</p>" + "".join(charts) + _final_sizes_table(sizes, profiles) + "</section>"
    )


def _final_sizes_table(sizes: DailySizes, profiles: Sequence[ClusterProfile]) -> str:
    rows = []
    for dimension, title in DIMENSION_TITLES.items():
        for value, count in sizes.final(dimension).items():
            name = cluster_label(value, profiles) if dimension == "cluster" else value
            rows.append(
                f"<tr><td>{esc(title)}</td><td>{esc(name)}</td>"
                f'<td class="num" data-dimension="{dimension}" data-segment="{esc(value)}" '
                f"{data_value(count)}>{number(count)}</td></tr>"
            )
    day = sizes.days[-1].isoformat()
    return (
        f'<h3>At the end of <span id="last-day">{esc(day)}</span></h3>'
        '<table id="final-sizes"><thead><tr><th>dimension</th><th>segment</th>'
        f"<th>customers</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _empty(section_id: str, title: str, why: str) -> str:
    return (
        f'<section id="{section_id}"><h2>{esc(title)}</h2><p class="note">{esc(why)}</p></section>'
    )


# --- flows ----------------------------------------------------------------------------------


def _flows_section(flows: dict[str, Transitions], profiles: Sequence[ClusterProfile]) -> str:
    tables = [
        _flow_table(flows[dimension], profiles, title)
        for dimension, title in DIMENSION_TITLES.items()
    ]
    return (
        '<section id="flows"><h2>Flows between segments</h2>'
        '<p class="note">Changes from the previous segment (row) to the new one (column), '
        "per component. Entries of new customers are in the funnel.</p>"
        + "".join(tables)
        + "</section>"
    )


def _flow_table(flow: Transitions, profiles: Sequence[ClusterProfile], title: str) -> str:
    heading = f'<h3>{esc(title)} <span class="note">({number(flow.total)} changes)</span></h3>'
    if not flow.counts:
        return heading + '<p class="note">No such changes.</p>'
    names = {
        v: cluster_label(v, profiles) if flow.dimension == "cluster" else v for v in flow.labels
    }
    by_name = {name: value for value, name in names.items()}
    high = max(flow.counts.values())

    def cell(row: str, column: str) -> tuple[float, str, str]:
        source, target = by_name[row], by_name[column]
        count = flow.counts.get((source, target), 0)
        attributes = (
            f'data-flow="{flow.dimension}" data-from="{esc(source)}" data-to="{esc(target)}" '
            + data_value(count)
        )
        return float(count), number(count) if count else "", attributes

    rows = [names[v] for v in flow.labels]
    return heading + heat_table(f"flows-{flow.dimension}", "from \\ to", rows, rows, cell, high)


# --- cluster profiles -----------------------------------------------------------------------


def _clusters_section(profiles: Sequence[ClusterProfile]) -> str:
    features = profile_features(profiles)
    with_centres = [p for p in profiles if p.centre is not None]
    members = "".join(
        f"<tr><td>c{p.cluster}</td><td>{esc(p.name)}</td>"
        f'<td class="num" data-cluster="{p.cluster}" data-figure="members" '
        f"{data_value(p.members)}>{number(p.members)}</td></tr>"
        for p in profiles
    )
    table = (
        '<table id="cluster-members"><thead><tr><th>cluster</th><th>profile</th>'
        f"<th>customers now</th></tr></thead><tbody>{members}</tbody></table>"
    )
    if not with_centres:
        centres = (
            '<p class="note">Centres come from the offline replay: pass '
            "<code>--replay-report R.json</code> (from <code>stream-app replay ... --offline "
            "--report R.json</code>).</p>"
        )
    else:
        centres = _centre_table(with_centres, features)
    return (
        '<section id="clusters"><h2>Cluster profiles</h2>'
        + table
        + "<h3>Centres per feature</h3>"
        + '<p class="note">In standard deviations from the mean customer: orange above, '
        "blue below.</p>" + centres + "</section>"
    )


def _centre_table(profiles: Sequence[ClusterProfile], features: Sequence[str]) -> str:
    """Features as rows, clusters as columns (names are in the table above)."""
    by_column = {f"c{p.cluster}": p for p in profiles}
    high = max((abs(v) for p in profiles for v in (p.centre or {}).values()), default=0.0)

    def cell(row: str, column: str) -> tuple[float, str, str]:
        profile = by_column[column]
        value = (profile.centre or {}).get(row)
        attributes = f'data-cluster="{profile.cluster}" data-feature="{esc(row)}" '
        if value is None:
            return 0.0, "", attributes + data_value(None)
        return value, f"{value:+.2f}", attributes + data_value(value)

    return heat_table("cluster-centres", "feature", features, list(by_column), cell, high)


# --- emitted scores -------------------------------------------------------------------------


def _quality_section(outcomes: Outcomes | None) -> str:
    title = "Calibration and AUC of the emitted scores"
    if outcomes is None:
        return _empty(
            "quality",
            title,
            "Judging scores needs what happened next: pass the events with "
            "--dataset FILE --format FORMAT.",
        )
    parts = [_score_part(outcomes.quality[name], outcomes, name) for name in outcomes.quality]
    return (
        f'<section id="quality"><h2>{esc(title)}</h2>'
        '<p class="note">Each score a change carried (a propensity change\'s purchase '
        "propensity, a lifecycle change's churn risk), judged once its horizon had passed in "
        f"the events of <code>{esc(outcomes.source)}</code>. Months are the scores' event "
        "time.</p>" + "".join(parts) + "</section>"
    )


def _score_part(quality: ScoreQuality, outcomes: Outcomes, name: str) -> str:
    title, outcome = SCORE_TITLES[name]
    days = (
        outcomes.purchase_horizon_days
        if name == "purchase_propensity"
        else (outcomes.churn_horizon_days)
    )
    head = (
        f'<h3>{esc(title)}: AUC <span id="auc-{name}" {data_value(quality.auc)}>'
        f"{decimal(quality.auc)}</span>, calibration error (ECE) "
        f'<span id="ece-{name}" {data_value(quality.ece)}>{decimal(quality.ece)}</span>, '
        f'<span id="judged-{name}" {data_value(quality.judged)}>{number(quality.judged)}</span>'
        f" scores judged ({esc(outcome)} {days:g} days: {share(quality.positive_rate)})</h3>"
    )
    if not quality.judged:
        return head + '<p class="note">No score of this kind had matured.</p>'
    return (
        head
        + _auc_chart(quality, name)
        + _reliability_chart(quality, name)
        + (_period_table(quality, name))
    )


def _auc_chart(quality: ScoreQuality, name: str) -> str:
    periods = [p.period for p in quality.periods]
    points = [(float(i), p.auc) for i, p in enumerate(quality.periods) if p.auc is not None]
    rates = [(float(i), p.positive_rate) for i, p in enumerate(quality.periods)]
    means = [(float(i), p.mean_score) for i, p in enumerate(quality.periods)]
    series = [
        Series("AUC", points, colour(0), markers=True),
        Series("mean score", means, colour(1), dashed=True, markers=True),
        Series("observed rate", rates, colour(2), markers=True),
    ]
    return line_chart(
        f"auc-over-time-{name}",
        label_axis(periods, title="month"),
        share_axis("AUC, score, rate"),
        series,
    )


def _reliability_chart(quality: ScoreQuality, name: str) -> str:
    points = [(row["mean_score"], row["observed_rate"]) for row in quality.reliability]
    axis = Axis(0, 1, [(i / 5, f"{i / 5:.1f}") for i in range(6)], "mean score in the bin")
    series = [Series("observed rate", points, colour(3), markers=True)]
    return line_chart(
        f"reliability-{name}", axis, share_axis("observed rate"), series, diagonal=True
    )


def _period_table(quality: ScoreQuality, name: str) -> str:
    figures = ("judged", "mean_score", "positive_rate", "auc", "ece")
    rows = []
    for p in quality.periods:
        texts = {
            "judged": number(p.judged),
            "mean_score": decimal(p.mean_score),
            "positive_rate": share(p.positive_rate),
            "auc": decimal(p.auc),
            "ece": decimal(p.ece),
        }
        cells = "".join(
            f'<td class="num" data-score="{name}" data-period="{esc(p.period)}" '
            f'data-figure="{figure}" {data_value(getattr(p, figure))}>{texts[figure]}</td>'
            for figure in figures
        )
        rows.append(f"<tr><td>{esc(p.period)}</td>{cells}</tr>")
    return (
        f'<table id="quality-{name}"><thead><tr><th>month</th><th>judged</th><th>mean score'
        "</th><th>observed rate</th><th>AUC</th><th>ECE</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


# --- buy rate by tier -----------------------------------------------------------------------


def _buy_rate_section(outcomes: Outcomes | None) -> str:
    title = "Buy rate by propensity tier"
    if outcomes is None:
        return _empty("buy-rate", title, "Needs the events: pass --dataset FILE --format FORMAT.")
    bars = [
        Bar(
            r.tier,
            r.bought_share or 0.0,
            f"{share(r.bought_share)} of {number(r.entered)}",
            SEGMENT_COLOURS[r.tier],
        )
        for r in outcomes.buy_rates
    ]
    rows = "".join(
        f'<tr><td>{esc(r.tier)}</td><td class="num" data-tier="{esc(r.tier)}" '
        f'data-figure="entered" {data_value(r.entered)}>{number(r.entered)}</td>'
        f'<td class="num" data-tier="{esc(r.tier)}" data-figure="bought_share" '
        f"{data_value(r.bought_share)}>"
        f"{share(r.bought_share)}</td></tr>"
        for r in outcomes.buy_rates
    )
    return (
        f'<section id="buy-rate"><h2>{esc(title)}</h2><p class="note">Of the customers who '
        f"entered each tier, the share who bought within {outcomes.purchase_horizon_days:g} "
        "days (entries whose horizon had passed).</p>"
        + bar_chart("buy-rate-chart", bars, 1.0)
        + '<table id="buy-rate-table"><thead><tr><th>tier</th><th>entries judged</th>'
        f"<th>bought</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


# --- lifecycle funnel -----------------------------------------------------------------------


def _funnel_section(funnel: dict[str, int]) -> str:
    top = max(funnel.values(), default=0)
    bars = [
        Bar(stage, float(n), f"{number(n)} ({share(n / top if top else None)})",
            SEGMENT_COLOURS[stage])
        for stage, n in funnel.items()
    ]  # fmt: skip
    rows = "".join(
        f'<tr><td>{esc(stage)}</td><td class="num" data-stage="{esc(stage)}" '
        f"{data_value(n)}>{number(n)}</td></tr>"
        for stage, n in funnel.items()
    )
    return (
        '<section id="funnel"><h2>Lifecycle funnel</h2><p class="note">Customers who were ever '
        "in each stage, and their share of all customers.</p>"
        + bar_chart("funnel-chart", bars)
        + '<table id="funnel-table"><thead><tr><th>stage</th><th>customers</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></section>"
    )


# --- model versions -------------------------------------------------------------------------


def _versions_section(versions: Sequence[VersionSpan]) -> str:
    if not versions:
        return _empty("versions", "Model versions over time", "No changes.")
    start = min(v.first_event for v in versions).astimezone(UTC).date()
    end = max(v.last_event for v in versions).astimezone(UTC).date()
    days = max((end - start).days, 1)
    x = label_axis(_day_labels(start, days + 1), title="day (event time, UTC)")
    spans = [
        Span(
            v.version,
            _days_since(start, v.first_event),
            _days_since(start, v.last_event),
            colour(i),
            f"{instant(v.first_event)} to {instant(v.last_event)}",
        )
        for i, v in enumerate(versions[:TIMELINE_ROWS])
    ]
    more = len(versions) - len(spans)
    drawn = f" The chart shows the first {len(spans)}; the table lists all." if more else ""
    rows = "".join(
        f"<tr><td><code>{esc(v.version)}</code></td>"
        f"<td>{esc(instant(v.first_event))}</td><td>{esc(instant(v.last_event))}</td>"
        f'<td class="num" data-version="{esc(v.version)}" data-figure="changes" '
        f"{data_value(v.changes)}>{number(v.changes)}</td>"
        f'<td class="num" data-version="{esc(v.version)}" data-figure="customers" '
        f"{data_value(v.customers)}>"
        f"{number(v.customers)}</td></tr>"
        for v in versions
    )
    return (
        '<section id="versions"><h2>Model versions over time</h2>'
        f'<p class="note">The model version each change was scored by.{drawn}</p>'
        + timeline("versions-chart", x, spans)
        + '<table id="versions-table"><thead><tr><th>version</th><th>first change</th>'
        "<th>last change</th><th>changes</th><th>customers</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _day_labels(start: date, days: int) -> list[str]:
    return [date.fromordinal(start.toordinal() + i).isoformat() for i in range(days + 1)]


def _days_since(start: date, moment: datetime) -> float:
    midnight = datetime(start.year, start.month, start.day, tzinfo=UTC)
    return (moment - midnight).total_seconds() / 86400
