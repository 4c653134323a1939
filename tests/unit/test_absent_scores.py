"""Explicit absence (issue 13): a score that was not computed is null in the change, with the
reason, never a number that reads like a score (every entry used to carry churn_risk 0.0)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.contracts.events import ClickEvent, ClickType, Component, SegmentChange
from stream_app.core.models import SCALED_INPUT_BOUND, WARM_UP_LABELS, SegmentModels
from stream_app.core.processor import MemoryStore, Processor
from stream_app.settings import SegmentationSettings

T0 = datetime(2024, 3, 1, tzinfo=UTC)
S = SegmentationSettings()
SCORED = -1.0  # a real score: some probability, not null
NOT_YET = (
    "not scored yet for this customer: churn risk is scored when the lifecycle stage changes "
    "and at 7 and 30 idle days"
)


def click(customer: str, day: float) -> ClickEvent:
    return ClickEvent(
        event_id=f"{customer}-{day}",
        customer_id=customer,
        event_time=T0 + timedelta(days=day),
        event_type=ClickType.PRODUCT_VIEW,
    )


def changes_of(events: list[ClickEvent], warm: bool) -> list[SegmentChange]:
    models = SegmentModels(S)
    if warm:  # as if both models had learned from enough matured labels
        models.purchase.labels = models.churn.labels = WARM_UP_LABELS
    p = Processor(S, models, MemoryStore())
    out: list[SegmentChange] = []
    for event in events:
        out += p.process(event).changes
    return out


@pytest.mark.parametrize(
    ("warm", "component", "purchase", "churn", "absent"),
    [
        (
            False,
            Component.ENTRY,
            None,
            None,
            {
                "purchase_propensity": "the purchase model is warming up: it has learned from "
                f"0 of the {WARM_UP_LABELS} matured labels it needs",
                "churn_risk": NOT_YET,
            },
        ),
        (True, Component.ENTRY, 0.5, None, {"churn_risk": NOT_YET}),
        (
            False,
            Component.LIFECYCLE,
            None,
            None,
            {
                # Ann's day-0 purchase snapshot matured at day 30, just before her move: 1 label.
                "purchase_propensity": "the purchase model is warming up: it has learned from "
                f"1 of the {WARM_UP_LABELS} matured labels it needs",
                "churn_risk": "the churn model is warming up: it has learned from 0 of the "
                f"{WARM_UP_LABELS} matured labels it needs",
            },
        ),
        (True, Component.LIFECYCLE, SCORED, 0.5, {}),
    ],
)
def test_a_score_not_computed_is_null_with_the_reason(
    warm: bool,
    component: Component,
    purchase: float | None,
    churn: float | None,
    absent: dict[str, str],
) -> None:
    changes = changes_of([click("ann", 0), click("bob", 40)], warm)
    change = next(c for c in changes if c.customer_id == "ann" and c.component is component)
    assert change.schema_version == 2
    if purchase == SCORED:
        assert change.scores.purchase_propensity is not None
        assert 0 < change.scores.purchase_propensity < 1
    else:  # an untrained model says exactly 0.5
        assert change.scores.purchase_propensity == purchase
    assert change.scores.churn_risk == churn
    assert change.scores.absent == absent


def test_a_null_churn_risk_is_not_written_into_the_summary() -> None:
    changes = changes_of([click("ann", 0), click("bob", 40)], warm=False)
    move = next(c for c in changes if c.component is Component.LIFECYCLE)
    assert "churn risk" not in move.reason.summary
    warm = next(
        c
        for c in changes_of([click("ann", 0), click("bob", 40)], warm=True)
        if c.component is Component.LIFECYCLE
    )
    assert warm.reason.summary.endswith("; churn risk 0.50")


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["ann", "bob", "cy"]), st.floats(0, 400)), max_size=40))
def test_no_scaled_input_beyond_ten_std_reaches_a_model_or_an_explanation(
    visits: list[tuple[str, float]],
) -> None:
    """Whatever the events, every input a propensity model scores, and so every value an
    explanation shows, lies within +-10 standard deviations (a silent customer's activity was
    scored at -14 million)."""
    models = SegmentModels(S)
    models.purchase.labels = models.churn.labels = WARM_UP_LABELS
    seen: list[float] = []
    for model in (models.purchase, models.churn):
        assess = model.assess

        def spy(features: dict[str, float], assess: Any = assess) -> Any:
            assessment = assess(features)
            seen.extend(assessment.scaled.values())
            return assessment

        model.assess = spy  # type: ignore[method-assign]
    p = Processor(S, models, MemoryStore())
    for customer, day in sorted(visits, key=lambda v: v[1]):
        for change in p.process(click(customer, day)).changes:
            seen.extend(c.value for c in change.reason.top_contributions)
    p.advance(p.max_event_time + 400 * 86400)
    assert all(abs(value) <= SCALED_INPUT_BOUND for value in seen)
