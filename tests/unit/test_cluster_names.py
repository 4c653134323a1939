"""Clusters people can name (issue 13): no two clusters share a name at any time, a name
stays while the traits it states still hold for the centre, and a change says when it did not."""

from __future__ import annotations

from datetime import timedelta

import orjson
from test_shared_learning import CLICKS, SEG, T0, decoded, events

from stream_app.core.models import (
    CLUSTER_FEATURES,
    PROFILE_REFRESH,
    BehaviourClusters,
    ClusterProfile,
    SegmentModels,
)
from stream_app.core.processor import MemoryStore, Processor
from stream_app.core.state import CustomerState


def clusters_with(centres: list[dict[str, float]]) -> BehaviourClusters:
    clusters = BehaviourClusters(k=len(centres), min_step=0.001, seed=1, warmup=10)
    clusters.reservoir = None  # seeded: name the centres below
    for cid, centre in enumerate(centres):
        for feature in CLUSTER_FEATURES:
            clusters.kmeans.centers[cid][feature] = centre.get(feature, 0.0)
    clusters.sizes = [100] * len(centres)
    return clusters


def names(clusters: BehaviourClusters) -> list[str]:
    return [clusters.profile(cid).name for cid in range(len(clusters.sizes))]


FREQUENT_ACTIVE = {"order_count": 2.0, "activity_last_month": 1.5}


def test_two_clusters_with_the_same_top_traits_get_different_names() -> None:
    clusters = clusters_with(
        [
            {**FREQUENT_ACTIVE, "total_spend": 0.9},
            {**FREQUENT_ACTIVE, "total_spend": -0.8},
            {**FREQUENT_ACTIVE},
            {"days_between_last_events": 1.2},
        ]
    )
    assert names(clusters) == [
        "frequent buyers, highly active",
        "frequent buyers, highly active, low spenders",
        "frequent buyers, highly active (cluster 2)",
        "dormant",
    ]


def test_a_name_stays_while_its_traits_hold_and_changes_when_they_do_not() -> None:
    clusters = clusters_with([{**FREQUENT_ACTIVE}, {"days_between_last_events": 1.2}])
    assert names(clusters)[0] == "frequent buyers, highly active"
    # The centre drifts: spend now leads, but both named traits still hold: the name stays.
    clusters.kmeans.centers[0]["total_spend"] = 3.0
    clusters.sizes[0] += PROFILE_REFRESH
    clusters._refresh_profiles()  # as learning does every PROFILE_REFRESH observations
    assert names(clusters)[0] == "frequent buyers, highly active"
    # Activity falls below a quarter of a standard deviation: "highly active" no longer holds.
    clusters.kmeans.centers[0]["activity_last_month"] = 0.1
    clusters.sizes[0] += PROFILE_REFRESH
    clusters._refresh_profiles()  # as learning does every PROFILE_REFRESH observations
    assert names(clusters)[0] == "high spenders, frequent buyers"
    # ... and the rename is recorded, for the report to say so.
    learned = sum(clusters.sizes)
    assert clusters.renames == [
        (learned, 0, "frequent buyers, highly active", "high spenders, frequent buyers")
    ]


def test_a_change_after_a_rename_says_the_cluster_was_renamed() -> None:
    """A customer told "cluster 2 (X)" whose cluster is later called Y sees, in their next
    change, the name they were told as the previous one and a sentence saying so; the name
    they were told is part of the stored state."""
    models = SegmentModels(SEG)
    store = MemoryStore()
    processor = Processor(SEG, models, store)
    items = events(400)
    for topic, value in items[:200]:
        processor.process(decoded(topic, value))
    members = [s.membership for c in ("c0", "c1", "c2") if (s := store.get(c)) and s.membership]
    told = [m.cluster_name for m in members]
    assert len(told) == 3 and all(n and not n.startswith("warming up") for n in told), told
    cid = members[0].cluster
    old = models.clusters.profile(cid).name
    models.clusters._profiles[cid] = ClusterProfile(cid, "renamed for the test", {})
    # Weeks of silence, then someone else's event: everyone's lifecycle moves (a change each).
    quiet = T0 + timedelta(days=200)
    body = {"event_id": "z-1", "customer_id": "z", "event_type": "product_view"}
    event = orjson.dumps({**body, "event_time": quiet.isoformat()})
    later = processor.process(decoded(CLICKS, event)).changes
    renamed = [c for c in later if c.previous and c.previous.cluster == cid == c.current.cluster]
    assert renamed, "no change of a customer in the renamed cluster"
    first = renamed[0]
    assert first.previous is not None and first.previous.cluster_profile == old
    assert first.current.cluster_profile == "renamed for the test"
    assert f"is now called 'renamed for the test' (was '{old}'" in first.reason.summary
    state = store.get(first.customer_id)
    assert state is not None and state.membership is not None
    assert CustomerState.from_bytes(state.to_bytes()).membership == state.membership
