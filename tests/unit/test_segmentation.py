"""Tests for stream_app.core.segmentation: lifecycle stages and their due times, tier hysteresis,
the tier dwell, the cluster-move rule and Membership serialisation. With the default
SegmentationSettings (new 30 d, at risk after 30 d, lapsed after 90 d, reactivated for 30 d; tiers
held 7 d; cluster moves need 2 confirmations and 24 h of dwell), except the hysteresis tables,
which use tiers high 0.60/0.50, medium 0.30/0.20 (TIER_S; the defaults are 0.65/0.55, 0.30/0.20).
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.contracts.events import Lifecycle, PropensityTier
from stream_app.core.features import DAY, HOUR, Behaviour
from stream_app.core.segmentation import (
    Membership,
    cluster_move,
    earliest_after,
    lifecycle_due,
    lifecycle_stage,
    next_tier,
    tier_dwelt,
)
from stream_app.settings import SegmentationSettings

T0 = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
S = SegmentationSettings()
TIER_S = SegmentationSettings(
    high_enter=0.60, high_leave=0.50, medium_enter=0.30, medium_leave=0.20
)
NEW, ACTIVE, AT_RISK, LAPSED, REACTIVATED = (
    Lifecycle.NEW,
    Lifecycle.ACTIVE,
    Lifecycle.AT_RISK,
    Lifecycle.LAPSED,
    Lifecycle.REACTIVATED,
)
UNSCORED, LOW, MEDIUM, HIGH = (
    PropensityTier.UNSCORED,
    PropensityTier.LOW,
    PropensityTier.MEDIUM,
    PropensityTier.HIGH,
)


def day(n: float) -> float:
    return T0 + n * DAY


def behaviour(first: float, last: float, orders: int = 0) -> Behaviour:
    return Behaviour(first_seen=day(first), last_event_at=day(last), order_count=orders)


# --- lifecycle_stage ------------------------------------------------------------------------------

SECOND = 1 / 86400  # in days
STAGES: list[tuple[str, float, float, int, float | None, float, Lifecycle]] = [
    # (case, first seen, last event, orders, reactivated at, now, expected) - days from T0
    ("brand new", 0, 0, 0, None, 0, NEW),
    ("new until just before 30 days", 0, 20, 0, None, 30 - SECOND, NEW),
    ("active once 30 days of tenure pass", 0, 20, 0, None, 30, ACTIVE),
    ("one order is still new", 0, 0, 1, None, 1, NEW),
    ("two orders make an active customer", 0, 0, 2, None, 1, ACTIVE),
    ("not at risk one second before 30 idle days", 0, 0, 0, None, 30 - SECOND, NEW),
    ("at risk at exactly 30 idle days", 0, 0, 0, None, 30, AT_RISK),
    ("at risk before 90 idle days", 0, 10, 2, None, 100 - SECOND, AT_RISK),
    ("lapsed at exactly 90 idle days", 0, 10, 2, None, 100, LAPSED),
    ("lapsed stays lapsed", 0, 10, 2, None, 900, LAPSED),
    ("reactivated on return", 0, 100, 3, 100, 100, REACTIVATED),
    ("reactivated beats new", 0, 10, 0, 10, 15, REACTIVATED),
    ("reactivated until just before 30 days", 0, 125, 3, 100, 130 - SECOND, REACTIVATED),
    ("active when the reactivation window ends", 0, 125, 3, 100, 130, ACTIVE),
    ("idle at risk wins over reactivated", 0, 100, 3, 100, 130, AT_RISK),
]


@pytest.mark.parametrize(
    ("first", "last", "orders", "reactivated", "now", "expected"),
    [case[1:] for case in STAGES],
    ids=[case[0] for case in STAGES],
)
def test_lifecycle_stage(
    first: float,
    last: float,
    orders: int,
    reactivated: float | None,
    now: float,
    expected: Lifecycle,
) -> None:
    b = behaviour(first, last, orders)
    reactivated_at = None if reactivated is None else day(reactivated)
    assert lifecycle_stage(b, day(now), reactivated_at, S) is expected


def test_lifecycle_thresholds_follow_the_settings() -> None:
    short = SegmentationSettings(at_risk_after_days=7, lapsed_after_days=14)
    b = behaviour(0, 0, 2)
    assert lifecycle_stage(b, day(7), None, short) is AT_RISK
    assert lifecycle_stage(b, day(14), None, short) is LAPSED
    assert lifecycle_stage(b, day(7), None, S) is ACTIVE


# --- lifecycle_due --------------------------------------------------------------------------------

DUES: list[tuple[str, float, float, int, float | None, float, float | None]] = [
    ("new customer: 30 days", 0, 0, 0, None, 0, 30),
    ("at the boundary itself, the next one", 0, 0, 0, None, 30, 90),
    ("nothing left after lapsing", 0, 0, 0, None, 90, None),
    ("active: at risk 30 days after the last event", 0, 40, 3, None, 40, 70),
    ("at risk: lapsed 90 days after the last event", 0, 40, 3, None, 75, 130),
    ("the end of the new window is a boundary", 0, 10, 2, None, 10, 30),
    ("the end of the reactivation window", 0, 110, 3, 100, 110, 130),
    ("reactivation over: back to idle boundaries", 0, 140, 3, 100, 140, 170),
]


@pytest.mark.parametrize(
    ("first", "last", "orders", "reactivated", "now", "due"),
    [case[1:] for case in DUES],
    ids=[case[0] for case in DUES],
)
def test_lifecycle_due_is_the_next_boundary(
    first: float,
    last: float,
    orders: int,
    reactivated: float | None,
    now: float,
    due: float | None,
) -> None:
    b = behaviour(first, last, orders)
    reactivated_at = None if reactivated is None else day(reactivated)
    assert lifecycle_due(b, day(now), reactivated_at, S) == (None if due is None else day(due))


@st.composite
def lifecycle_cases(draw: st.DrawFn) -> tuple[Behaviour, float | None, float]:
    minutes = st.integers(0, 200 * 24 * 60)
    first = T0 + draw(minutes) * 60.0
    last = first + draw(minutes) * 60.0
    b = Behaviour(first_seen=first, last_event_at=last, order_count=draw(st.integers(0, 3)))
    reactivated = draw(st.none() | st.floats(first, last))
    now = last + draw(minutes) * 60.0
    return b, reactivated, now


@settings(max_examples=300)
@given(lifecycle_cases())
def test_stage_holds_from_now_until_the_due_time(
    case: tuple[Behaviour, float | None, float],
) -> None:
    b, reactivated_at, now = case
    stage = lifecycle_stage(b, now, reactivated_at, S)
    due = lifecycle_due(b, now, reactivated_at, S)
    if due is None:
        assert lifecycle_stage(b, now + 1000 * DAY, reactivated_at, S) is stage
        return
    assert due > now
    for t in (now + (due - now) / 2, due - 1.0):
        assert lifecycle_stage(b, max(t, now), reactivated_at, S) is stage
    later = lifecycle_due(b, due, reactivated_at, S)
    assert later is None or later > due


# --- next_tier ------------------------------------------------------------------------------------

TIERS: list[tuple[PropensityTier, float, bool, PropensityTier]] = [
    (LOW, 0.9, False, UNSCORED),
    (HIGH, 0.9, False, UNSCORED),
    (UNSCORED, 0.9, False, UNSCORED),
    (UNSCORED, 0.60, True, HIGH),
    (UNSCORED, 0.59, True, MEDIUM),
    (UNSCORED, 0.30, True, MEDIUM),
    (UNSCORED, 0.29, True, LOW),
    (LOW, 0.60, True, HIGH),
    (LOW, 0.59, True, MEDIUM),
    (LOW, 0.30, True, MEDIUM),
    (LOW, 0.29, True, LOW),
    (LOW, 0.25, True, LOW),  # inside the medium band: not enough to enter
    (MEDIUM, 0.60, True, HIGH),
    (MEDIUM, 0.59, True, MEDIUM),
    (MEDIUM, 0.55, True, MEDIUM),  # inside the high band: not enough to enter
    (MEDIUM, 0.25, True, MEDIUM),  # below medium_enter but not below medium_leave: stays
    (MEDIUM, 0.20, True, MEDIUM),
    (MEDIUM, 0.19, True, LOW),
    (HIGH, 1.00, True, HIGH),
    (HIGH, 0.55, True, HIGH),  # below high_enter but not below high_leave: stays
    (HIGH, 0.50, True, HIGH),
    (HIGH, 0.49, True, MEDIUM),
    (HIGH, 0.20, True, MEDIUM),
    (HIGH, 0.19, True, LOW),
    (HIGH, 0.00, True, LOW),
]


@pytest.mark.parametrize(("current", "propensity", "scored", "expected"), TIERS)
def test_next_tier_hysteresis(
    current: PropensityTier, propensity: float, scored: bool, expected: PropensityTier
) -> None:
    assert next_tier(current, propensity, scored, TIER_S) is expected


def test_hysteresis_keeps_an_oscillating_score_in_its_tier() -> None:
    tier = UNSCORED
    history = []
    for p in [0.62, 0.52, 0.58, 0.51, 0.59, 0.50, 0.49, 0.58, 0.25, 0.21, 0.28, 0.19, 0.29]:
        tier = next_tier(tier, p, True, TIER_S)
        history.append(tier)
    assert history == [HIGH] * 6 + [MEDIUM] * 5 + [LOW] * 2


tiers = st.sampled_from([UNSCORED, LOW, MEDIUM, HIGH])
probabilities = st.floats(0.0, 1.0)
ORDER = {LOW: 0, MEDIUM: 1, HIGH: 2}


@given(tiers, probabilities)
def test_next_tier_is_a_fixed_point_for_a_steady_score(current: PropensityTier, p: float) -> None:
    tier = next_tier(current, p, True, S)
    assert tier is not UNSCORED
    assert next_tier(tier, p, True, S) is tier


@given(tiers, probabilities, probabilities)
def test_a_higher_score_never_gives_a_lower_tier(
    current: PropensityTier, p: float, q: float
) -> None:
    low, high = sorted((p, q))
    assert ORDER[next_tier(current, low, True, S)] <= ORDER[next_tier(current, high, True, S)]


# --- cluster_move ---------------------------------------------------------------------------------


def membership(cluster: int = 0) -> Membership:
    return Membership(cluster=cluster, cluster_since=T0, tier=LOW, stage=ACTIVE)


MOVES: list[tuple[str, dict[str, float], list[tuple[int, float]], str]] = [
    # (case, settings, [(predicted cluster, hours after joining)], results: "M" move, "." stay)
    ("same cluster never moves", {}, [(0, 25), (0, 26)], ".."),
    ("two confirmations after the dwell", {}, [(1, 25), (1, 26)], ".M"),
    ("dwell not yet reached", {}, [(1, 1), (1, 2)], ".."),
    ("confirmed early, moves at the dwell", {}, [(1, 1), (1, 2), (1, 24)], "..M"),
    ("dwell one second short", {}, [(1, 1), (1, 24 - 1 / 3600)], ".."),
    ("another candidate resets the count", {}, [(1, 25), (2, 26), (1, 27), (1, 28)], "...M"),
    ("the current cluster resets the count", {}, [(1, 25), (0, 26), (1, 27), (1, 28)], "...M"),
    ("three confirmations", {"cluster_confirmations": 3}, [(1, 25), (1, 26), (1, 27)], "..M"),
    (
        "no dwell and one confirmation",
        {"cluster_confirmations": 1, "cluster_min_dwell_hours": 0},
        [(1, 0)],
        "M",
    ),
]


@pytest.mark.parametrize(
    ("knobs", "predictions", "expected"),
    [case[1:] for case in MOVES],
    ids=[case[0] for case in MOVES],
)
def test_cluster_move(
    knobs: dict[str, float], predictions: list[tuple[int, float]], expected: str
) -> None:
    s = SegmentationSettings(**knobs)
    m = membership()
    results = [cluster_move(m, cid, T0 + hours * HOUR, s) for cid, hours in predictions]
    assert "".join("M" if moved else "." for moved in results) == expected
    assert m.cluster == 0  # recording a prediction never moves the customer itself


def test_cluster_move_tracks_the_candidate() -> None:
    m = membership()
    cluster_move(m, 3, T0 + HOUR, S)
    assert (m.candidate, m.candidate_hits) == (3, 1)
    cluster_move(m, 3, T0 + 2 * HOUR, S)
    assert (m.candidate, m.candidate_hits) == (3, 2)
    cluster_move(m, 4, T0 + 3 * HOUR, S)
    assert (m.candidate, m.candidate_hits) == (4, 1)
    cluster_move(m, 0, T0 + 4 * HOUR, S)
    assert (m.candidate, m.candidate_hits) == (-1, 0)


# --- Membership -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m",
    [
        Membership(2, T0, HIGH, REACTIVATED, candidate=5, candidate_hits=1, reactivated_at=T0 + 1),
        Membership(0, T0 + 0.5, UNSCORED, NEW),
    ],
    ids=["full", "defaults"],
)
def test_membership_round_trips(m: Membership) -> None:
    assert Membership.from_record(orjson.loads(orjson.dumps(m.to_record()))) == m
    assert Membership.from_list(m.to_list()) == m
    assert Membership.from_list(orjson.loads(orjson.dumps(m.to_list()))) == m


def test_membership_record_keeps_tier_since_and_reads_records_without_it() -> None:
    m = Membership(1, T0, HIGH, ACTIVE, tier_since=T0 + 86400.0)
    record = orjson.loads(orjson.dumps(m.to_record()))
    assert record["tier_since"] == T0 + 86400.0
    assert Membership.from_record(record) == m
    del record["tier_since"]  # written before the tier dwell existed
    assert Membership.from_record(record).tier_since is None


DAY_S = 86400.0
# (tier, tier changed this many days ago (None: not recorded), may it change now?)
DWELL: list[tuple[PropensityTier, float | None, bool]] = [
    (UNSCORED, 0.0, True),  # leaving `unscored` is never held back
    (HIGH, None, True),  # a record from before the dwell: not held
    (HIGH, 0.0, False),
    (HIGH, 6.99, False),
    (HIGH, 7.0, True),
    (LOW, 3.0, False),
    (MEDIUM, 30.0, True),
]


@pytest.mark.parametrize(("tier", "ago", "may_change"), DWELL)
def test_a_tier_is_held_for_the_dwell_time(
    tier: PropensityTier, ago: float | None, may_change: bool
) -> None:
    now = T0 + 100 * DAY_S
    m = Membership(0, T0, tier, ACTIVE, tier_since=None if ago is None else now - ago * DAY_S)
    assert S.tier_min_dwell_days == 7.0
    assert tier_dwelt(m, now, S) is may_change
    assert tier_dwelt(m, now, SegmentationSettings(tier_min_dwell_days=0)) is True


@given(
    st.integers(0, 31),
    st.floats(T0, T0 + 1e9),
    tiers,
    st.sampled_from(list(Lifecycle)),
    st.integers(-1, 31),
    st.integers(0, 100),
    st.none() | st.floats(T0, T0 + 1e9),
)
def test_membership_round_trips_through_json(
    cluster: int,
    since: float,
    tier: PropensityTier,
    stage: Lifecycle,
    candidate: int,
    hits: int,
    reactivated: float | None,
) -> None:
    m = Membership(cluster, since, tier, stage, candidate, hits, reactivated)
    restored = Membership.from_list(orjson.loads(orjson.dumps(m.to_list())))
    assert restored == m
    assert restored.tier is tier
    assert restored.stage is stage


@pytest.mark.parametrize(
    ("now", "times", "earliest"),
    [
        (10.0, (12.0, 11.0, 30.0), 11.0),
        (10.0, (None, 15.0, None), 15.0),
        (10.0, (10.0, 5.0, 20.0), 20.0),  # not strictly after `now`: ignored
        (10.0, (9.0, 10.0), None),
        (10.0, (None, None), None),
        (10.0, (), None),
        (-5.0, (0.0, -1.0), -1.0),
    ],
)
def test_earliest_after(
    now: float, times: tuple[float | None, ...], earliest: float | None
) -> None:
    assert earliest_after(now, times) == earliest
