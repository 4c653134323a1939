"""The segment report's figures, on hand-made streams whose figures are worked out by hand, and
against independent oracles (a customer's newest change, scikit-learn's AUC)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from conftest import segment_change
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]

from stream_app.contracts.events import (
    ClickEvent,
    ClickType,
    Event,
    SegmentChange,
    TransactionEvent,
    TransactionType,
    encode,
)
from stream_app.errors import UserError
from stream_app.settings import SegmentationSettings
from stream_app.tools.report import (
    DIMENSIONS,
    TierBuyRate,
    build_figures,
    change_log,
    cluster_profiles,
    lifecycle_funnel,
    model_versions,
    read_replay_report,
    segment_value,
    sizes_by_day,
    transitions,
)

T0 = datetime(2011, 1, 1, tzinfo=UTC)


def seg(cluster: int, tier: str, stage: str, name: str = "p") -> dict[str, Any]:
    return {
        "cluster": cluster,
        "cluster_profile": name,
        "propensity_tier": tier,
        "lifecycle": stage,
    }


def change(
    customer: str,
    sequence: int,
    hours: float,
    current: dict[str, Any],
    previous: dict[str, Any] | None = None,
    *,
    component: str | None = None,
    purchase: float | None = None,
    churn: float | None = None,
    version: str = "m1",
) -> SegmentChange:
    return segment_change(
        customer,
        sequence,
        T0 + timedelta(hours=hours),
        current,
        previous,
        change_id=f"{customer}-{sequence}",
        component=component or ("entry" if previous is None else "lifecycle"),
        purchase=purchase,
        churn=churn,
        version=version,
        origin="replay",
    )


# ann: joins day 0 as c0/unscored/new, goes active on day 2 and at_risk on day 3.
# bob: joins day 1 as c1/low/new, moves to cluster c0 on day 1 (same day) and to high on day 3.
ANN = [
    change("ann", 1, 1, seg(0, "unscored", "new")),
    change("ann", 2, 49, seg(0, "unscored", "active"), seg(0, "unscored", "new")),
    change("ann", 3, 73, seg(0, "unscored", "at_risk"), seg(0, "unscored", "active")),
]
BOB = [
    change("bob", 1, 25, seg(1, "low", "new", "big baskets")),
    change(
        "bob", 2, 30, seg(0, "low", "new", "frequent"), seg(1, "low", "new"), component="cluster"
    ),
    change(
        "bob",
        3,
        80,
        seg(0, "high", "new"),
        seg(0, "low", "new"),
        component="propensity",
        version="m2",
    ),
]


def test_sizes_are_each_customers_segment_at_the_end_of_each_day() -> None:
    # Shuffled and with a redelivered change: the log sorts by event time, drops the repeat.
    log = change_log([BOB[2], *ANN, BOB[0], BOB[1], BOB[1]])
    assert log.duplicates_dropped == 1
    sizes = sizes_by_day(log.changes)
    assert sizes.days == [date(2011, 1, 1), date(2011, 1, 2), date(2011, 1, 3), date(2011, 1, 4)]
    assert sizes.customers == [1, 2, 2, 2]
    assert sizes.sizes["cluster"] == {"c0": [1, 2, 2, 2], "c1": [0, 0, 0, 0]}
    assert sizes.sizes["tier"] == {
        "unscored": [1, 1, 1, 1],
        "low": [0, 1, 1, 0],
        "high": [0, 0, 0, 1],
    }
    assert sizes.sizes["lifecycle"] == {
        "new": [1, 2, 1, 1],
        "active": [0, 0, 1, 0],
        "at_risk": [0, 0, 0, 1],
    }
    assert sizes.final("tier") == {"unscored": 1, "low": 0, "high": 1}


def test_a_day_without_changes_repeats_the_day_before() -> None:
    quiet = [
        ANN[0],
        change("ann", 2, 24 * 5, seg(0, "unscored", "active"), seg(0, "unscored", "new")),
    ]
    sizes = sizes_by_day(change_log(quiet).changes)
    assert len(sizes.days) == 6
    assert sizes.sizes["lifecycle"] == {"new": [1, 1, 1, 1, 1, 0], "active": [0, 0, 0, 0, 0, 1]}


def test_a_lower_sequence_never_undoes_a_higher_one_whatever_its_time() -> None:
    # The newest change is the highest sequence, as for compare and a subscriber, even where
    # event times disagree with it.
    first = change("cy", 1, 6, seg(2, "low", "new"))
    second = change("cy", 2, 5, seg(3, "low", "new"), seg(2, "low", "new"), component="cluster")
    log = change_log([first, second])
    assert sizes_by_day(log.changes).final("cluster") == {"c3": 1}


segments = st.builds(
    seg,
    st.integers(0, 3),
    st.sampled_from(["unscored", "low", "medium", "high"]),
    st.sampled_from(["new", "active", "at_risk", "lapsed", "reactivated"]),
)


@st.composite
def streams(draw: st.DrawFn) -> list[SegmentChange]:
    """A few customers, each with 1-6 changes at increasing hours over ~10 days."""
    out = []
    for customer in draw(st.lists(st.sampled_from("abcdefgh"), min_size=1, unique=True)):
        hours = sorted(draw(st.lists(st.floats(0, 240), min_size=1, max_size=6)))
        previous = None
        for sequence, hour in enumerate(hours, start=1):
            current = draw(segments)
            out.append(change(customer, sequence, hour, current, previous))
            previous = current
    return draw(st.permutations(out))


@settings(max_examples=60, deadline=None)
@given(streams())
def test_sizes_always_sum_to_the_customers_seen(stream: list[SegmentChange]) -> None:
    log = change_log(stream)
    sizes = sizes_by_day(log.changes)
    for i, day in enumerate(sizes.days):
        seen = {c.customer_id for c in stream if c.event_time.date() <= day}
        assert sizes.customers[i] == len(seen)
        for dimension in DIMENSIONS:
            assert sum(series[i] for series in sizes.sizes[dimension].values()) == len(seen)
    newest: dict[str, SegmentChange] = {}
    for c in stream:  # the oracle: each customer's highest sequence
        if c.customer_id not in newest or c.sequence > newest[c.customer_id].sequence:
            newest[c.customer_id] = c
    for dimension in DIMENSIONS:
        expected = Counter(segment_value(c.current, dimension) for c in newest.values())
        assert {k: v for k, v in sizes.final(dimension).items() if v} == dict(expected)


@settings(max_examples=60, deadline=None)
@given(streams())
def test_flows_count_every_change_of_their_component(stream: list[SegmentChange]) -> None:
    flows = transitions(stream)
    non_entries = sum(1 for c in stream if c.previous is not None)
    assert flows["lifecycle"].total == non_entries  # the stream's changes are all lifecycle
    assert flows["cluster"].total == flows["tier"].total == 0


def test_flows_between_segments_by_component() -> None:
    flows = transitions([*ANN, *BOB])
    assert flows["lifecycle"].counts == {("active", "at_risk"): 1, ("new", "active"): 1}
    assert flows["lifecycle"].labels == ["new", "active", "at_risk"]
    assert flows["cluster"].counts == {("c1", "c0"): 1}
    assert flows["cluster"].labels == ["c0", "c1"]
    assert flows["tier"].counts == {("low", "high"): 1}


def test_lifecycle_funnel_counts_customers_who_ever_reached_a_stage() -> None:
    assert lifecycle_funnel([*ANN, *BOB]) == {
        "new": 2,
        "active": 1,
        "at_risk": 1,
        "lapsed": 0,
        "reactivated": 0,
    }


def test_model_versions_over_time() -> None:
    spans = model_versions([*BOB, *ANN])
    assert [(s.version, s.changes, s.customers) for s in spans] == [("m1", 5, 2), ("m2", 1, 1)]
    assert spans[0].first_event == T0 + timedelta(hours=1)
    assert spans[0].last_event == T0 + timedelta(hours=73)
    assert spans[1].first_event == spans[1].last_event == T0 + timedelta(hours=80)


def test_cluster_profiles_take_names_from_changes_and_centres_from_the_replay_report() -> None:
    log = change_log([*ANN, *BOB])
    final = sizes_by_day(log.changes).final("cluster")
    without = cluster_profiles(log.changes, final)
    assert [(p.cluster, p.name, p.members, p.centre) for p in without] == [
        (0, "p", 2, None),  # ann's newest change (hour 73) names c0 "p", after bob's "frequent"
        (1, "big baskets", 0, None),
    ]
    report = {
        "clusters": [
            {"id": 0, "profile": "frequent buyers", "centre": {"order_count": 1.5, "spend": 0.2}},
            {"id": 2, "profile": "quiet", "centre": {"order_count": -0.5, "spend": -1}},
        ]
    }
    profiles = cluster_profiles(log.changes, final, report)
    assert [(p.cluster, p.name, p.members) for p in profiles] == [
        (0, "frequent buyers", 2),
        (1, "big baskets", 0),
        (2, "quiet", 0),
    ]
    assert profiles[2].centre == {"order_count": -0.5, "spend": -1}
    assert profiles[1].centre is None


@pytest.mark.parametrize(
    "raw",
    [b"[1]", b"{", b'{"clusters": [{"id": 0, "profile": "p", "centre": {"x": "1"}}]}', b"{}"],
)
def test_a_file_that_is_not_a_replay_report_is_refused(raw: bytes) -> None:
    with pytest.raises(UserError, match=r"r\.json|replay report"):
        read_replay_report(raw, "r.json")


def test_a_line_that_is_not_a_change_is_refused_with_the_field() -> None:
    good = encode(ANN[0])
    bad = orjson.dumps({**orjson.loads(good), "sequence": 0})
    with pytest.raises(UserError, match=r"^line 3: not a segment change: sequence"):
        change_log([good, b"\n", bad])
    assert change_log([good, b"  \n"]).changes == [ANN[0]]


def purchase(customer: str, day: float) -> TransactionEvent:
    return TransactionEvent(
        event_id=f"{customer}-{day}",
        customer_id=customer,
        event_time=T0 + timedelta(days=day),
        event_type=TransactionType.PURCHASE,
        order_id=f"o-{customer}-{day}",
        amount=Decimal("10.00"),
        currency="GBP",
    )


def scored(customer: str, sequence: int, day: float, score: float, tier: str) -> SegmentChange:
    before = seg(0, "low" if tier != "low" else "medium", "active")
    return change(
        customer,
        sequence,
        day * 24,
        seg(0, tier, "active"),
        before,
        component="propensity",
        purchase=score,
    )


def test_score_quality_per_month_judged_by_what_happened_next() -> None:
    # January (days 0-30): ann 0.9 buys on day 10, bob 0.2 does not, cy 0.6 buys on day 20,
    # dan 0.7 does not. February (day 35): ann 0.8 does not buy again, bob 0.3 buys on day 50.
    # Day 80 (March) is past the stream's end minus 30 days: emitted, not judged.
    changes = [
        scored("ann", 2, 1, 0.9, "high"),
        scored("bob", 2, 1, 0.2, "low"),
        scored("cy", 2, 2, 0.6, "medium"),
        scored("dan", 2, 3, 0.7, "high"),
        scored("ann", 3, 35, 0.8, "high"),
        scored("bob", 3, 35, 0.3, "low"),
        scored("cy", 3, 80, 0.5, "medium"),
    ]
    events: list[Event] = [purchase("ann", 10), purchase("cy", 20), purchase("bob", 50)]
    events.append(ClickEvent(event_id="end", customer_id="ed", event_time=T0 + timedelta(days=90),
                             event_type=ClickType.PAGE_VIEW))  # fmt: skip
    figures = build_figures(change_log(changes), SegmentationSettings(), events=events)
    assert figures.outcomes is not None
    quality = figures.outcomes.quality["purchase_propensity"]
    assert quality.judged == 6
    assert quality.positive_rate == 0.5
    oracle = roc_auc_score([1, 0, 1, 0, 0, 1], [0.9, 0.2, 0.6, 0.7, 0.8, 0.3])
    assert quality.auc == pytest.approx(oracle, abs=1e-4)
    january, february = quality.periods
    assert (january.period, january.judged, january.positive_rate) == ("2011-01", 4, 0.5)
    assert january.mean_score == pytest.approx((0.9 + 0.2 + 0.6 + 0.7) / 4)
    assert january.auc == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.7]))
    assert (february.period, february.judged, february.auc) == ("2011-02", 2, 0.0)
    # ECE of February by hand: bins 0.8-0.9 (0.8, not bought) and 0.3-0.4 (0.3, bought).
    assert february.ece == pytest.approx(0.5 * 0.8 + 0.5 * 0.7, abs=1e-4)
    # Entered high: ann (day 1, bought), dan (no), ann (day 35, no); low: bob twice (day 1 no,
    # day 35 yes); medium: cy day 2 (yes), cy day 80 too late to judge.
    assert figures.outcomes.buy_rates == [
        TierBuyRate("low", 2, 0.5),
        TierBuyRate("medium", 1, 1.0),
        TierBuyRate("high", 3, 0.3333),
    ]
    assert figures.outcomes.quality["churn_risk"].judged == 0
    assert figures.outcomes.quality["churn_risk"].auc is None


def test_without_events_there_are_no_outcomes_but_every_other_figure() -> None:
    figures = build_figures(change_log([*ANN, *BOB]), SegmentationSettings())
    assert figures.outcomes is None
    assert figures.summary.customers == 2
    assert figures.summary.changes == 6
    assert figures.summary.changes_by_component == {
        "entry": 2,
        "cluster": 1,
        "propensity": 1,
        "lifecycle": 2,
    }
    assert figures.summary.first_event == T0 + timedelta(hours=1)
    assert figures.summary.last_event == T0 + timedelta(hours=80)
