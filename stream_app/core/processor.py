"""One processing step shared by the offline replay and the live Faust agents.

``Processor.process(event)`` is (state, event) -> (state, segment changes): it loads the customer's
state from a :class:`StateStore`, folds the event in, lets the models score and learn, applies the
segment policy and writes the state back. ``Processor.advance(t)`` is the watermark step: it fires
the time-driven work (lifecycle moves, churn re-scoring, labels maturing) that is due by event time
``t``, for customers who sent nothing, in due-time order.

Ordering: events are applied as they arrive. The watermark is the highest event time seen minus
``allowed_lateness_seconds``. An event at or after the watermark is applied even when it is older
than the customer's last event (decayed features are order-insensitive; recency takes the max). An
event *before* the watermark is refused as ``late``: time-driven changes up to the watermark have
already fired, so applying it would rewrite history; the caller dead-letters it. Duplicate event
ids (the customer's most recent ones, hashed) are ignored.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import math
import operator
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Protocol

from stream_app.contracts.events import (
    ClickEvent,
    Component,
    Event,
    Lifecycle,
    Origin,
    PropensityTier,
    Segment,
    SegmentChange,
    TransactionEvent,
    TransactionType,
)
from stream_app.core.features import (
    DAY,
    FEATURES,
    Behaviour,
    apply_click,
    apply_transaction,
    feature_vector,
)
from stream_app.core.learning import (
    ExampleKind,
    InProcessLearning,
    Learning,
)
from stream_app.core.models import WARM_UP_LABELS, Assessment, SegmentModels
from stream_app.core.segmentation import (
    Membership,
    cluster_move,
    earliest_after,
    lifecycle_due,
    lifecycle_stage,
    next_tier,
    tier_dwelt,
)
from stream_app.core.state import CustomerState, Snapshot
from stream_app.settings import SegmentationSettings

CHURN_CHECKPOINT_DAYS: Final = (7.0, 30.0)  # idle days at which churn risk is re-scored
TOP_CONTRIBUTIONS: Final = 3
_PLACEHOLDERS: Final = ("warming up", "no members yet")  # names before a cluster is profiled
_PACK: Final = struct.Struct(f"<{len(FEATURES)}f")
_FEATURE_VALUES: Final = operator.itemgetter(*FEATURES)  # feature dict -> values in that order


class Status(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"
    FUTURE = "future"


def _pack(x: dict[str, float]) -> str:
    return base64.b64encode(_PACK.pack(*_FEATURE_VALUES(x))).decode("ascii")


def _id_hash(event_id: str) -> str:
    return hashlib.blake2b(event_id.encode(), digest_size=6).hexdigest()


class Ledger(Protocol):
    """What the live layer records about delivery while the processor works (offline: none):
    which input messages a customer's state has applied, and the changes it must still deliver.
    The processor calls it before each state write, so the two are stored together."""

    def applied(self, customer_id: str, position: Position) -> bool:
        """True if this customer's stored state already includes the message at `position`."""
        ...

    def record(
        self, customer_id: str, changes: list[SegmentChange], position: Position | None
    ) -> None:
        """The customer's state is about to be written with these new changes (and, for an
        event, having applied the message at `position`)."""
        ...


class StateStore(Protocol):
    """Where customer state lives: a dict offline, a Faust table live."""

    def get(self, customer_id: str) -> CustomerState | None: ...
    def put(self, state: CustomerState) -> None: ...
    def delete(self, customer_id: str) -> None: ...
    def __iter__(self) -> Iterator[CustomerState]: ...


class MemoryStore:
    """In-process store of live objects. States survive `to_bytes`/`from_bytes` unchanged (floats
    round-trip exactly through orjson; label snapshots are float32 already), so keeping objects
    gives the same results as a table that stores bytes."""

    def __init__(self) -> None:
        self._data: dict[str, CustomerState] = {}

    def get(self, customer_id: str) -> CustomerState | None:
        return self._data.get(customer_id)

    def put(self, state: CustomerState) -> None:
        self._data[state.customer_id] = state

    def delete(self, customer_id: str) -> None:
        self._data.pop(customer_id, None)

    def __iter__(self) -> Iterator[CustomerState]:
        return iter(list(self._data.values()))

    def __len__(self) -> int:
        return len(self._data)

    def sizes(self) -> list[int]:
        return [len(state.to_bytes()) for state in self._data.values()]


class SerializedStore:
    """In-memory store that keeps every state as bytes, exactly as a Faust table with a raw
    value does (tests use it to show the live path gives the offline path's output)."""

    def __init__(self, data: dict[str, bytes] | None = None) -> None:
        self.data = {} if data is None else data

    def get(self, customer_id: str) -> CustomerState | None:
        raw = self.data.get(customer_id)
        return None if raw is None else CustomerState.from_bytes(raw)

    def put(self, state: CustomerState) -> None:
        self.data[state.customer_id] = state.to_bytes()

    def delete(self, customer_id: str) -> None:
        self.data.pop(customer_id, None)

    def __iter__(self) -> Iterator[CustomerState]:
        return iter([CustomerState.from_bytes(raw) for raw in self.data.values()])


@dataclass(slots=True)
class StreamProgress:
    """The newest event time accepted so far: the stream's own clock, one per processor (so one
    per partition live). Not shared across partitions: Kafka hands a backlog over partition by
    partition in chunks, and a partition read ahead would make the others' events late. A
    customer's trail still does not depend on the partition count, because their own due work
    fires before their next event (:meth:`Processor.process`)."""

    max_event_time: float = -math.inf


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    changes: list[SegmentChange]
    state: CustomerState | None = None


@dataclass(frozen=True, slots=True)
class Position:
    """Where an event was read from; with it, a re-delivered event is recognised exactly."""

    topic: str
    offset: int


@dataclass(slots=True)
class _Trigger:
    event_id: str
    event_type: str
    at: float
    origin: Origin
    processed_at: datetime | None  # None: the processor's clock at `at`, read only for a change
    event_time: datetime | None = None  # `at` as a datetime, made only for a change


def _ts(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


class _Moment:
    """A trigger and the features as of its time. Each propensity model scores them at most
    once, when a decision or a change first needs it; models learn before a moment, never
    during one, so the score and its explanation come from the same model."""

    __slots__ = ("_churn", "_models", "_purchase", "trigger", "x")

    def __init__(self, trigger: _Trigger, x: dict[str, float], models: SegmentModels) -> None:
        self.trigger = trigger
        self.x = x
        self._models = models
        self._purchase: Assessment | None = None
        self._churn: Assessment | None = None

    @property
    def purchase(self) -> Assessment:
        if self._purchase is None:
            self._purchase = self._models.purchase.assess(self.x)
        return self._purchase

    @property
    def churn(self) -> Assessment:
        if self._churn is None:
            self._churn = self._models.churn.assess(self.x)
        return self._churn


class Processor:
    """The segmentation core as a stateful step over a store, a model set and a due-time index."""

    def __init__(
        self,
        settings: SegmentationSettings,
        models: SegmentModels,
        store: StateStore,
        clock: Callable[[float], datetime] | None = None,
        ledger: Ledger | None = None,
        progress: StreamProgress | None = None,
        learning: Learning | None = None,
    ) -> None:
        self.s = settings
        self.ledger = ledger
        self.models = models
        # Offline (and in a live worker's deterministic mode) the models learn as they score.
        self.learning: Learning = learning or InProcessLearning(models)
        self.store = store
        self._clock = clock or _ts
        self._due: list[tuple[float, str]] = []
        self.progress = progress or StreamProgress()
        self.counts: dict[str, int] = {}
        self._segments: dict[tuple[int, str, PropensityTier, Lifecycle], Segment] = {}
        # Shared learning: which model version scores event time t (core.learning.Epochs);
        # None: `models`, whatever the time (in-process learning, a pinned version).
        self.model_at: Callable[[float], SegmentModels] | None = None

    def use_models(self, models: SegmentModels) -> None:
        """Score with another model version from the next event on (a batch boundary live)."""
        self.models = models
        self.learning.models = models
        self._segments.clear()  # cached segments carry the old version's cluster names

    def _score_at(self, t: float) -> None:
        if self.model_at is not None:
            models = self.model_at(t)
            if models is not self.models:
                self.use_models(models)

    def declare(self, t: float) -> None:
        """The next event is at `t` (shared learning, before it is scored): the stream's clock
        moves there now, so events before its watermark are late from here on, and the
        time-driven work up to it can fire (:meth:`advance`) before the event itself."""
        self.progress.max_event_time = max(self.progress.max_event_time, t)

    @property
    def promise(self) -> float:
        """No example this processor emits from now on is learned before this event time: its
        events are at or after the watermark, and labels mature at due times not fired yet."""
        pending = self._due[0][0] if self._due else math.inf
        return min(self.watermark, pending)

    # -- watermark and due-time index ---------------------------------------------------------

    @property
    def max_event_time(self) -> float:
        return self.progress.max_event_time

    @property
    def watermark(self) -> float:
        return self.progress.max_event_time - self.s.allowed_lateness_seconds

    def rebuild_due_index(self) -> None:
        """Rebuild the due-time heap from the store (after a restart or a rebalance)."""
        self.set_due_index(
            [(st.due_at, st.customer_id) for st in self.store if st.due_at is not None]
        )

    def set_due_index(self, due: list[tuple[float, str]]) -> None:
        """The due-time heap from (due time, customer) pairs the caller collected in its own
        scan of the store (the live layer reads every envelope at recovery anyway)."""
        heapq.heapify(due)
        self._due = due

    def is_future(self, at: float, clock: float | None) -> bool:
        """Event time is input, not truth. Live, `clock` is the worker's wall clock and an event
        more than the allowed skew ahead of it is refused. Offline there is no wall clock: the
        stream's own progress is the clock, and real data has long quiet periods, so the bound
        is the larger of the skew and ``offline_max_gap_days``."""
        s = self.s
        if clock is not None:
            return at > clock + s.max_future_skew_seconds
        progress = self.progress.max_event_time
        if progress == -math.inf:
            return False
        return at > progress + max(s.max_future_skew_seconds, s.offline_max_gap_days * DAY)

    def advance(self, until: float) -> list[SegmentChange]:
        """Fire every time-driven change due at or before event time `until`, oldest first."""
        changes: list[SegmentChange] = []
        while self._due and self._due[0][0] <= until:
            due, customer_id = heapq.heappop(self._due)
            state = self.store.get(customer_id)
            if state is None or state.due_at != due:
                continue  # superseded by a later event or erased
            self._score_at(due)
            fired = self._on_time(state, due)
            self._schedule(state, due)
            self._record(state, fired, None)
            self.store.put(state)
            changes.extend(fired)
        return changes

    def _schedule(self, st: CustomerState, now: float) -> None:
        """Set the customer's next due time (lifecycle move, churn checkpoint or a label maturing)
        and index it. Labels get their own time: waiting for the next lifecycle timer delayed
        learning by up to 60 days (measured on Online Retail)."""
        b, s = st.behaviour, self.s
        reactivated_at = st.membership.reactivated_at if st.membership else None
        due = earliest_after(
            now,
            (
                lifecycle_due(b, now, reactivated_at, s),
                _checkpoint_time(st),
                _first_time(st.purchase_pending, s.purchase_horizon_days * DAY),
                _first_time(st.churn_pending, s.churn_horizon_days * DAY),
            ),
        )
        if due != st.due_at and due is not None:
            heapq.heappush(self._due, (due, st.customer_id))
        st.due_at = due

    # -- events ------------------------------------------------------------------------------

    def process(
        self, event: Event, processed_at: datetime | None = None, position: Position | None = None
    ) -> Outcome:
        """Apply one event; also fires time-driven changes the advancing watermark makes due.

        `processed_at` is the worker's clock live (None offline); an event too far ahead of it is
        refused as ``future`` and moves nothing. Before the event is applied, the customer's own
        time-driven work due by its time fires, so a customer's trail does not depend on how far
        the watermark of their partition has got (the partition count)."""
        at = event.event_time.timestamp()
        clock = None if processed_at is None else processed_at.timestamp()
        if self.is_future(at, clock):
            return self._count(Outcome(Status.FUTURE, []))
        st = self.store.get(event.customer_id)
        redelivered = (
            st is not None
            and position is not None
            and self.ledger is not None
            and self.ledger.applied(event.customer_id, position)
        )
        if redelivered:  # the same message again, e.g. after a crash before the offset commit
            return self._count(Outcome(Status.DUPLICATE, [], st))
        digest = _id_hash(event.event_id)
        if st is not None and digest in st.recent_ids:
            # Before the lateness check: an event applied already is a duplicate however late
            # it comes again (a history replayed twice into a worker that kept its clock).
            return self._count(Outcome(Status.DUPLICATE, [], st))
        if at < self.watermark:
            return self._count(Outcome(Status.LATE, []))
        trigger = _Trigger(event.event_id, event.event_type.value, at, event.origin, processed_at)
        changes = [] if st is None else self._catch_up(st, at)
        self._score_at(at)
        if st is None:
            st = CustomerState(event.customer_id, Behaviour.first(at))
        st.recent_ids.append(digest)
        del st.recent_ids[: -self.s.recent_event_ids]
        changes.extend(self._on_event(st, event, trigger))
        self._schedule(st, at)
        self._record(st, changes, position)
        self.store.put(st)
        if at > self.progress.max_event_time:
            self.progress.max_event_time = at
            changes.extend(self.advance(self.watermark))
        return self._count(Outcome(Status.APPLIED, changes, st))

    def _catch_up(self, st: CustomerState, until: float) -> list[SegmentChange]:
        """Fire the customer's own time-driven work due at or before `until` (their next event),
        as the watermark would have; their heap entries go stale and are skipped later."""
        changes: list[SegmentChange] = []
        while st.due_at is not None and st.due_at <= until:
            due = st.due_at
            self._score_at(due)
            changes.extend(self._on_time(st, due))
            self._schedule(st, due)
        return changes

    def _record(
        self, st: CustomerState, changes: list[SegmentChange], position: Position | None
    ) -> None:
        if self.ledger is not None:
            self.ledger.record(st.customer_id, changes, position)

    def _count(self, outcome: Outcome) -> Outcome:
        self.counts[outcome.status.value] = self.counts.get(outcome.status.value, 0) + 1
        return outcome

    def _on_event(self, st: CustomerState, event: Event, trig: _Trigger) -> list[SegmentChange]:
        """Fold the event in, score and decide. A refund (or cancellation) is not engagement:
        it leaves recency, the lifecycle stage and the churn checkpoints alone, never
        reactivates anyone, and can only lower the purchase propensity."""
        s, b, at = self.s, st.behaviour, trig.at
        refund = _is_refund(event)
        lapsed_before = (
            not refund
            and st.membership is not None
            and at - b.last_event_at >= s.lapsed_after_days * DAY
        )
        self._mark_outcomes(st, event, at)  # an outcome exactly at the horizon still counts
        self._mature_labels(st, at)
        if isinstance(event, ClickEvent):
            apply_click(
                b,
                event,
                at,
                session_gap=s.session_gap_minutes * 60,
                category_limit=s.top_categories,
            )
        else:
            apply_transaction(
                b,
                event,
                at,
                session_gap=s.session_gap_minutes * 60,
                category_limit=s.top_categories,
            )
        st.origin = event.origin
        if not refund:
            st.churn_checkpoint = 0
        x = feature_vector(b, at)
        cluster = self.learning.observe(x, at)
        moment = _Moment(trig, x, self.models)
        scored = moment.purchase.probability
        if refund and st.membership is not None:
            scored = min(scored, st.purchase_propensity)
        st.purchase_propensity = scored
        self._snapshot_purchase(st, x, at)
        if st.membership is None:
            return [self._enter(st, cluster, moment)]
        if lapsed_before:
            st.membership.reactivated_at = at
        return self._decide(st, moment, cluster)

    def _mark_outcomes(self, st: CustomerState, event: Event, at: float) -> None:
        """Record what happened after each pending snapshot; the label is revealed only when the
        horizon has passed (revealing positives early biases the model, NOTES-river section 2)."""
        for snap in [] if _is_refund(event) else st.churn_pending:
            if snap[0] < at <= snap[0] + self.s.churn_horizon_days * DAY:
                snap[3] = True  # active again inside the horizon: not churned
        if isinstance(event, TransactionEvent) and event.event_type is TransactionType.PURCHASE:
            for snap in st.purchase_pending:
                if snap[0] < at <= snap[0] + self.s.purchase_horizon_days * DAY:
                    snap[3] = True

    def _snapshot_purchase(self, st: CustomerState, x: dict[str, float], at: float) -> None:
        pending = st.purchase_pending
        interval = self.s.snapshot_interval_hours * 3600
        if len(pending) >= self.s.max_pending_snapshots:
            return
        if pending and at - float(pending[-1][0]) < interval:
            return
        pending.append([at, st.purchase_propensity, _pack(x), False])

    def _snapshot_churn(self, st: CustomerState, moment: _Moment) -> None:
        """Learn where you score: a churn risk emitted with a lifecycle change (often at an
        event) becomes a churn example too, not only the silent 7- and 30-day checkpoints."""
        pending, at = st.churn_pending, moment.trigger.at
        if len(pending) >= self.s.max_pending_snapshots or (pending and pending[-1][0] == at):
            return
        pending.append([at, st.churn_risk, _pack(moment.x), False])

    # -- time ----------------------------------------------------------------------------------

    def _mature_labels(self, st: CustomerState, now: float) -> None:
        s = self.s
        st.purchase_pending = self._expire(
            st.purchase_pending, now, s.purchase_horizon_days * DAY, churn=False
        )
        st.churn_pending = self._expire(
            st.churn_pending, now, s.churn_horizon_days * DAY, churn=True
        )

    def _on_time(self, st: CustomerState, now: float) -> list[SegmentChange]:
        s = self.s
        self._mature_labels(st, now)
        m = st.membership
        checkpoint = _checkpoint_time(st)
        at_checkpoint = checkpoint is not None and checkpoint <= now
        stage_moves = m is not None and m.stage is not lifecycle_stage(
            st.behaviour, now, m.reactivated_at, s
        )
        if m is None or not (at_checkpoint or stage_moves):
            return []  # only labels matured: nothing to re-score
        x = feature_vector(st.behaviour, now)
        trig = _Trigger(f"time:{now:.0f}", "time_passed", now, st.origin, None)
        moment = _Moment(trig, x, self.models)
        if at_checkpoint:
            st.churn_risk = moment.churn.probability
            if len(st.churn_pending) < s.max_pending_snapshots:
                st.churn_pending.append([now, st.churn_risk, _pack(x), False])
            while (checkpoint := _checkpoint_time(st)) is not None and checkpoint <= now:
                st.churn_checkpoint += 1
        st.purchase_propensity = moment.purchase.probability
        # Learn where you score: this silent-time score is emitted like an event-time one, so
        # the model also learns from moments like it (features aged to this time).
        self._snapshot_purchase(st, x, now)
        return self._decide(st, moment, None)

    def _expire(
        self, pending: list[Snapshot], now: float, horizon: float, *, churn: bool
    ) -> list[Snapshot]:
        """Learn from every snapshot whose horizon has passed, in order; keep the others."""
        matured = [snap for snap in pending if snap[0] + horizon <= now]
        if not matured:
            return pending  # the common case: nothing to learn, nothing to copy
        kind = ExampleKind.CHURN if churn else ExampleKind.PURCHASE
        for snap in matured:
            outcome = not snap[3] if churn else bool(snap[3])
            self.learning.label(kind, snap[2], float(snap[0]), outcome, float(snap[1]))
        return [snap for snap in pending if snap[0] + horizon > now]

    # -- policy --------------------------------------------------------------------------------

    def _decide(
        self, st: CustomerState, moment: _Moment, cluster: int | None
    ) -> list[SegmentChange]:
        m = st.membership
        assert m is not None
        s, at, changes = self.s, moment.trigger.at, []
        stage = lifecycle_stage(st.behaviour, at, m.reactivated_at, s)
        if stage is not m.stage:
            before = self._segment(m, told=True)
            m.stage = stage
            changes.append(self._change(st, Component.LIFECYCLE, before, moment))
        tier = next_tier(m.tier, st.purchase_propensity, self._tiered, s)
        refund = moment.trigger.event_type == TransactionType.REFUND.value
        if refund and _TIER_RANK[tier] > _TIER_RANK[m.tier]:
            tier = m.tier  # a refund never raises a tier (not even out of `unscored`)
        if tier is not m.tier and not tier_dwelt(m, at, s):
            tier = m.tier  # held for the dwell time: no weekly high -> low -> high
        if tier is not m.tier:
            before = self._segment(m, told=True)
            m.tier, m.tier_since = tier, at
            changes.append(self._change(st, Component.PROPENSITY, before, moment))
        if cluster is not None and cluster_move(m, cluster, at, s):
            before = self._segment(m, told=True)
            m.cluster, m.cluster_since, m.candidate, m.candidate_hits = cluster, at, -1, 0
            changes.append(self._change(st, Component.CLUSTER, before, moment))
        return changes

    @property
    def _tiered(self) -> bool:
        """Purchase tiers are assigned once the model has warmed up and learned from
        `tier_warm_up_labels` matured labels (before that every tier is `unscored`)."""
        purchase = self.models.purchase
        return purchase.warmed_up and purchase.labels >= self.s.tier_warm_up_labels

    def _enter(self, st: CustomerState, cluster: int, moment: _Moment) -> SegmentChange:
        at = moment.trigger.at
        tier = next_tier(PropensityTier.UNSCORED, st.purchase_propensity, self._tiered, self.s)
        stage = lifecycle_stage(st.behaviour, at, None, self.s)
        st.membership = Membership(cluster, at, tier, stage, tier_since=at)
        return self._change(st, Component.ENTRY, None, moment)

    def _segment(self, m: Membership, told: bool = False) -> Segment:
        """The segment `m` stands for; `told`: as the customer's newest change named it."""
        profile = self.models.clusters.profile(m.cluster).name
        if told and m.cluster_name is not None:
            profile = m.cluster_name
        key = (m.cluster, profile, m.tier, m.stage)
        segment = self._segments.get(key)
        if segment is None:
            segment = self._segments[key] = Segment(
                cluster=m.cluster,
                cluster_profile=profile,
                propensity_tier=m.tier,
                lifecycle=m.stage,
            )
        return segment

    def _change(
        self,
        st: CustomerState,
        component: Component,
        previous: Segment | None,
        moment: _Moment,
    ) -> SegmentChange:
        assert st.membership is not None
        trig = moment.trigger
        st.sequence += 1
        current = self._segment(st.membership)
        st.membership.cluster_name = current.cluster_profile
        if component is Component.LIFECYCLE:
            st.churn_risk = moment.churn.probability
            self._snapshot_churn(st, moment)
        key = f"{st.customer_id}|{st.sequence}|{component.value}|{trig.event_id}"
        if trig.event_time is None:
            trig.event_time = _ts(trig.at)
        if trig.processed_at is None:
            trig.processed_at = self._clock(trig.at)
        scores = self._scores(st)
        # One validation of the whole nested change: as strict as building each part, cheaper.
        return SegmentChange.model_validate(
            {
                "change_id": hashlib.sha256(key.encode()).hexdigest()[:32],
                "customer_id": st.customer_id,
                "sequence": st.sequence,
                "component": component,
                "previous": previous,
                "current": current,
                "scores": scores,
                "reason": {
                    "trigger_event_id": trig.event_id,
                    "trigger_event_type": trig.event_type,
                    "summary": _summary(component, previous, current, st, moment.x, scores),
                    "top_contributions": [
                        {"feature": f, "value": round(v, 4), "contribution": round(c, 4)}
                        for f, v, c in self._explain(component, moment)
                    ],
                },
                "model_version": self.models.stamp,
                "segment_definition_version": self.s.version,
                "event_time": trig.event_time,
                "processed_at": trig.processed_at,
                "origin": trig.origin,
            }
        )

    def _scores(self, st: CustomerState) -> dict[str, Any]:
        """Scores that were computed, and for the others null with the reason."""
        purchase, churn = self.models.purchase, self.models.churn
        absent: dict[str, str] = {}
        if not purchase.warmed_up:
            absent["purchase_propensity"] = _warming_up("purchase", purchase.labels)
        if st.churn_risk is None:
            absent["churn_risk"] = (
                "not scored yet for this customer: churn risk is scored when the lifecycle "
                "stage changes and at 7 and 30 idle days"
            )
        elif not churn.warmed_up:
            absent["churn_risk"] = _warming_up("churn", churn.labels)
        return {
            "purchase_propensity": None
            if "purchase_propensity" in absent
            else round(st.purchase_propensity, 6),
            "churn_risk": None if "churn_risk" in absent else round(st.churn_risk or 0.0, 6),
            "absent": absent,
        }

    def _explain(self, component: Component, moment: _Moment) -> list[tuple[str, float, float]]:
        if component is Component.CLUSTER:
            return self.models.clusters.explain(moment.x, TOP_CONTRIBUTIONS)
        if component is Component.LIFECYCLE:
            return self.models.churn.explain(moment.churn, TOP_CONTRIBUTIONS)
        return self.models.purchase.explain(moment.purchase, TOP_CONTRIBUTIONS)

    def forget(self, customer_id: str) -> bool:
        """Erase a customer (privacy request): state gone, no further segment events."""
        existed = self.store.get(customer_id) is not None
        self.store.delete(customer_id)
        return existed


_TIER_RANK: Final = {
    PropensityTier.UNSCORED: 0,
    PropensityTier.LOW: 1,
    PropensityTier.MEDIUM: 2,
    PropensityTier.HIGH: 3,
}


def _warming_up(model: str, labels: int) -> str:
    return (
        f"the {model} model is warming up: it has learned from {labels} of the "
        f"{WARM_UP_LABELS} matured labels it needs"
    )


def _is_refund(event: Event) -> bool:
    return isinstance(event, TransactionEvent) and event.event_type is TransactionType.REFUND


def _first_time(pending: list[Snapshot], horizon: float) -> float | None:
    return float(pending[0][0]) + horizon if pending else None


def _checkpoint_time(st: CustomerState) -> float | None:
    if st.churn_checkpoint >= len(CHURN_CHECKPOINT_DAYS):
        return None
    return st.behaviour.last_event_at + CHURN_CHECKPOINT_DAYS[st.churn_checkpoint] * DAY


def _summary(
    component: Component,
    previous: Segment | None,
    current: Segment,
    st: CustomerState,
    x: dict[str, float],
    scores: dict[str, Any],
) -> str:
    if component is Component.ENTRY or previous is None:
        return f"first seen: joined {current.name} ({current.cluster_profile})"
    return _what_changed(component, previous, current, st, x, scores) + _renamed(previous, current)


def _renamed(previous: Segment, current: Segment) -> str:
    """A cluster renamed since the customer's previous change (its centre moved) says so."""
    old, new = previous.cluster_profile, current.cluster_profile
    if previous.cluster != current.cluster or old == new or old.startswith(_PLACEHOLDERS):
        return ""
    return f"; cluster {current.cluster} is now called '{new}' (was '{old}': its centre moved)"


def _what_changed(
    component: Component,
    previous: Segment,
    current: Segment,
    st: CustomerState,
    x: dict[str, float],
    scores: dict[str, Any],
) -> str:
    if component is Component.LIFECYCLE:
        # At an event the idle spell is the gap it ended; at a silent moment, the idle time so far.
        idle = math.expm1(x["days_since_last_event"] or x["days_between_last_events"])
        churn = scores["churn_risk"]
        risk = "" if churn is None else f"; churn risk {churn:.2f}"
        return (
            f"lifecycle {previous.lifecycle.value} -> {current.lifecycle.value} "
            f"after {idle:.0f} days without activity{risk}"
        )
    if component is Component.PROPENSITY:
        return (
            f"purchase propensity {st.purchase_propensity:.2f}: tier "
            f"{previous.propensity_tier.value} -> {current.propensity_tier.value}"
        )
    return (
        f"behaviour now matches cluster {current.cluster} ({current.cluster_profile}), "
        f"was cluster {previous.cluster} ({previous.cluster_profile})"
    )
