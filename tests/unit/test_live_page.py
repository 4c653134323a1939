"""The worker's live page, from hand-made customer states: sizes by hand, names escaped, nothing
to load."""

from __future__ import annotations

from html.parser import HTMLParser

import orjson

from stream_app.contracts.events import Lifecycle, PropensityTier
from stream_app.core.features import Behaviour
from stream_app.core.segmentation import Membership
from stream_app.core.state import CustomerState
from stream_app.live.pages import LiveFigures, render_live_page, segment_sizes

HOSTILE = "<script>alert(1)</script>"


def state(
    customer: str, cluster: int | None, tier: str = "low", stage: str = "new"
) -> CustomerState:
    membership = None
    if cluster is not None:
        membership = Membership(cluster, 0.0, PropensityTier(tier), Lifecycle(stage))
        membership.cluster_name = HOSTILE if cluster == 10 else f"name {cluster}"
    return CustomerState(customer, Behaviour(first_seen=0.0, last_event_at=0.0), membership)


STATES = [
    state("a", 10, "high", "active"),
    state("b", 2, "low", "new"),
    state("c", 2, "high", "at_risk"),
    state("d", None),  # seen, no segment yet: not counted
]


def test_sizes_count_each_customer_in_their_current_segment() -> None:
    customers, sizes = segment_sizes(STATES)
    assert customers == 3
    assert sizes == {
        "cluster": {"c2": 2, "c10": 1},  # by number, not as text
        "tier": {"low": 1, "high": 2},
        "lifecycle": {"new": 1, "active": 1, "at_risk": 1},
    }


class _Values(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[dict[str, str | None]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.append(dict(attrs))


def test_the_page_shows_the_figures_and_escapes_names() -> None:
    customers, sizes = segment_sizes(STATES)
    figures = LiveFigures(
        customers=customers,
        sizes=sizes,
        cluster_names={"c10": HOSTILE, "c2": "name 2"},
        quality={
            "purchase": {
                "labels": 250,
                "positive_rate": 0.3,
                "roc_auc": 0.71,
                "log_loss": 0.5,
                "ece": 0.04,
            },
            "churn": {
                "labels": 0,
                "positive_rate": None,
                "roc_auc": None,
                "log_loss": None,
                "ece": None,
            },
        },
        model_version='v"><img src=x>',
        events=1234,
        partitions=[0, 1],
    )
    page = render_live_page(figures)
    assert HOSTILE not in page and "<img" not in page
    parser = _Values()
    parser.feed(page)
    assert not parser.tags & {"script", "img", "link"}
    values = {
        (a.get("id") or "", a.get("data-dimension") or a.get("data-model") or "",
         a.get("data-segment") or a.get("data-figure") or ""): orjson.loads(a["data-value"] or "")
        for a in parser.attrs
        if "data-value" in a
    }  # fmt: skip
    assert values[("live-customers", "", "")] == 3
    assert values[("live-events", "", "")] == 1234
    assert values[("live-auc-purchase", "", "")] == 0.71
    assert values[("live-auc-churn", "", "")] is None
    assert values[("", "tier", "high")] == 2
    assert values[("", "cluster", "c10")] == 1
    assert values[("", "purchase", "labels")] == 250
    assert "default-src 'none'" in page
