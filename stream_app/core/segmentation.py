"""Segment policy: scores and behaviour -> segment, with hysteresis, dwell and due times.

A segment is (behavioural cluster, purchase-propensity tier, lifecycle stage). Pure functions of
their inputs and event time; the processor decides when to call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream_app.contracts.events import Lifecycle, PropensityTier
from stream_app.core.features import DAY, HOUR, Behaviour
from stream_app.settings import SegmentationSettings


@dataclass(slots=True)
class Membership:
    """A customer's current segment plus the memory the anti-flap rules need."""

    cluster: int
    cluster_since: float
    tier: PropensityTier
    stage: Lifecycle
    candidate: int = -1
    candidate_hits: int = 0
    reactivated_at: float | None = None
    tier_since: float | None = None  # when the tier last changed (None: not recorded)
    # The cluster's name in the customer's newest change: a later change says so if the
    # cluster was renamed since (its centre moved). None: not recorded.
    cluster_name: str | None = None

    def to_list(self) -> list[object]:
        return [
            self.cluster,
            self.cluster_since,
            self.tier.value,
            self.stage.value,
            self.candidate,
            self.candidate_hits,
            self.reactivated_at,
        ]

    def to_record(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "cluster_since": self.cluster_since,
            "tier": self.tier.value,
            "stage": self.stage.value,
            "candidate": self.candidate,
            "candidate_hits": self.candidate_hits,
            "reactivated_at": self.reactivated_at,
            "tier_since": self.tier_since,
            **({} if self.cluster_name is None else {"cluster_name": self.cluster_name}),
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Membership:
        reactivated = r.get("reactivated_at")
        tier_since = r.get("tier_since")
        name = r.get("cluster_name")
        return cls(
            cluster=int(r["cluster"]),
            cluster_since=float(r["cluster_since"]),
            tier=PropensityTier(r["tier"]),
            stage=Lifecycle(r["stage"]),
            candidate=int(r.get("candidate", -1)),
            candidate_hits=int(r.get("candidate_hits", 0)),
            reactivated_at=None if reactivated is None else float(reactivated),
            tier_since=None if tier_since is None else float(tier_since),
            cluster_name=None if name is None else str(name),
        )

    @classmethod
    def from_list(cls, v: list[Any]) -> Membership:
        return cls(
            int(v[0]),
            float(v[1]),
            PropensityTier(v[2]),
            Lifecycle(v[3]),
            int(v[4]),
            int(v[5]),
            None if v[6] is None else float(v[6]),
        )


def lifecycle_stage(
    b: Behaviour, now: float, reactivated_at: float | None, s: SegmentationSettings
) -> Lifecycle:
    """Stage from recency and frequency as of event time `now`."""
    idle = now - b.last_event_at
    if idle >= s.lapsed_after_days * DAY:
        return Lifecycle.LAPSED
    if idle >= s.at_risk_after_days * DAY:
        return Lifecycle.AT_RISK
    if reactivated_at is not None and now - reactivated_at < s.reactivated_days * DAY:
        return Lifecycle.REACTIVATED
    if now - b.first_seen < s.new_customer_days * DAY and b.order_count <= 1:
        return Lifecycle.NEW
    return Lifecycle.ACTIVE


def lifecycle_due(
    b: Behaviour, now: float, reactivated_at: float | None, s: SegmentationSettings
) -> float | None:
    """The next event time at which the stage would change if the customer stays silent."""
    return earliest_after(
        now,
        (
            b.last_event_at + s.at_risk_after_days * DAY,
            b.last_event_at + s.lapsed_after_days * DAY,
            b.first_seen + s.new_customer_days * DAY,
            None if reactivated_at is None else reactivated_at + s.reactivated_days * DAY,
        ),
    )


def earliest_after(now: float, times: tuple[float | None, ...]) -> float | None:
    """The earliest of `times` strictly after `now`, ignoring None; None if there is none."""
    earliest = None
    for t in times:
        if t is not None and t > now and (earliest is None or t < earliest):
            earliest = t
    return earliest


def next_tier(
    current: PropensityTier, propensity: float, scored: bool, s: SegmentationSettings
) -> PropensityTier:
    """Tier with hysteresis: enter above `*_enter`, leave only below the lower `*_leave`."""
    if not scored:
        return PropensityTier.UNSCORED
    if current is PropensityTier.HIGH:
        if propensity >= s.high_leave:
            return PropensityTier.HIGH
        return PropensityTier.MEDIUM if propensity >= s.medium_leave else PropensityTier.LOW
    if propensity >= s.high_enter:
        return PropensityTier.HIGH
    if current is PropensityTier.MEDIUM:
        return PropensityTier.MEDIUM if propensity >= s.medium_leave else PropensityTier.LOW
    return PropensityTier.MEDIUM if propensity >= s.medium_enter else PropensityTier.LOW


def tier_dwelt(m: Membership, now: float, s: SegmentationSettings) -> bool:
    """True when the current tier may change at `now`: leaving `unscored` is never held back, and
    a tier is otherwise kept for at least `tier_min_dwell_days` after it last changed."""
    if m.tier is PropensityTier.UNSCORED or m.tier_since is None:
        return True
    return now - m.tier_since >= s.tier_min_dwell_days * DAY


def cluster_move(m: Membership, predicted: int, now: float, s: SegmentationSettings) -> bool:
    """Record a cluster prediction; True when the customer should move to `predicted` now.

    A move needs the same new cluster on `cluster_confirmations` consecutive observations and at
    least `cluster_min_dwell_hours` in the current cluster, so one odd event cannot flip it.
    """
    if predicted == m.cluster:
        m.candidate, m.candidate_hits = -1, 0
        return False
    if predicted == m.candidate:
        m.candidate_hits += 1
    else:
        m.candidate, m.candidate_hits = predicted, 1
    dwelt = now - m.cluster_since >= s.cluster_min_dwell_hours * HOUR
    return dwelt and m.candidate_hits >= s.cluster_confirmations
