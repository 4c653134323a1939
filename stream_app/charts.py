"""Inline SVG charts and the page style, one look for every page (the segment report, the
worker's live page), for pages that must open without a network.

No script, no font, no image: each function returns SVG (or HTML) text with every label
escaped. Colours, sizes and the font come from this module only, so every chart of a page looks
alike: the same axes, grid, legend and palette.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

FONT: Final = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"
INK: Final = "#1f2933"
MUTED: Final = "#6b7785"
GRID: Final = "#e3e7eb"
# Okabe-Ito without its yellow (unreadable on white), then four more that stay apart.
PALETTE: Final = (
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#d55e00",
    "#cc79a7",
    "#56b4e9",
    "#882255",
    "#44aa99",
    "#999933",
    "#555555",
)
# One colour per tier and lifecycle stage on every page.
SEGMENT_COLOURS: Final = {
    "unscored": "#999999",
    "low": "#56b4e9",
    "medium": "#e69f00",
    "high": "#d55e00",
    "new": "#56b4e9",
    "active": "#009e73",
    "at_risk": "#e69f00",
    "lapsed": "#d55e00",
    "reactivated": "#cc79a7",
}
POSITIVE: Final = (213, 94, 0)  # diverging heat: above zero
NEGATIVE: Final = (0, 114, 178)  # below zero
WIDTH: Final = 760
HEIGHT: Final = 280
MARGIN: Final = (16, 230, 40, 56)  # top, right (legend), bottom, left


PAGE_STYLE: Final = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;
 color:#1f2933;margin:0;background:#f6f7f9;line-height:1.45}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:0 0 8px}
h3{font-size:15px;margin:16px 0 6px}
section{background:#fff;border:1px solid #e3e7eb;border-radius:6px;padding:16px 20px;margin:16px 0}
p.note{color:#6b7785;margin:4px 0 10px}
.kpis{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0 0}
.kpi{background:#fff;border:1px solid #e3e7eb;border-radius:6px;padding:10px 14px;min-width:130px}
.kpi b{display:block;font-size:22px}.kpi span{color:#6b7785;font-size:13px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #e3e7eb;padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
svg.chart{max-width:100%;height:auto;display:block;margin:4px 0 8px}
code{font-size:12px;word-break:break-all}
"""


def esc(text: object) -> str:
    """Text or attribute value, safe in HTML and inline SVG (quotes included)."""
    return html.escape(str(text), quote=True)


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


@dataclass(frozen=True)
class Series:
    label: str
    points: list[tuple[float, float]]  # (x, y)
    colour: str
    dashed: bool = False
    markers: bool = False


@dataclass(frozen=True)
class Axis:
    low: float
    high: float
    ticks: list[tuple[float, str]]  # (value, label)
    title: str = ""


@dataclass(frozen=True)
class _Frame:
    x: Axis
    y: Axis
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def left(self) -> float:
        return MARGIN[3]

    @property
    def right(self) -> float:
        return self.width - MARGIN[1]

    @property
    def top(self) -> float:
        return MARGIN[0]

    @property
    def bottom(self) -> float:
        return self.height - MARGIN[2]

    def sx(self, value: float) -> float:
        span = (self.x.high - self.x.low) or 1.0
        return self.left + (value - self.x.low) / span * (self.right - self.left)

    def sy(self, value: float) -> float:
        span = (self.y.high - self.y.low) or 1.0
        return self.bottom - (value - self.y.low) / span * (self.bottom - self.top)


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2 or 5 times a power of ten) up to at least `high`."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def count_axis(high: float, title: str) -> Axis:
    ticks = nice_ticks(high)
    return Axis(0.0, ticks[-1], [(t, f"{t:,.0f}") for t in ticks], title)


def share_axis(title: str, high: float = 1.0) -> Axis:
    ticks = [i / 5 * high for i in range(6)]
    return Axis(0.0, high, [(t, f"{t:.0%}" if high == 1.0 else f"{t:.2f}") for t in ticks], title)


def label_axis(labels: Sequence[str], most: int = 5, title: str = "") -> Axis:
    """Positions 0..n-1 named by `labels`, at most `most` of them written."""
    step = max(1, math.ceil(len(labels) / most))
    ticks = [(float(i), labels[i]) for i in range(0, len(labels), step)]
    return Axis(0.0, max(len(labels) - 1, 1), ticks, title)


def line_chart(
    chart_id: str, x: Axis, y: Axis, series: Sequence[Series], *, diagonal: bool = False
) -> str:
    """Lines (and markers) over a grid with both axes, the legend on the right."""
    frame = _Frame(x, y)
    parts = [_grid(frame)]
    if diagonal:
        parts.append(_diagonal(frame))
    parts.extend(_line(frame, s) for s in series)
    parts.append(_legend(frame, [(s.label, s.colour, s.dashed) for s in series]))
    return _svg(chart_id, frame.width, frame.height, "".join(parts))


def _svg(chart_id: str, width: int, height: int, body: str) -> str:
    return (
        f'<svg id="{esc(chart_id)}" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="{esc(FONT)}" font-size="12" fill="{INK}">{body}</svg>'
    )


def _grid(frame: _Frame) -> str:
    parts = []
    for value, label in frame.y.ticks:
        y = frame.sy(value)
        parts.append(
            f'<line x1="{frame.left:.1f}" x2="{frame.right:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{GRID}"/><text x="{frame.left - 6:.1f}" y="{y + 4:.1f}" '
            f'text-anchor="end" fill="{MUTED}">{esc(label)}</text>'
        )
    for value, label in frame.x.ticks:
        x = frame.sx(value)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.bottom:.1f}" y2="{frame.bottom + 4:.1f}" '
            f'stroke="{MUTED}"/><text x="{x:.1f}" y="{frame.bottom + 17:.1f}" '
            f'text-anchor="middle" fill="{MUTED}">{esc(label)}</text>'
        )
    parts.append(
        f'<line x1="{frame.left:.1f}" x2="{frame.right:.1f}" y1="{frame.bottom:.1f}" '
        f'y2="{frame.bottom:.1f}" stroke="{MUTED}"/>'
    )
    parts.append(_axis_titles(frame))
    return "".join(parts)


def _axis_titles(frame: _Frame) -> str:
    middle = (frame.top + frame.bottom) / 2
    return (
        f'<text x="{(frame.left + frame.right) / 2:.1f}" y="{frame.height - 4}" '
        f'text-anchor="middle" fill="{MUTED}">{esc(frame.x.title)}</text>'
        f'<text transform="translate(14 {middle:.1f}) rotate(-90)" text-anchor="middle" '
        f'fill="{MUTED}">{esc(frame.y.title)}</text>'
    )


def _diagonal(frame: _Frame) -> str:
    return (
        f'<line x1="{frame.sx(frame.x.low):.1f}" y1="{frame.sy(frame.y.low):.1f}" '
        f'x2="{frame.sx(frame.x.high):.1f}" y2="{frame.sy(frame.y.high):.1f}" '
        f'stroke="{MUTED}" stroke-dasharray="4 4"><title>perfect calibration</title></line>'
    )


def _line(frame: _Frame, series: Series) -> str:
    if not series.points:
        return ""
    coords = " ".join(f"{frame.sx(x):.1f},{frame.sy(y):.1f}" for x, y in series.points)
    dash = ' stroke-dasharray="6 3"' if series.dashed else ""
    out = (
        f'<polyline points="{coords}" fill="none" stroke="{series.colour}" stroke-width="2"'
        f"{dash}><title>{esc(series.label)}</title></polyline>"
    )
    if series.markers or len(series.points) == 1:
        out += "".join(
            f'<circle cx="{frame.sx(x):.1f}" cy="{frame.sy(y):.1f}" r="3.5" '
            f'fill="{series.colour}"><title>{esc(series.label)}: {y:.3f}</title></circle>'
            for x, y in series.points
        )
    return out


def _legend(frame: _Frame, entries: Sequence[tuple[str, str, bool]]) -> str:
    parts = []
    for i, (label, hue, dashed) in enumerate(entries):
        y = frame.top + 8 + i * 18
        dash = ' stroke-dasharray="6 3"' if dashed else ""
        parts.append(
            f'<line x1="{frame.right + 12:.1f}" x2="{frame.right + 32:.1f}" y1="{y:.1f}" '
            f'y2="{y:.1f}" stroke="{hue}" stroke-width="3"{dash}/>'
            f'<text x="{frame.right + 38:.1f}" y="{y + 4:.1f}">{esc(_clip(label, 32))}'
            f"<title>{esc(label)}</title></text>"
        )
    return "".join(parts)


def _clip(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    text: str  # what is written at the bar's end
    colour: str


def bar_chart(chart_id: str, bars: Sequence[Bar], high: float | None = None) -> str:
    """Horizontal bars, one per row, each labelled on the left and valued on the right."""
    longest = max((len(b.label) for b in bars), default=0)
    row, left = 28, min(max(60, 12 + round(6.5 * longest)), 320)  # room for the longest label
    width = WIDTH - left - 130
    top = max((b.value for b in bars), default=0.0)
    scale = high if high is not None else top
    parts = []
    for i, bar in enumerate(bars):
        y = 8 + i * row
        length = 0.0 if scale <= 0 else bar.value / scale * width
        parts.append(
            f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{esc(bar.label)}</text>'
            f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{row - 8}" rx="2" '
            f'fill="{bar.colour}"><title>{esc(bar.label)}: {esc(bar.text)}</title></rect>'
            f'<text x="{left + length + 6:.1f}" y="{y + 15}" fill="{MUTED}">{esc(bar.text)}</text>'
        )
    return _svg(chart_id, WIDTH, 16 + len(bars) * row, "".join(parts))


@dataclass(frozen=True)
class Span:
    label: str
    start: float  # positions on the x axis
    end: float
    colour: str
    text: str


def timeline(chart_id: str, x: Axis, spans: Sequence[Span]) -> str:
    """One bar per row from its start to its end (model versions in use)."""
    frame = _Frame(x, Axis(0, 1, []), height=MARGIN[0] + MARGIN[2] + 26 * max(1, len(spans)))
    parts = [_grid(frame)]
    for i, span in enumerate(spans):
        x0, x1 = frame.sx(span.start), frame.sx(span.end)
        y = frame.top + i * 26
        parts.append(
            f'<rect x="{x0:.1f}" y="{y + 4:.1f}" width="{max(x1 - x0, 3):.1f}" height="18" '
            f'rx="2" fill="{span.colour}"><title>{esc(span.label)}: {esc(span.text)}</title>'
            f'</rect><text x="{frame.right + 12:.1f}" y="{y + 17:.1f}">'
            f"{esc(_clip(span.label, 32))}<title>{esc(span.label)}</title></text>"
        )
    return _svg(chart_id, frame.width, frame.height, "".join(parts))


def heat(value: float, high: float) -> str:
    """A cell's background: white at 0, the full hue at ±`high` (orange above, blue below)."""
    if high <= 0 or value == 0:
        return "#ffffff"
    share = min(1.0, abs(value) / high) * 0.75
    hue = POSITIVE if value > 0 else NEGATIVE
    r, g, b = (round(255 - (255 - c) * share) for c in hue)
    return f"#{r:02x}{g:02x}{b:02x}"


def heat_ink(value: float, high: float) -> str:
    """Text that stays readable on :func:`heat`'s background."""
    return "#ffffff" if high > 0 and abs(value) / high > 0.75 else INK


Cell = Callable[[str, str], tuple[float, str, str]]  # (row, column) -> (value, text, attributes)


def heat_table(
    table_id: str, corner: str, rows: Sequence[str], columns: Sequence[str], cell: Cell, high: float
) -> str:
    """An HTML table whose cells are shaded by value; `cell` gives each one's value, text and
    extra attributes (already escaped)."""
    head = "".join(f'<th scope="col">{esc(c)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value, text, attributes = cell(row, column)
            style = f"background:{heat(value, high)};color:{heat_ink(value, high)}"
            cells.append(f'<td class="num" style="{style}" {attributes}>{esc(text)}</td>')
        body.append(f'<tr><th scope="row">{esc(row)}</th>{"".join(cells)}</tr>')
    return (
        f'<table id="{esc(table_id)}" class="heat"><thead><tr><th>{esc(corner)}</th>{head}'
        f"</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
