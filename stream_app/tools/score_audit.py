"""What a marketer would see, checked against what happened next in the stream itself.

The models' own quality figures cover only the moments they learn from. This audit takes every
score a replay *emitted* in a segment change and, once its horizon has passed in the data,
asks whether the customer did buy (purchase propensity) or went silent (churn risk), so the
report can say how well the scores people act on rank and how calibrated they are, split by
what triggered them (an event, or time passing), and what share of customers who entered each
tier bought.

Outcomes come from the replayed events: a purchase inside ``(t, t + horizon]`` for the purchase
score at ``t``; no activity (any event but a refund) inside ``(t, t + horizon]`` for churn. A
score counts only once its horizon ends before the stream does.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from stream_app.contracts.events import (
    Component,
    Event,
    ScoreName,
    SegmentChange,
    TransactionEvent,
    TransactionType,
)
from stream_app.core.features import DAY
from stream_app.core.models import TieAwareROCAUC
from stream_app.settings import SegmentationSettings

CALIBRATION_BINS: Final = 10
SWING_WINDOW_DAYS: Final = 14.0
TIERS: Final = ("low", "medium", "high")


def expected_calibration_error(scores: list[float], outcomes: list[bool]) -> dict[str, Any]:
    """ECE over equal-width bins: the share-weighted gap between the mean score and the observed
    rate in each bin, with the reliability table it comes from."""
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(CALIBRATION_BINS)]
    for score, outcome in zip(scores, outcomes, strict=True):
        bins[min(CALIBRATION_BINS - 1, int(score * CALIBRATION_BINS))].append((score, outcome))
    table, ece = [], 0.0
    for i, members in enumerate(bins):
        if not members:
            continue
        mean = sum(s for s, _ in members) / len(members)
        rate = sum(1 for _, o in members if o) / len(members)
        ece += len(members) / len(scores) * abs(mean - rate)
        table.append(
            {
                "bin": f"{i / CALIBRATION_BINS:.1f}-{(i + 1) / CALIBRATION_BINS:.1f}",
                "count": len(members),
                "mean_score": round(mean, 4),
                "observed_rate": round(rate, 4),
            }
        )
    return {"ece": round(ece, 4) if scores else None, "reliability": table}


def roc_auc(scores: list[float], outcomes: list[bool]) -> float | None:
    auc = TieAwareROCAUC()
    for score, outcome in zip(scores, outcomes, strict=True):
        auc.update(outcome, score)
    value = auc.get()
    return None if value is None else round(value, 4)


@dataclass(slots=True)
class _Emitted:
    customer: str
    at: float
    score: float
    trigger: str  # "event" or "time"


class Judged(NamedTuple):
    """One emitted score whose horizon has passed, with what really happened next."""

    customer: str
    at: float
    score: float
    outcome: bool  # bought (purchase propensity) or went silent (churn risk)
    trigger: str


@dataclass
class ScoreAudit:
    """Collects emitted scores and the stream's purchases and activity; :meth:`report` judges
    every score whose horizon has passed."""

    settings: SegmentationSettings
    purchases: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    activity: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    purchase_scores: list[_Emitted] = field(default_factory=list)
    churn_scores: list[_Emitted] = field(default_factory=list)
    tier_entries: list[tuple[str, float, str]] = field(default_factory=list)
    last_tier_change: dict[str, tuple[float, str, str]] = field(default_factory=dict)
    tier_changes: int = 0
    swings: int = 0
    stream_end: float = float("-inf")

    def event(self, event: Event) -> None:
        """An applied event (events arrive in time order per customer in a replay)."""
        at = event.event_time.timestamp()
        self.stream_end = max(self.stream_end, at)
        refund = isinstance(event, TransactionEvent) and event.event_type is TransactionType.REFUND
        if not refund:
            bisect.insort(self.activity[event.customer_id], at)
        if isinstance(event, TransactionEvent) and event.event_type is TransactionType.PURCHASE:
            bisect.insort(self.purchases[event.customer_id], at)

    def change(self, change: SegmentChange) -> None:
        at = change.event_time.timestamp()
        trigger = "time" if change.reason.trigger_event_type == "time_passed" else "event"
        scores = change.scores
        if change.component is Component.PROPENSITY and scores.purchase_propensity is not None:
            self.purchase_scores.append(
                _Emitted(change.customer_id, at, scores.purchase_propensity, trigger)
            )
            self.tier_entries.append((change.customer_id, at, change.current.propensity_tier.value))
            self._swing(change, at)
        if change.component is Component.ENTRY and change.current.propensity_tier.value in TIERS:
            self.tier_entries.append((change.customer_id, at, change.current.propensity_tier.value))
        if change.component is Component.LIFECYCLE and scores.churn_risk is not None:
            self.churn_scores.append(_Emitted(change.customer_id, at, scores.churn_risk, trigger))

    def _swing(self, change: SegmentChange, at: float) -> None:
        """A tier change undone within 14 days (high -> low -> high): what flap_rate's 24 h
        window does not see, and what makes a regular buyer flip every week."""
        assert change.previous is not None
        before, after = change.previous.propensity_tier.value, change.current.propensity_tier.value
        self.tier_changes += 1
        last = self.last_tier_change.get(change.customer_id)
        window = SWING_WINDOW_DAYS * DAY
        if last is not None and at - last[0] <= window and (before, after) == (last[2], last[1]):
            self.swings += 1
        self.last_tier_change[change.customer_id] = (at, before, after)

    def _within(
        self, times: dict[str, list[float]], customer: str, at: float, horizon: float
    ) -> bool:
        seen = times.get(customer, [])
        i = bisect.bisect_right(seen, at)
        return i < len(seen) and seen[i] <= at + horizon

    def judged(self, name: ScoreName) -> list[Judged]:
        """Every emitted score of `name` whose horizon ended before the stream did, in emission
        order, with its outcome."""
        churn = name == "churn_risk"
        emitted = self.churn_scores if churn else self.purchase_scores
        days = self.settings.churn_horizon_days if churn else self.settings.purchase_horizon_days
        return self._outcomes(emitted, days * DAY, churn)

    def _outcomes(self, emitted: list[_Emitted], horizon: float, churn: bool) -> list[Judged]:
        times = self.activity if churn else self.purchases
        return [
            Judged(
                e.customer,
                e.at,
                e.score,
                self._within(times, e.customer, e.at, horizon) != churn,
                e.trigger,
            )
            for e in emitted
            if e.at + horizon <= self.stream_end
        ]

    def _judge(self, emitted: list[_Emitted], horizon: float, churn: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split in ("all", "event", "time"):
            chosen = [e for e in emitted if split in ("all", e.trigger)]
            matured = self._outcomes(chosen, horizon, churn)
            outcomes = [j.outcome for j in matured]
            scores = [j.score for j in matured]
            calibration = expected_calibration_error(scores, outcomes)
            out[split] = {
                "emitted": len(chosen),
                "judged": len(matured),
                "positive_rate": round(sum(outcomes) / len(outcomes), 4) if outcomes else None,
                "auc": roc_auc(scores, outcomes),
                "ece": calibration["ece"],
                "reliability": calibration["reliability"] if split == "all" else None,
            }
        return out

    def report(self) -> dict[str, Any]:
        s = self.settings
        purchase_horizon = s.purchase_horizon_days * DAY
        buy_rate: dict[str, Any] = {}
        for tier in TIERS:
            entered = [
                (c, at)
                for c, at, t in self.tier_entries
                if t == tier and at + purchase_horizon <= self.stream_end
            ]
            bought = sum(
                1 for c, at in entered if self._within(self.purchases, c, at, purchase_horizon)
            )
            buy_rate[tier] = {
                "entered": len(entered),
                "bought_within_horizon": round(bought / len(entered), 4) if entered else None,
            }
        return {
            "purchase_scores_emitted": self._judge(self.purchase_scores, purchase_horizon, False),
            "churn_scores_emitted": self._judge(
                self.churn_scores, s.churn_horizon_days * DAY, True
            ),
            "buy_rate_by_tier_entered": buy_rate,
            "swing_rate": round(self.swings / self.tier_changes, 5) if self.tier_changes else 0.0,
        }
