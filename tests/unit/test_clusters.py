"""Clusters people can name (issue 13 item 5): warm-up over observations *and* event time, a
uniform warm-up sample, dead centres re-seeded by a split, and names unique in meaning."""

from __future__ import annotations

import random

import pytest

from stream_app.core.models import CLUSTER_FEATURES, BehaviourClusters, _unique

Row = dict[str, float]
DAY = 86400.0


def _row(level: float, rng: random.Random) -> Row:
    return {f: level + rng.gauss(0, 0.3) for f in CLUSTER_FEATURES}


@pytest.mark.parametrize(
    ("observations", "span_days", "warming_up"),
    [
        (49, 30.0, True),  # enough time, too few observations
        (500, 6.9, True),  # plenty of observations over too little event time
        (50, 7.0, False),  # both, exactly
        (500, 7.5, False),
    ],
)
def test_warm_up_needs_observations_and_event_time(
    observations: int, span_days: float, warming_up: bool
) -> None:
    clusters = BehaviourClusters(3, 0.01, seed=1, warmup=50, warmup_seconds=7 * DAY)
    rng = random.Random(0)
    step = span_days * DAY / (observations - 1)
    ids = [clusters.learn_assign(_row(i % 3, rng), i * step) for i in range(observations)]
    assert clusters.warming_up is warming_up
    if warming_up:
        assert set(ids) == {0}
        assert clusters.warmup_seen == observations
        assert len(clusters.reservoir or []) == min(observations, 50)
    else:
        assert len(set(ids)) > 1  # seeded: customers are told apart


def test_the_warm_up_sample_is_uniform_over_the_whole_warm_up() -> None:
    """Reservoir sampling: after 4,000 observations a 200-slot sample holds each one with chance
    1/20, so about half of it comes from the second half (binomial: 100 +- 7 at one std)."""
    clusters = BehaviourClusters(3, 0.01, seed=7, warmup=200, warmup_seconds=10**9)
    for i in range(4000):
        clusters.learn_assign({f: float(i) for f in CLUSTER_FEATURES}, float(i))
    sample = clusters.reservoir
    assert sample is not None and len(sample) == 200
    kept = [int(row[CLUSTER_FEATURES[0]]) for row in sample]
    assert len(set(kept)) == 200
    assert 100 - 4 * 7 <= sum(k >= 2000 for k in kept) <= 100 + 4 * 7
    assert max(kept) > 3500  # the latest observations are not locked out


def test_the_warm_up_sample_is_a_function_of_seed_and_data() -> None:
    def sample(seed: int) -> list[Row]:
        clusters = BehaviourClusters(3, 0.01, seed=seed, warmup=100, warmup_seconds=10**9)
        rng = random.Random(3)
        for i in range(1000):
            clusters.learn_assign(_row(i % 3, rng), float(i))
        assert clusters.reservoir is not None
        return clusters.reservoir

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def _starving_stream(clusters: BehaviourClusters, n: int, rng: random.Random) -> list[int]:
    """Three groups while warming up; afterwards group 2 is never seen again."""
    ids = []
    for i in range(n):
        level = (0.0, 4.0, 8.0)[i % 3] if i < 300 else (0.0, 4.0)[i % 2]
        ids.append(clusters.learn_assign(_row(level, rng), float(i)))
    return ids


def test_a_centre_that_starves_is_re_seeded_by_a_split() -> None:
    clusters = BehaviourClusters(3, 0.01, seed=1, warmup=300, min_share=0.05)
    ids = _starving_stream(clusters, 300 + 12_000, random.Random(5))
    online = [r for r in clusters.reseeds if r[0] > 0]  # (0, ...) are splits at seeding
    assert len(online) == 1
    after, dead, donor = online[0]
    # The group-2 centre starved: its decayed share fell below 5% once RECENT_HALF_LIFE
    # observations had passed since seeding, and it took over half of a live group.
    assert after >= 300 + BehaviourClusters.RECENT_HALF_LIFE
    assert dead != donor
    later = ids[after:]
    assert later.count(dead) > 0.05 * len(later)
    share = [r / sum(clusters.recent) for r in clusters.recent]
    assert min(share) >= 0.05


def test_no_re_seed_while_every_centre_is_fed() -> None:
    clusters = BehaviourClusters(3, 0.01, seed=1, warmup=300, min_share=0.05)
    rng = random.Random(5)
    for i in range(12_000):
        clusters.learn_assign(_row((0.0, 4.0, 8.0)[i % 3], rng), float(i))
    assert [r for r in clusters.reseeds if r[0] > 0] == []


def test_a_seed_that_wins_no_warm_up_point_is_split_off_at_once() -> None:
    """k-means++ with this seed puts two centres in one group, and Lloyd leaves one empty."""
    plain = BehaviourClusters(3, 0.01, seed=1, warmup=300)
    guarded = BehaviourClusters(3, 0.01, seed=1, warmup=300, min_share=0.05)
    rng_a, rng_b = random.Random(5), random.Random(5)
    for i in range(300):
        plain.learn_assign(_row((0.0, 4.0, 8.0)[i % 3], rng_a), float(i))
        guarded.learn_assign(_row((0.0, 4.0, 8.0)[i % 3], rng_b), float(i))
    assert min(plain.sizes) == 0
    assert [r[0] for r in guarded.reseeds] == [0]
    assert sorted(guarded.sizes) == [100, 100, 100]  # one centre per group


def test_without_a_min_share_a_starved_centre_is_left_alone() -> None:
    clusters = BehaviourClusters(3, 0.01, seed=1, warmup=300)
    _starving_stream(clusters, 300 + 12_000, random.Random(5))
    assert clusters.reseeds == []


@pytest.mark.parametrize(
    ("names", "words", "sticky", "expected"),
    [
        (  # the same traits in another order are one name: the later id takes a third trait
            {0: "frequent buyers, highly active", 1: "highly active, frequent buyers"},
            {
                0: ["frequent buyers", "highly active"],
                1: ["highly active", "frequent buyers", "big baskets"],
            },
            set(),
            {0: "frequent buyers, highly active", 1: "highly active, frequent buyers, big baskets"},
        ),
        (  # a cluster that keeps its name goes first, whatever its id
            {0: "dormant, quiet", 1: "dormant, quiet"},
            {0: ["dormant", "quiet", "rare buyers"], 1: ["dormant", "quiet"]},
            {1},
            {0: "dormant, quiet, rare buyers", 1: "dormant, quiet"},
        ),
        (  # traits run out: the id makes it unique
            {0: "dormant, quiet", 1: "quiet, dormant"},
            {0: ["dormant", "quiet"], 1: ["quiet", "dormant"]},
            set(),
            {0: "dormant, quiet", 1: "quiet, dormant (cluster 1)"},
        ),
    ],
)
def test_names_are_unique_in_meaning(
    names: dict[int, str], words: dict[int, list[str]], sticky: set[int], expected: dict[int, str]
) -> None:
    assert _unique(names, words, sticky) == expected


def test_names_do_not_depend_on_when_a_change_asks_for_them() -> None:
    """Named at fixed points of the learning, not when a change first needs a name: a model
    re-learned after a crash (nobody asking) names its clusters as the original did."""
    asked = BehaviourClusters(3, 0.01, seed=1, warmup=100)
    silent = BehaviourClusters(3, 0.01, seed=1, warmup=100)
    rng_a, rng_b = random.Random(9), random.Random(9)
    for i in range(2500):
        level = (0.0, 4.0, 8.0)[i % 3] + (i / 2500) * 3  # drifting: names change on the way
        asked.learn_assign(_row(level, rng_a), float(i))
        silent.learn_assign(_row(level, rng_b), float(i))
        if i % 7 == 0:
            asked.profile(i % 3)
    names = [asked.profile(c).name for c in range(3)]
    assert names == [silent.profile(c).name for c in range(3)]
    assert asked.renames == silent.renames
