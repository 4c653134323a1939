"""The worker's live page, ``/segments`` on its web port: this worker's customers by current
segment and its models' quality right now, in the segment report's plot style.

One self-contained HTML page (inline CSS and SVG, no script, a Content-Security-Policy that lets
it load nothing else) that reloads itself every ``REFRESH_S`` seconds. Key figures carry stable
ids and ``data-value`` attributes, as in the report. Sizes count the customers stored in this
worker's partitions (a worker sees only its own), each in the segment of their newest change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

from stream_app.charts import PAGE_STYLE, SEGMENT_COLOURS, Bar, bar_chart, colour, esc
from stream_app.contracts.events import Lifecycle, PropensityTier
from stream_app.core.state import CustomerState

if TYPE_CHECKING:
    from stream_app.live.pipeline import LivePipeline

LIVE_PAGE_PATH: Final = "/segments"
REFRESH_S: Final = 10
CSP: Final = "default-src 'none'; style-src 'unsafe-inline'"
DIMENSIONS: Final = {
    "cluster": "Behavioural cluster",
    "tier": "Purchase-propensity tier",
    "lifecycle": "Lifecycle stage",
}
MODELS: Final = {"purchase": "Purchase propensity", "churn": "Churn risk"}
_ORDER: Final = {
    "tier": [t.value for t in PropensityTier],
    "lifecycle": [s.value for s in Lifecycle],
}


@dataclass(frozen=True)
class LiveFigures:
    customers: int
    sizes: dict[str, dict[str, int]]  # dimension -> value (c3, high, at_risk) -> customers
    cluster_names: dict[str, str]  # c3 -> its newest name
    quality: dict[str, dict[str, Any]]  # purchase, churn -> labels, positive_rate, roc_auc, ...
    model_version: str
    events: int  # applied since this worker started
    partitions: list[int]


def segment_sizes(states: Iterable[CustomerState]) -> tuple[int, dict[str, dict[str, int]]]:
    """Customers with a segment, and how many are in each value of each dimension."""
    counts: dict[str, Counter[str]] = {d: Counter() for d in DIMENSIONS}
    customers = 0
    for state in states:
        member = state.membership
        if member is None:
            continue
        customers += 1
        counts["cluster"][f"c{member.cluster}"] += 1
        counts["tier"][member.tier.value] += 1
        counts["lifecycle"][member.stage.value] += 1
    return customers, {d: _ordered(d, c) for d, c in counts.items()}


def _ordered(dimension: str, counts: Counter[str]) -> dict[str, int]:
    if dimension == "cluster":
        return {k: counts[k] for k in sorted(counts, key=lambda k: int(k[1:]))}
    order = _ORDER[dimension]
    return {k: counts[k] for k in sorted(counts, key=order.index)}


def live_figures(pipeline: LivePipeline) -> LiveFigures:
    """What the page shows, read from the running pipeline (its stores and models)."""
    states = [s for proc in pipeline.processors.values() for s in proc.store]
    customers, sizes = segment_sizes(states)
    names = {
        f"c{s.membership.cluster}": s.membership.cluster_name
        for s in states
        if s.membership is not None and s.membership.cluster_name
    }
    models = pipeline.models
    return LiveFigures(
        customers=customers,
        sizes=sizes,
        cluster_names={k: names[k] for k in sorted(names)},
        quality={"purchase": models.purchase.quality(), "churn": models.churn.quality()},
        model_version=models.stamp,
        events=sum(pipeline.counts.events.values()),
        partitions=sorted(pipeline.processors),
    )


def _value(value: object) -> str:
    return f'data-value="{esc(orjson.dumps(value).decode())}"'


def _kpi(figure_id: str, value: object, text: str, label: str) -> str:
    return (
        f'<div class="kpi"><b id="{figure_id}" {_value(value)}>{esc(text)}</b>'
        f"<span>{esc(label)}</span></div>"
    )


def _decimal(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_live_page(figures: LiveFigures) -> str:
    kpis = "".join(
        [
            _kpi("live-customers", figures.customers, f"{figures.customers:,}", "customers"),
            _kpi("live-events", figures.events, f"{figures.events:,}", "events since start"),
            *(
                _kpi(
                    f"live-auc-{name}",
                    figures.quality[name]["roc_auc"],
                    _decimal(figures.quality[name]["roc_auc"]),
                    f"{title} AUC",
                )
                for name, title in MODELS.items()
            ),
        ]
    )
    partitions = ", ".join(str(p) for p in figures.partitions) or "none yet"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        f"<title>Live segments</title><style>{PAGE_STYLE}</style></head><body><main>"
        '<header><h1 id="live-title">Live segments</h1>'
        f'<p class="note">This worker (partitions {esc(partitions)}), model '
        f'<code id="live-model-version">{esc(figures.model_version)}</code>. Reloads every '
        f'{REFRESH_S} s.</p><div class="kpis">{kpis}</div></header>'
        + _sizes_section(figures)
        + _quality_section(figures)
        + "</main></body></html>\n"
    )


def _sizes_section(figures: LiveFigures) -> str:
    parts = []
    for dimension, title in DIMENSIONS.items():
        sizes = figures.sizes[dimension]
        bars = [
            Bar(
                f"{value} {figures.cluster_names.get(value, '')}".strip(),
                float(n),
                f"{n:,}",
                SEGMENT_COLOURS.get(value, colour(i)),
            )
            for i, (value, n) in enumerate(sizes.items())
        ]
        rows = "".join(
            f"<tr><td>{esc(value)}</td><td>{esc(figures.cluster_names.get(value, ''))}</td>"
            f'<td class="num" data-dimension="{dimension}" '
            f'data-segment="{esc(value)}" {_value(n)}>{n:,}</td></tr>'
            for value, n in sizes.items()
        )
        parts.append(
            f"<h3>{esc(title)}</h3>"
            + (bar_chart(f"live-{dimension}", bars) if bars else "<p class='note'>none yet</p>")
            + f'<table id="live-sizes-{dimension}"><tbody>{rows}</tbody></table>'
        )
    return (
        '<section id="live-sizes"><h2>Current segment sizes</h2>'
        '<p class="note">Customers in each segment now (their newest change).</p>'
        + "".join(parts)
        + "</section>"
    )


def _quality_section(figures: LiveFigures) -> str:
    rows = []
    for name, title in MODELS.items():
        q = figures.quality[name]
        cells = "".join(
            f'<td class="num" data-model="{name}" data-figure="{key}" {_value(q.get(key))}>'
            f"{esc(text)}</td>"
            for key, text in (
                ("labels", f"{q['labels']:,}"),
                ("positive_rate", _decimal(q.get("positive_rate"))),
                ("roc_auc", _decimal(q.get("roc_auc"))),
                ("log_loss", _decimal(q.get("log_loss"))),
                ("ece", _decimal(q.get("ece"))),
            )
        )
        rows.append(f"<tr><td>{esc(title)}</td>{cells}</tr>")
    return (
        '<section id="live-quality"><h2>Model quality</h2><p class="note">Progressive '
        "(predict, then learn) on the labels matured so far.</p>"
        '<table id="live-quality-table"><thead><tr><th>model</th><th>labels</th>'
        "<th>positive rate</th><th>AUC</th><th>log loss</th>"
        '<th title="expected calibration error, 10 bins">ECE</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def add_live_page(app: Any, pipeline: LivePipeline) -> None:
    """Serve the page on the worker's web port (a Faust page)."""

    async def segments(web: Any, request: Any) -> Any:
        return web.html(render_live_page(live_figures(pipeline)))

    app.page(LIVE_PAGE_PATH, name="segments")(segments)
