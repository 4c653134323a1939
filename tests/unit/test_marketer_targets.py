"""The report's figures a marketer relies on, on the real Online Retail file (issue 13 targets).

A benchmark-style assertion on real data, not a timing: the scores carried by segment changes
are judged against what the file says happened next. Targets still missed are listed in the
issue notes with today's figures, and asserted here at today's level so they cannot slide back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stream_app.settings import SegmentationSettings
from stream_app.tools.datasets import read_dataset
from stream_app.tools.replay import build_report, replay_offline

RETAIL = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "datasets"
    / "online_retail"
    / "online_retail.csv.gz"
)
pytestmark = pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    result, processor, meters = replay_offline(
        read_dataset(RETAIL, "online-retail"), SegmentationSettings()
    )
    return build_report(result, processor, meters)


def test_tiers_mean_what_they_say(report: dict[str, Any]) -> None:
    rate = {t: v["bought_within_horizon"] for t, v in report["buy_rate_by_tier_entered"].items()}
    assert rate["high"] > rate["medium"] > rate["low"]
    assert rate["high"] >= 2 * rate["low"]


def test_tiers_do_not_swing_or_flap(report: dict[str, Any]) -> None:
    assert report["swing_rate"] <= 0.10
    assert report["flap_rate"] <= 0.02


def test_emitted_scores_are_calibrated(report: dict[str, Any]) -> None:
    """Issue 13: ECE <= 0.05 at every scored moment (the model's own, predict-then-learn: 0.032
    purchase, 0.045 churn) and <= 0.08 for the scores carried by changes."""
    assert report["purchase_ece"] <= 0.05
    assert report["churn_ece"] <= 0.08
    assert report["purchase_scores_emitted"]["all"]["ece"] <= 0.08
    assert report["churn_scores_emitted"]["all"]["ece"] <= 0.08


def test_emitted_scores_rank_outcomes_at_least_as_well_as_today(report: dict[str, Any]) -> None:
    """Targets: purchase >= 0.70 overall and >= 0.65 time-driven (issue 13): met, 0.710 and 0.712
    (event-triggered 0.702) with time-consistent features, a 7-day tier dwell and tiers that wait
    for 6,000 matured labels; 0.637 and 0.637 before that, 0.54 and 0.50 before the last round."""
    purchase = report["purchase_scores_emitted"]
    assert purchase["all"]["auc"] >= 0.70
    assert purchase["time"]["auc"] >= 0.70
    assert purchase["event"]["auc"] >= 0.70
    assert report["churn_scores_emitted"]["all"]["auc"] >= 0.70
    assert report["purchase_auc"] >= 0.72  # the model's own, at every moment it scores


def test_the_report_says_when_no_model_stayed_cold(report: dict[str, Any]) -> None:
    assert report["cold_start"] is None
    assert report["largest_scaled_input"]["churn"] > 10  # what clipping protects the model from


def test_every_cluster_is_a_segment_worth_targeting(report: dict[str, Any]) -> None:
    """Issue 13: no cluster under 0.5% of customers (a centre held by a handful of outliers),
    and no two clusters with one name. Met at 0.50% with cluster inputs winsorised at 3 std
    (0.43% before: 19 net refunders held a centre of their own)."""
    members = [c["members"] for c in report["clusters"]]
    assert min(members) >= 0.005 * sum(members), members
    names = [frozenset(c["profile"].split(", ")) for c in report["clusters"]]
    assert len(set(names)) == len(names), [c["profile"] for c in report["clusters"]]


def test_cluster_ids_stay_put_as_the_model_learns() -> None:
    """Issue 13: at most 2% of a fixed probe set changes cluster id between 10% checkpoints of
    the replay (0.70% with winsorised inputs, 1.65% before), probes drawn from event-time
    snapshots and from all of them (load_tests/bench_offline.py measures it the same way)."""
    from load_tests.bench_offline import _stability, instrumented_replay

    items = list(read_dataset(RETAIL, "online-retail"))
    base = instrumented_replay(items, SegmentationSettings())
    stability = _stability(items, base, {})
    assert stability["max_changed_share_after_warm_up"] <= 0.02
    assert stability["all_snapshot_probes"]["max_changed_share_after_warm_up"] <= 0.02
    assert stability["never_used_clusters_at_end"] == []
