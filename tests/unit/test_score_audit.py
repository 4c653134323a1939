"""The report's audit of emitted scores, against independent oracles (scikit-learn's AUC, ECE
computed by hand) and against hand-made streams whose outcomes are known."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]

from stream_app.contracts.events import (
    ClickEvent,
    ClickType,
    Component,
    Lifecycle,
    Origin,
    PropensityTier,
    SegmentChange,
    TransactionEvent,
    TransactionType,
)
from stream_app.settings import SegmentationSettings
from stream_app.tools.score_audit import ScoreAudit, expected_calibration_error, roc_auc

T0 = datetime(2011, 1, 1, tzinfo=UTC)


@given(
    st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.booleans()), min_size=2, max_size=200)
)
def test_auc_matches_scikit_learn(pairs: list[tuple[float, bool]]) -> None:
    scores = [round(s, 4) for s, _ in pairs]  # the histogram's resolution
    outcomes = [o for _, o in pairs]
    ours = roc_auc(scores, outcomes)
    if len(set(outcomes)) < 2:
        assert ours is None
    else:
        assert ours == pytest.approx(roc_auc_score(outcomes, scores), abs=1e-4)


def test_expected_calibration_error_by_hand() -> None:
    # Bin 0.1-0.2: scores 0.1, 0.1 (mean 0.1), outcomes 1 of 2 (0.5): gap 0.4, weight 2/5.
    # Bin 0.9-1.0: scores 0.9, 0.95, 0.95 (mean 0.9333), all bought: gap 0.0667, weight 3/5.
    result = expected_calibration_error(
        [0.1, 0.1, 0.9, 0.95, 0.95], [True, False, True] * 1 + [True, True]
    )
    assert result["ece"] == pytest.approx(0.4 * 2 / 5 + (1 - 2.8 / 3) * 3 / 5, abs=1e-4)
    assert [row["count"] for row in result["reliability"]] == [2, 3]


def test_a_perfectly_calibrated_score_has_no_error() -> None:
    rng = Random(3)
    scores = [rng.random() for _ in range(20_000)]
    outcomes = [rng.random() < s for s in scores]
    assert expected_calibration_error(scores, outcomes)["ece"] < 0.02


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


def view(customer: str, day: float) -> ClickEvent:
    return ClickEvent(
        event_id=f"v-{customer}-{day}",
        customer_id=customer,
        event_time=T0 + timedelta(days=day),
        event_type=ClickType.PRODUCT_VIEW,
    )


def tier_change(
    customer: str, day: float, before: str, after: str, score: float, trigger: str = "purchase"
) -> SegmentChange:
    def segment(tier: str) -> dict[str, object]:
        return {
            "cluster": 0,
            "cluster_profile": "p",
            "propensity_tier": PropensityTier(tier),
            "lifecycle": Lifecycle.ACTIVE,
        }

    return SegmentChange.model_validate(
        {
            "change_id": f"{abs(hash((customer, day))):032x}"[:32],
            "customer_id": customer,
            "sequence": 2,
            "component": Component.PROPENSITY,
            "previous": segment(before),
            "current": segment(after),
            "scores": {"purchase_propensity": score, "churn_risk": None, "absent": {}},
            "reason": {
                "trigger_event_id": "x",
                "trigger_event_type": trigger,
                "summary": "s",
                "top_contributions": [],
            },
            "model_version": "m",
            "segment_definition_version": "s",
            "event_time": T0 + timedelta(days=day),
            "processed_at": T0 + timedelta(days=day),
            "origin": Origin.REPLAY,
        }
    )


def test_buy_rate_by_tier_and_swings_from_a_known_stream() -> None:
    audit = ScoreAudit(SegmentationSettings())
    # ann enters high at day 1 and buys at day 10 (inside 30 days); bob enters low at day 1 and
    # buys at day 40 (outside); cy enters high at day 50, too late to judge (stream ends at 60).
    for event in [purchase("ann", 0), purchase("bob", 0), purchase("ann", 10), purchase("bob", 40)]:
        audit.event(event)
    audit.event(view("cy", 60))
    audit.change(tier_change("ann", 1, "low", "high", 0.8))
    audit.change(tier_change("bob", 1, "medium", "low", 0.1, trigger="time_passed"))
    audit.change(tier_change("cy", 50, "low", "high", 0.9))
    # dan: low -> high -> low within 14 days is one swing out of two tier changes.
    audit.change(tier_change("dan", 2, "low", "high", 0.7))
    audit.change(tier_change("dan", 9, "high", "low", 0.2))
    report = audit.report()
    assert report["buy_rate_by_tier_entered"]["high"] == {
        "entered": 2,
        "bought_within_horizon": 0.5,
    }
    assert report["buy_rate_by_tier_entered"]["low"] == {"entered": 2, "bought_within_horizon": 0.0}
    assert report["swing_rate"] == pytest.approx(1 / 5)
    emitted = report["purchase_scores_emitted"]
    assert (emitted["all"]["emitted"], emitted["all"]["judged"]) == (5, 4)  # cy: not yet
    assert (emitted["time"]["emitted"], emitted["event"]["emitted"]) == (1, 4)
    assert emitted["all"]["positive_rate"] == 0.25  # only ann bought within 30 days
    assert emitted["all"]["auc"] == 1.0  # ann's 0.8 outranks every non-buyer
