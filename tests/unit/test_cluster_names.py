"""Clusters people can name (issue 13): no two clusters share a name at any time, and a name
stays while the traits it states still hold for the centre."""

from __future__ import annotations

from stream_app.core.models import CLUSTER_FEATURES, PROFILE_REFRESH, BehaviourClusters


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
