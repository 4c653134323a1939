"""Online River models: behavioural clusters and delayed-label propensities, with snapshots.

Everything is seeded, so the same events in the same order give the same model, byte for byte.
A snapshot is a model record (stream_app/contracts/model_record.py): every learned parameter as
plain JSON, written by each class's ``to_params`` and read back by its ``from_params``.

* :class:`BehaviourClusters` scales a subset of the features (River ``StandardScaler``) and assigns
  them with River ``KMeans``. KMeans keeps its centres in a dict keyed 0..k-1 and only moves the
  closest one, so an id never renumbers; see BehaviourClusters for what keeps its meaning steady.
* :class:`Propensity` is River ``StandardScaler | LogisticRegression``. Labels arrive late; the
  caller stores the prediction made at snapshot time and hands it back with the label, so quality is
  measured predict-then-learn (progressive validation) with an exact windowed ROC AUC and log loss.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson
from numpy.typing import NDArray
from river import cluster, compose, linear_model, metrics, optim, preprocessing, utils

from stream_app.contracts.model_record import (
    AUC_BINS,
    CALIBRATION_BINS,
    MODEL_PARAMS_VERSION,
    AucParams,
    CalibrationParams,
    ClusterParams,
    LogLossParams,
    ModelParams,
    ProfileParams,
    PropensityParams,
    RenameParams,
    ReseedParams,
    ScalerParams,
    TrainerParams,
)
from stream_app.core import model_format
from stream_app.core.features import DAY, FEATURES
from stream_app.core.model_format import SnapshotError
from stream_app.settings import SegmentationSettings

WARM_UP_LABELS: Final = 200  # a propensity is "unscored" until its model has learned this many
PROFILE_REFRESH: Final = 1000  # observations between recomputing cluster profile names
# Clusters see each scaled behaviour value winsorised at +-3 std. Unbounded, a handful of
# extreme customers (net refunders at -4 std of spend) held a centre of their own: 19 members,
# 0.43% of Online Retail's customers, and ids moved more (1.65% per 10% step). At 3 std:
# 0.50% and 0.70% (load_tests/bench_offline.py; 2.5 and 3.5 std in the performance docs).
CLUSTER_INPUT_BOUND: Final = 3.0

CLUSTER_FEATURES: Final = (
    "days_between_last_events",  # at an event, what recency means: the gap it ended
    "order_count",
    "total_spend",
    "average_order_value",
    "activity_last_month",
    "browsing_velocity",
    "cart_abandonment_rate",
    "engagement_last_month",
    "session_count",
)

_TRAITS: Final[dict[str, tuple[str, str]]] = {
    "days_between_last_events": ("dormant", "recently active"),
    "order_count": ("frequent buyers", "rare buyers"),
    "total_spend": ("high spenders", "low spenders"),
    "average_order_value": ("big baskets", "small baskets"),
    "activity_last_month": ("highly active", "quiet"),
    "browsing_velocity": ("fast browsers", "slow browsers"),
    "cart_abandonment_rate": ("cart abandoners", "cart completers"),
    "engagement_last_month": ("email/push engaged", "not engaged by email/push"),
    "session_count": ("many visits", "few visits"),
}


def model_version(settings: SegmentationSettings) -> str:
    """Identifies the model family and every knob that shapes what it learns."""
    knobs = {
        "features": FEATURES,
        "cluster_features": CLUSTER_FEATURES,
        "seed": settings.seed,
        "k": settings.cluster_count,
        "min_step": settings.cluster_min_step,
        "warmup": settings.cluster_warmup,
        "warmup_days": settings.cluster_warmup_days,
        "min_share": settings.cluster_min_share,
        "lr": settings.learning_rate,
        "horizons": [settings.purchase_horizon_days, settings.churn_horizon_days],
    }
    digest = hashlib.sha256(orjson.dumps(knobs, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"river-kmeans-logreg.{digest[:10]}"


@dataclass(frozen=True, slots=True)
class ClusterProfile:
    cluster: int
    name: str
    traits: dict[str, float]  # feature -> centre, in standard deviations from the mean


Point = tuple[float, ...]  # scaled values in CLUSTER_FEATURES order


def _squared_distances(points: NDArray[np.float64], centre: Point) -> NDArray[np.float64]:
    """Squared Euclidean distance of every point (a row) to `centre`, summed feature by feature in
    CLUSTER_FEATURES order: the same float operations, in the same order, as a Python loop
    ``total = 0.0; total += delta * delta`` per point (so results are bit-identical to it)."""
    total = np.zeros(points.shape[0])
    for i, value in enumerate(centre):
        delta = points[:, i] - value
        total += delta * delta
    return total


def _scaler_params(scaler: Any) -> ScalerParams:
    """A River StandardScaler's running statistics (River floats and ints, as kept)."""
    return ScalerParams(
        counts={name: int(n) for name, n in scaler.counts.items()},
        means={name: float(value) for name, value in scaler.means.items()},
        vars={name: float(value) for name, value in scaler.vars.items()},
    )


def _scaler_from(params: ScalerParams, known: Iterable[str], where: str) -> Any:
    """A River StandardScaler holding exactly these statistics."""
    names = set(known)
    for field, stats in (("counts", params.counts), ("means", params.means), ("vars", params.vars)):
        unknown = sorted(set(stats) - names)
        if unknown:
            raise SnapshotError(
                f"model parameters: {where}.scaler.{field} has unknown feature(s) {unknown[:3]}"
            )
    scaler = preprocessing.StandardScaler()
    scaler.counts = Counter(params.counts)
    scaler.means = defaultdict(float, params.means)
    scaler.vars = defaultdict(float, params.vars)
    return scaler


def _invalid(where: str, problem: str) -> SnapshotError:
    return SnapshotError(f"model parameters: {where} {problem}")


class OrderedKMeans(cluster.KMeans):  # type: ignore[misc]
    """River KMeans with every distance summed in one fixed feature order.

    River's `predict_one` iterates a `set` of feature names, so both its lazy random draws of the
    initial centres and its float sums follow string-hash order, which changes with
    PYTHONHASHSEED: two processes would disagree. Centres are drawn up front in a fixed order here.
    """

    def __init__(self, features: tuple[str, ...], **params: Any) -> None:
        super().__init__(**params)
        self.features = features
        for cid in range(self.n_clusters):
            for name in features:
                _ = self.centers[cid][name]  # draw from the seeded RNG, in a fixed order

    def predict_one(self, x: dict[str, float]) -> int:
        best, best_distance = 0, math.inf
        for cid, centre in self.centers.items():
            distance = 0.0
            for name in self.features:
                delta = centre[name] - x[name]
                distance += delta * delta
            if distance < best_distance:
                best, best_distance = cid, distance
        return best


class BehaviourClusters:
    """Incremental KMeans over scaled behaviour, with stable ids and readable profiles.

    Measured on Online Retail (load_tests/bench_offline.py), plain online KMeans with a fixed step
    and an ever-learning scaler moved up to 38% of a fixed probe set to another id between 10%
    checkpoints: the centres tracked only their last ~70 points and the scaling drifted. So:
    the first `warmup` observations only train the River StandardScaler (everyone is cluster 0,
    "warming up"); then the scaler is frozen and the centres are seeded from those real
    observations (seeded k-means++ and a few Lloyd passes), so no centre starts at a random point
    that never wins; after that each observation moves its centre by max(1/n, min_step)
    (MacQueen's running mean, floored so a centre still follows slow drift).

    Warm-up needs `warmup` observations *and* `warmup_seconds` of event time (a scaler frozen on
    a clickstream's first hours called a 20-hour gap "dormant"); the centres are then seeded from
    a uniform sample of `warmup` of the warm-up's observations (reservoir sampling, seeded). A
    centre whose share of recent observations falls below `min_share` is dead (k-means++ can
    seed one on an outlier): it is re-seeded by splitting the cluster that spreads most, as
    Spark's StreamingKMeans splits its largest cluster, and the split is recorded.
    """

    LLOYD_PASSES: Final = 5
    RECENT_HALF_LIFE: Final = 5000.0  # observations: the window "recent" shares are taken over

    def __init__(
        self,
        k: int,
        min_step: float,
        seed: int,
        warmup: int = 5000,
        warmup_seconds: float = 0.0,
        min_share: float = 0.0,
    ) -> None:
        self.scaler = preprocessing.StandardScaler()
        self.kmeans = OrderedKMeans(CLUSTER_FEATURES, n_clusters=k, halflife=min_step, seed=seed)
        self.sizes = [0] * k
        self.seed = seed
        self.warmup = warmup
        self.warmup_seconds = warmup_seconds
        self.min_share = min_share
        self.reservoir: list[dict[str, float]] | None = []
        self.warmup_seen = 0  # observations during the warm-up (the reservoir keeps `warmup`)
        self.first_seen_at: float | None = None  # event time of the earliest observation
        self.recent = [0.0] * k  # observations per cluster, decayed by RECENT_HALF_LIFE
        self.spread = [[0.0] * len(CLUSTER_FEATURES) for _ in range(k)]  # variance per feature
        self.since_reseed = 0  # observations since the centres were seeded or last re-seeded
        self.forgotten = 0  # observations of centres since re-seeded
        # (observations so far, dead cluster, cluster split to re-seed it)
        self.reseeds: list[tuple[int, int, int]] = []
        self._profiles: dict[int, ClusterProfile] = {}
        self._profiled_at = 0
        # (observations so far, cluster, old name, new name): names change only when a centre
        # really moved, and then the report says so.
        self.renames: list[tuple[int, int, str, str]] = []

    @property
    def learned(self) -> int:
        """Observations learned since seeding (a re-seeded centre's count restarts at 0)."""
        return sum(self.sizes) + self.forgotten

    @property
    def warming_up(self) -> bool:
        return self.reservoir is not None

    def _seed_centres(self, raw: list[dict[str, float]]) -> None:
        """Seeded k-means++ and LLOYD_PASSES Lloyd passes over the warm-up observations.

        Vectorised with numpy (the pure-Python loops stalled a live worker for ~0.5 s at the
        warm-up's end: the p99 tail of the load tests), with every sum in the loops' order, so the
        centres are bit-identical to them (tests/unit/test_models.py keeps the loops as oracle).
        """
        points = self._scaled_rows(raw)
        rows: list[Point] = [tuple(row) for row in points.tolist()]
        rng = random.Random(self.seed)
        k = self.kmeans.n_clusters
        centres = [rows[rng.randrange(len(rows))]]
        nearest = _squared_distances(points, centres[0])
        while len(centres) < k:
            weights = nearest.tolist()
            total = sum(weights)
            pick = rng.choices(rows, weights=weights)[0] if total > 0 else rng.choice(rows)
            centres.append(pick)
            nearest = np.minimum(nearest, _squared_distances(points, pick))
        closest, counts = self._lloyd(points, centres)
        for _ in range(k if self.min_share > 0 else 0):  # a starved seed is split off at once
            spread = _spreads(points, closest, centres, k)
            dead = min(range(k), key=counts.__getitem__)
            if counts[dead] >= self.min_share * len(rows):
                break
            donor = _donor(counts, spread, dead)
            centres[dead] = _split(centres[donor], spread[donor])
            self.reseeds.append((0, dead, donor))
            closest, counts = self._lloyd(points, centres)
        for cid in range(k):
            for f, value in zip(CLUSTER_FEATURES, centres[cid], strict=True):
                self.kmeans.centers[cid][f] = value
        self.sizes = counts
        self.recent = [float(n) for n in counts]
        self.spread = _spreads(points, closest, centres, k)
        self._refresh_profiles()

    def _lloyd(
        self, points: NDArray[np.float64], centres: list[Point]
    ) -> tuple[NDArray[np.intp], list[int]]:
        """LLOYD_PASSES passes, in place; the last assignment and its counts per centre."""
        k = len(centres)
        closest = np.zeros(points.shape[0], dtype=np.intp)
        counts = [0] * k
        for _ in range(self.LLOYD_PASSES):
            distances = np.stack([_squared_distances(points, c) for c in centres], axis=1)
            closest = np.argmin(distances, axis=1)  # the lowest id on a tie
            counts = np.bincount(closest, minlength=k).tolist()
            sums = [
                np.bincount(closest, weights=points[:, i], minlength=k)
                for i in range(len(CLUSTER_FEATURES))
            ]
            for cid in range(k):
                if counts[cid]:
                    centres[cid] = tuple(float(column[cid]) / counts[cid] for column in sums)
        return closest, counts

    def _scaled_rows(self, raw: list[dict[str, float]]) -> NDArray[np.float64]:
        """`_scaled` of many observations at once, one row each: River StandardScaler's formula,
        ``(x - mean) / var ** 0.5`` (0 where the variance is 0), the same float operations, then
        the same bound."""
        means, variances = self.scaler.means, self.scaler.vars
        columns = []
        for f in CLUSTER_FEATURES:
            values = np.array([x[f] for x in raw], dtype=np.float64)
            spread = variances[f] ** 0.5  # a Python float power, as River computes it
            columns.append((values - means[f]) / spread if variances[f] else np.zeros(len(raw)))
        bound = CLUSTER_INPUT_BOUND
        rows: NDArray[np.float64] = np.clip(np.stack(columns, axis=1), -bound, bound)
        return rows

    def _scaled(self, features: dict[str, float]) -> dict[str, float]:
        scaled: dict[str, float] = self.scaler.transform_one(
            {f: features[f] for f in CLUSTER_FEATURES}
        )
        bound = CLUSTER_INPUT_BOUND
        return {f: min(bound, max(-bound, value)) for f, value in scaled.items()}

    def learn_assign(self, features: dict[str, float], at: float = 0.0) -> int:
        """Learn from one observation made at event time `at`; return the closest cluster id."""
        if self.reservoir is not None:
            return self._warm_up(features, at)
        scaled = self._scaled(features)
        cid: int = self.kmeans.predict_one(scaled)
        self.sizes[cid] += 1
        step = max(1.0 / self.sizes[cid], self.kmeans.halflife)
        centre = self.kmeans.centers[cid]
        spread = self.spread[cid]
        for i, f in enumerate(CLUSTER_FEATURES):
            delta = scaled[f] - centre[f]
            centre[f] += step * delta
            spread[i] += step * (delta * delta - spread[i])
        self._count_recent(cid)
        if self.learned - self._profiled_at >= PROFILE_REFRESH:
            self._refresh_profiles()
        return cid

    def _warm_up(self, features: dict[str, float], at: float) -> int:
        reservoir = self.reservoir
        assert reservoir is not None
        raw = {f: features[f] for f in CLUSTER_FEATURES}
        self.scaler.learn_one(raw)
        self.warmup_seen += 1
        if len(reservoir) < self.warmup:
            reservoir.append(raw)
        else:  # Algorithm R: every observation so far is in the sample with equal chance
            slot = _draw(self.seed, self.warmup_seen)
            if slot < self.warmup:
                reservoir[slot] = raw
        if self.first_seen_at is None or at < self.first_seen_at:
            self.first_seen_at = at
        waited = at - self.first_seen_at >= self.warmup_seconds
        if self.warmup_seen < self.warmup or not waited:
            return 0
        self.reservoir = None
        self._seed_centres(reservoir)  # counts this observation in its cluster's size
        return self.assign(features)

    def _count_recent(self, cid: int) -> None:
        """Decayed share of recent observations; a centre that starves is re-seeded."""
        keep = 0.5 ** (1.0 / self.RECENT_HALF_LIFE)
        recent = self.recent
        for i in range(len(recent)):
            recent[i] *= keep
        recent[cid] += 1.0
        self.since_reseed += 1
        if self.min_share <= 0 or self.since_reseed < self.RECENT_HALF_LIFE:
            return
        dead = min(range(len(recent)), key=recent.__getitem__)
        if recent[dead] < self.min_share * sum(recent):
            self._reseed(dead)

    def _reseed(self, dead: int) -> None:
        """Re-seed a starved centre by a split of the cluster that spreads most."""
        donor = _donor(self.recent, self.spread, dead)
        source, target = self.kmeans.centers[donor], self.kmeans.centers[dead]
        point = _split(tuple(float(source[f]) for f in CLUSTER_FEATURES), self.spread[donor])
        for f, value in zip(CLUSTER_FEATURES, point, strict=True):
            target[f] = value
        self.reseeds.append((self.learned, dead, donor))
        self.forgotten += self.sizes[dead]
        self.spread[dead] = list(self.spread[donor])
        # A weight, so the first members do not drag the new centre onto themselves (a step of
        # 1/1) and away into the donor's core: it takes the tail it was placed on.
        self.sizes[dead] = max(1, round(SPLIT_PRIOR * self.sizes[donor]))
        self.forgotten -= self.sizes[dead]
        self.recent[dead] = 0.0
        self.since_reseed = 0
        self._refresh_profiles()

    def assign(self, features: dict[str, float]) -> int:
        """Closest cluster without learning (for probes and time-driven re-scoring)."""
        if self.reservoir is not None:
            return 0
        cid: int = self.kmeans.predict_one(self._scaled(features))
        return cid

    def profile(self, cid: int) -> ClusterProfile:
        """Readable profile of a cluster (named at seeding, at a re-seed and every
        PROFILE_REFRESH observations as it learns)."""
        if not self._profiles:
            self._profiles = self._describe_all()
        return self._profiles[cid]

    def _refresh_profiles(self) -> None:
        """Names are part of what the model learned, at fixed points of its input: computed
        when a change first needed one, they depended on when changes happened, so a model
        re-learned after a crash named its clusters differently (issue 14)."""
        self._profiles = self._describe_all()
        self._profiled_at = self.learned

    def _describe_all(self) -> dict[int, ClusterProfile]:
        """Every cluster's profile at once, so names are unique at any time (a move between two
        clusters both called "frequent buyers, highly active" told a marketer nothing) and
        sticky: a cluster keeps its name while every trait in it still holds for its centre, so
        a name changes only when the centre really moved."""
        k = len(self.sizes)
        if self.reservoir is not None:
            return {
                c: ClusterProfile(c, "warming up (too little data to profile)", {})
                for c in range(k)
            }
        kept: dict[int, str] = self.__dict__.setdefault("_names", {})
        traits: dict[int, dict[str, float]] = {}
        words: dict[int, list[str]] = {}
        for cid in range(k):
            centre = self.kmeans.centers[cid]
            traits[cid] = {f: round(float(centre[f]), 3) for f in CLUSTER_FEATURES}
            ranked = sorted(traits[cid].items(), key=lambda kv: (-abs(kv[1]), kv[0]))
            words[cid] = [_TRAITS[f][0 if z > 0 else 1] for f, z in ranked if abs(z) >= 0.25]
        names: dict[int, str] = {}
        sticky: set[int] = set()
        for cid in range(k):
            old = kept.get(cid)
            if old is not None and set(old.split(", ")) <= set(words[cid]):
                names[cid] = old
                sticky.add(cid)
            else:
                names[cid] = ", ".join(words[cid][:2]) or "typical customers"
        names = _unique(names, words, sticky)
        if "renames" not in self.__dict__:  # restored from a snapshot written before it existed
            self.renames = []
        learned = self.learned
        for cid, name in names.items():
            if kept.get(cid, name) != name:  # the centre moved: say so (the report lists these)
                self.renames.append((learned, cid, kept[cid], name))
        kept.clear()
        kept.update(names)
        return {
            cid: ClusterProfile(
                cid, names[cid] if self.sizes[cid] else "no members yet", traits[cid]
            )
            for cid in range(k)
        }

    def explain(self, features: dict[str, float], top: int) -> list[tuple[str, float, float]]:
        """(feature, scaled value, scaled value x centre) for the features that place a customer."""
        cid = self.assign(features)
        scaled = self._scaled(features)
        centre = self.kmeans.centers[cid]
        rows = [(f, scaled[f], scaled[f] * float(centre[f])) for f in CLUSTER_FEATURES]
        rows.sort(key=lambda r: (-abs(r[2]), r[0]))
        return rows[:top]

    # --- serialisation: a new learned attribute goes in ClusterParams, here and in from_params

    def to_params(self) -> ClusterParams:
        """Every learned number, as the model record carries it."""
        k = self.kmeans.n_clusters
        kept: dict[int, str] = self.__dict__.get("_names", {})
        return ClusterParams(
            scaler=_scaler_params(self.scaler),
            centres=[
                [float(self.kmeans.centers[cid][f]) for f in CLUSTER_FEATURES] for cid in range(k)
            ],
            sizes=[int(n) for n in self.sizes],
            reservoir=None
            if self.reservoir is None
            else [[float(x[f]) for f in CLUSTER_FEATURES] for x in self.reservoir],
            names=[kept[cid] for cid in sorted(kept)],
            profiles=[
                ProfileParams(
                    name=profile.name,
                    traits=[
                        float(profile.traits[f]) for f in CLUSTER_FEATURES if f in profile.traits
                    ],
                )
                for _, profile in sorted(self._profiles.items())
            ],
            profiled_at=self._profiled_at,
            renames=[
                RenameParams(observations=at, cluster=cid, old=old, new=new)
                for at, cid, old, new in self.renames
            ],
            warmup_seen=self.warmup_seen,
            first_seen_at=self.first_seen_at,
            recent=[float(r) for r in self.recent],
            spread=[[float(v) for v in row] for row in self.spread],
            since_reseed=self.since_reseed,
            forgotten=self.forgotten,
            reseeds=[
                ReseedParams(observations=n, cluster=dead, donor=donor)
                for n, dead, donor in self.reseeds
            ],
        )

    @classmethod
    def from_params(
        cls,
        params: ClusterParams,
        k: int,
        min_step: float,
        seed: int,
        warmup: int,
        warmup_seconds: float = 0.0,
        min_share: float = 0.0,
    ) -> BehaviourClusters:
        """Clusters with these knobs and exactly these learned numbers (SnapshotError if they
        do not fit the knobs)."""
        width = len(CLUSTER_FEATURES)
        if len(params.centres) != k or any(len(row) != width for row in params.centres):
            raise _invalid("clusters.centres", f"must be {k} centres of {width} values")
        if len(params.sizes) != k:
            raise _invalid("clusters.sizes", f"must have {k} values")
        if params.reservoir is not None:
            if len(params.reservoir) > warmup:
                raise _invalid("clusters.reservoir", f"must hold at most {warmup} rows")
            if any(len(row) != width for row in params.reservoir):
                raise _invalid("clusters.reservoir", f"rows must have {width} values")
        if len(params.names) not in (0, k):
            raise _invalid("clusters.names", f"must be empty or {k} names")
        if len(params.profiles) not in (0, k) or any(
            len(p.traits) not in (0, width) for p in params.profiles
        ):
            raise _invalid("clusters.profiles", f"must be empty or {k} of 0 or {width} traits")
        if any(r.cluster >= k for r in params.renames):
            raise _invalid("clusters.renames", f"must name clusters below {k}")
        if any(r.cluster >= k or r.donor >= k for r in params.reseeds):
            raise _invalid("clusters.reseeds", f"must name clusters below {k}")
        if len(params.recent) != k:
            raise _invalid("clusters.recent", f"must have {k} values")
        if len(params.spread) != k or any(len(row) != width for row in params.spread):
            raise _invalid("clusters.spread", f"must be {k} rows of {width} values")
        clusters = cls(k, min_step, seed, warmup, warmup_seconds, min_share)
        clusters.scaler = _scaler_from(params.scaler, CLUSTER_FEATURES, "clusters")
        for cid, row in enumerate(params.centres):
            centre = clusters.kmeans.centers[cid]
            for f, value in zip(CLUSTER_FEATURES, row, strict=True):
                centre[f] = value
        clusters.sizes = list(params.sizes)
        clusters.reservoir = (
            None
            if params.reservoir is None
            else [dict(zip(CLUSTER_FEATURES, row, strict=True)) for row in params.reservoir]
        )
        if params.names:
            clusters.__dict__["_names"] = dict(enumerate(params.names))
        clusters._profiles = {
            cid: ClusterProfile(
                cid, p.name, dict(zip(CLUSTER_FEATURES[: len(p.traits)], p.traits, strict=True))
            )
            for cid, p in enumerate(params.profiles)
        }
        clusters._profiled_at = params.profiled_at
        clusters.renames = [(r.observations, r.cluster, r.old, r.new) for r in params.renames]
        clusters.warmup_seen = params.warmup_seen
        clusters.first_seen_at = params.first_seen_at
        clusters.recent = list(params.recent)
        clusters.spread = [list(row) for row in params.spread]
        clusters.since_reseed = params.since_reseed
        clusters.forgotten = params.forgotten
        clusters.reseeds = [(r.observations, r.cluster, r.donor) for r in params.reseeds]
        return clusters


def _draw(seed: int, n: int) -> int:
    """A seeded uniform draw from range(n), a pure function of (seed, n): no RNG state to keep."""
    digest = hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


SPLIT_OFFSET: Final = 2.0  # a re-seeded centre sits this many stds out along the split
SPLIT_PRIOR: Final = 0.3  # a re-seeded centre starts with this share of the donor's weight


def _donor(weights: list[float] | list[int], spreads: list[list[float]], dead: int) -> int:
    """The cluster to split: the most observations x widest variance (the lowest id on a tie)."""
    others = [c for c in range(len(weights)) if c != dead]
    return max(others, key=lambda c: (weights[c] * max(spreads[c]), -c))


def _split(centre: Point, spread: list[float]) -> Point:
    """A point SPLIT_OFFSET stds out from `centre` along its widest feature (Spark's
    StreamingKMeans splits its largest cluster the same way, with a tiny offset); the donor
    keeps its centre, so only the members on that side move."""
    widest = max(range(len(spread)), key=lambda i: (spread[i], -i))
    moved = list(centre)
    moved[widest] += SPLIT_OFFSET * spread[widest] ** 0.5
    return tuple(moved)


def _spreads(
    points: NDArray[np.float64], closest: NDArray[np.intp], centres: list[Point], k: int
) -> list[list[float]]:
    """Each cluster's variance per feature around its centre (0 for an empty cluster)."""
    out = []
    for cid in range(k):
        members = points[closest == cid]
        if not len(members):
            out.append([0.0] * points.shape[1])
            continue
        deviation = members - np.array(centres[cid])
        out.append([float(v) for v in (deviation * deviation).mean(axis=0)])
    return out


def _unique(names: dict[int, str], words: dict[int, list[str]], sticky: set[int]) -> dict[int, str]:
    """Two clusters never share a name (nor the same traits in another order). A cluster that
    keeps its name goes first; then by id: a later holder of a taken name takes more of its own
    traits, and if its traits run out, its id."""
    out = dict(names)
    order = sorted(out, key=lambda c: (c not in sticky, c))
    for rank, cid in enumerate(order):
        taken = {_meaning(out[other]) for other in order[:rank]}
        if _meaning(out[cid]) not in taken:
            continue
        others = {_meaning(name) for name in out.values()}
        for n in range(3, len(words[cid]) + 1):
            longer = ", ".join(words[cid][:n])
            if _meaning(longer) not in taken and _meaning(longer) not in others:
                out[cid] = longer
                break
        else:
            out[cid] = f"{out[cid]} (cluster {cid})"
    return out


def _meaning(name: str) -> frozenset[str]:
    """What a name says, whatever the order of its traits ("frequent buyers, highly active" and
    "highly active, frequent buyers" are one name to a marketer)."""
    return frozenset(name.split(", "))


def _by_effect(row: tuple[str, float, float]) -> tuple[float, str]:
    return -abs(row[2]), row[0]


class TieAwareROCAUC:
    """Cumulative ROC AUC over a histogram of scores (resolution 1e-4), ties counted as half.

    River's RollingROCAUC miscounts tied scores (ten alternating labels all scored 0.5 give 0.4,
    not 0.5), and an untrained logistic model scores exactly 0.5, so its early AUC was biased
    low; River's ROCAUC with thresholds is too coarse at low base rates (NOTES-river section 3).
    Constant memory, O(1) update, O(bins) read.
    """

    BINS: Final = AUC_BINS  # 10,000 (the model record's bins)

    def __init__(self) -> None:
        self.positives = [0] * (self.BINS + 1)
        self.negatives = [0] * (self.BINS + 1)

    def update(self, outcome: bool, score: float) -> None:
        index = min(self.BINS, max(0, round(score * self.BINS)))
        (self.positives if outcome else self.negatives)[index] += 1

    def get(self) -> float | None:
        total_pos, total_neg = sum(self.positives), sum(self.negatives)
        if not total_pos or not total_neg:
            return None
        below, wins = 0, 0.0
        for pos, neg in zip(self.positives, self.negatives, strict=True):
            wins += pos * (below + 0.5 * neg)
            below += neg
        return wins / (total_pos * total_neg)

    def to_params(self) -> AucParams:
        return AucParams(positives=_runs(self.positives), negatives=_runs(self.negatives))

    @classmethod
    def from_params(cls, params: AucParams, where: str) -> TieAwareROCAUC:
        auc = cls()
        for name, runs, bins in (
            ("positives", params.positives, auc.positives),
            ("negatives", params.negatives, auc.negatives),
        ):
            end = 0  # the first bin a next run may start at
            for first, *counts in runs:
                if first < end:
                    raise _invalid(f"{where}.auc.{name}", "runs must be in bin order, apart")
                bins[first : first + len(counts)] = counts
                end = first + len(counts) + 1
        return auc


def _runs(bins: list[int]) -> list[list[int]]:
    """The runs of consecutive non-empty bins, each as [first bin, count, count, ...]."""
    runs: list[list[int]] = []
    previous = -2
    for index, count in enumerate(bins):
        if not count:
            continue
        if index == previous + 1:
            runs[-1].append(count)
        else:
            runs.append([index, count])
        previous = index
    return runs


SCALED_INPUT_BOUND: Final = 10.0  # standard deviations; beyond it a value is out of range


MIN_SPREAD: Final = 0.1  # in feature units (log1p days, counts, rates): a floor under the std


def _robustly_scaled(scaler: Any, features: dict[str, float]) -> dict[str, float]:
    """River StandardScaler's ``(x - mean) / std`` with a floor under the std: a feature the
    model has only seen nearly constant (activity in the last hour at silent checkpoints) would
    otherwise turn an ordinary value into a hundred thousand standard deviations."""
    means, variances = scaler.means, scaler.vars
    return {
        name: (value - means[name]) / max(variances[name] ** 0.5, MIN_SPREAD)
        for name, value in features.items()
    }


def _clipped(scaled: dict[str, float]) -> dict[str, float]:
    """No input beyond +-10 std reaches the model or an explanation: a silent customer's
    `activity_last_hour` was scored at -14 million std (issue 13)."""
    bound = SCALED_INPUT_BOUND
    return {name: min(bound, max(-bound, value)) for name, value in scaled.items()}


@dataclass(frozen=True, slots=True)
class Assessment:
    """One propensity model's view of one feature vector: its scaled inputs and the probability.

    Scaling once and reusing it for the score and its explanation is what keeps a segment change
    cheap; the model must not learn between the two (the processor learns before it scores).
    """

    scaled: dict[str, float]
    probability: float


class Calibration:
    """Expected calibration error, predict-then-learn, in constant space: CALIBRATION_BINS
    equal-width bins of the predicted probability, each with its count, the sum of its
    predictions and its positives (the offline audit's `expected_calibration_error`, kept
    as a stream)."""

    def __init__(self) -> None:
        self.counts = [0] * CALIBRATION_BINS
        self.predicted = [0.0] * CALIBRATION_BINS
        self.positives = [0] * CALIBRATION_BINS

    def update(self, outcome: bool, predicted: float) -> None:
        b = min(int(predicted * CALIBRATION_BINS), CALIBRATION_BINS - 1)
        self.counts[b] += 1
        self.predicted[b] += predicted
        self.positives[b] += int(outcome)

    def get(self) -> float | None:
        """The expected calibration error (None before any label)."""
        total = sum(self.counts)
        if not total:
            return None
        return sum(
            abs(p / n - k / n) * n / total
            for n, p, k in zip(self.counts, self.predicted, self.positives, strict=True)
            if n
        )

    def to_params(self) -> CalibrationParams:
        return CalibrationParams(
            counts=list(self.counts), predicted=list(self.predicted), positives=list(self.positives)
        )

    @classmethod
    def from_params(cls, params: CalibrationParams, where: str) -> Calibration:
        if any(k > n for n, k in zip(params.counts, params.positives, strict=True)):
            raise _invalid(f"{where}.calibration", "has more positives than labels in a bin")
        calibration = cls()
        calibration.counts = list(params.counts)
        calibration.predicted = [float(p) for p in params.predicted]
        calibration.positives = list(params.positives)
        return calibration


class Propensity:
    """Online logistic regression for one binary outcome, evaluated predict-then-learn.

    The River pipeline (``StandardScaler | LogisticRegression``) is the model; its two steps are
    called directly, exactly as ``Pipeline.predict_proba_one`` and ``learn_one`` call them, so the
    scaled vector can be kept for the explanation instead of being computed again.
    """

    # The largest |scaled input| the model was asked to score: a diagnostic for the report
    # (inputs far outside what the model learned from make scores meaningless). A class default,
    # so a model restored from a snapshot written before it existed reads 0.
    largest_scaled_input: float = 0.0

    def __init__(self, learning_rate: float) -> None:
        self.model = compose.Pipeline(
            preprocessing.StandardScaler(),
            linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate)),
        )
        self.auc = TieAwareROCAUC()
        self.log_loss = metrics.LogLoss()
        self.calibration = Calibration()
        self.labels = 0
        self.positives = 0

    @property
    def warmed_up(self) -> bool:
        return self.labels >= WARM_UP_LABELS

    def assess(self, features: dict[str, float]) -> Assessment:
        """Scale the features and score them (no learning)."""
        scaler, logreg = self.model.steps.values()
        raw = _robustly_scaled(scaler, features)
        largest = max(map(abs, raw.values()), default=0.0)
        self.largest_scaled_input = max(self.largest_scaled_input, largest)
        scaled = _clipped(raw)
        proba: dict[bool, float] = logreg.predict_proba_one(scaled)
        return Assessment(scaled, float(proba.get(True, 0.0)))

    def score(self, features: dict[str, float]) -> float:
        return self.assess(features).probability

    def learn(self, features: dict[str, float], outcome: bool, predicted: float) -> None:
        """Score the prediction made back then against the outcome, then learn from it."""
        self.auc.update(outcome, predicted)
        self.log_loss.update(outcome, predicted)
        self.calibration.update(outcome, predicted)
        scaler, logreg = self.model.steps.values()
        scaler.learn_one(features)
        logreg.learn_one(_clipped(_robustly_scaled(scaler, features)), outcome)
        self.labels += 1
        self.positives += int(outcome)

    def contributions(self, features: dict[str, float], top: int) -> list[tuple[str, float, float]]:
        """(feature, scaled value, coefficient x scaled value), largest effect first."""
        return self.explain(self.assess(features), top)

    def explain(self, assessment: Assessment, top: int) -> list[tuple[str, float, float]]:
        """`contributions` of an assessment made since the model last learned."""
        scaled = assessment.scaled
        weights = self.model["LogisticRegression"].weights
        rows = [(f, float(scaled[f]), float(weights.get(f, 0.0) * scaled[f])) for f in FEATURES]
        rows.sort(key=_by_effect)
        return rows[:top]

    # --- serialisation: a new learned attribute goes in PropensityParams, here and in from_params

    def to_params(self) -> PropensityParams:
        """Every learned number, as the model record carries it: the scaler, the logistic
        regression's weights, intercept and SGD step count (its learning rates are constant
        knobs, L1/L2 are off, so nothing else in River's model changes what it learns next),
        and the quality measures."""
        scaler, logreg = self.model.steps.values()
        mean = self.log_loss._mean  # River's stats.Mean: weight n, value _mean
        return PropensityParams(
            scaler=_scaler_params(scaler),
            weights={name: float(w) for name, w in logreg.weights.items()},
            intercept=float(logreg.intercept),
            iterations=int(logreg.optimizer.n_iterations),
            auc=self.auc.to_params(),
            log_loss=LogLossParams(n=float(mean.n), mean=float(mean._mean)),
            labels=self.labels,
            positives=self.positives,
            largest_scaled_input=float(self.largest_scaled_input),
            calibration=self.calibration.to_params(),
        )

    @classmethod
    def from_params(cls, params: PropensityParams, learning_rate: float, where: str) -> Propensity:
        if params.positives > params.labels:
            raise _invalid(where, "has more positives than labels")
        auc = TieAwareROCAUC.from_params(params.auc, where)
        if (sum(auc.positives), sum(auc.negatives)) != (
            params.positives,
            params.labels - params.positives,
        ):
            raise _invalid(f"{where}.auc", "does not count the labels and positives")
        unknown = sorted(set(params.weights) - set(FEATURES))
        if unknown:
            raise _invalid(f"{where}.weights", f"has unknown feature(s) {unknown[:3]}")
        propensity = cls(learning_rate)
        scaler = _scaler_from(params.scaler, FEATURES, where)
        logreg = propensity.model["LogisticRegression"]
        logreg._weights = utils.VectorDict(dict(params.weights))
        logreg.intercept = params.intercept
        logreg.optimizer.n_iterations = params.iterations
        propensity.model = compose.Pipeline(scaler, logreg)
        propensity.auc = auc
        propensity.log_loss._mean.n = params.log_loss.n
        propensity.log_loss._mean._mean = params.log_loss.mean
        propensity.labels = params.labels
        propensity.positives = params.positives
        if params.largest_scaled_input:
            propensity.largest_scaled_input = params.largest_scaled_input
        if params.calibration is not None:
            propensity.calibration = Calibration.from_params(params.calibration, where)
        return propensity

    def quality(self) -> dict[str, Any]:
        auc = self.auc.get()
        return {
            "labels": self.labels,
            "positive_rate": round(self.positives / self.labels, 4) if self.labels else None,
            "roc_auc": None if auc is None else round(auc, 4),
            "log_loss": round(float(self.log_loss.get()), 4) if self.labels else None,
            "ece": None if (ece := self.calibration.get()) is None else round(ece, 4),
        }


class SegmentModels:
    """The model set of one worker: clusters, purchase propensity and churn risk."""

    def __init__(self, settings: SegmentationSettings) -> None:
        self.settings = settings
        self.version = model_version(settings)
        self.clusters = BehaviourClusters(
            settings.cluster_count,
            settings.cluster_min_step,
            settings.seed,
            settings.cluster_warmup,
            settings.cluster_warmup_days * DAY,
            settings.cluster_min_share,
        )
        self.purchase = Propensity(settings.learning_rate)
        self.churn = Propensity(settings.learning_rate)
        self.trainer: TrainerParams | None = None  # how far a shared trainer had learned
        # What a change says scored it: the knob digest while one process learns as it scores;
        # a shared version's content id (set by whoever follows the published versions).
        self.stamp = self.version

    def to_params(self) -> ModelParams:
        return ModelParams(
            schema_version=MODEL_PARAMS_VERSION,
            knobs=self.version,
            clusters=self.clusters.to_params(),
            purchase=self.purchase.to_params(),
            churn=self.churn.to_params(),
            trainer=self.trainer,
        )

    def encoded(self) -> bytes:
        """The canonical encoding of every learned parameter (what the content id hashes)."""
        return model_format.encode_params(self.to_params())

    def content_version(self) -> str:
        """``<knob digest>.<first 12 hex of sha256(learned numbers)>``: equal models share it,
        models with different learned numbers never do (the trainer's bookkeeping is not
        part of it)."""
        return model_format.content_version(self.to_params())

    def snapshot(self, signing_key: bytes | None = None) -> bytes:
        """A model record of every learned parameter, signed (HMAC-SHA256) if given a key."""
        return model_format.encode_record(self.to_params(), signing_key)

    def restore(self, data: bytes, signing_keys: Sequence[bytes] = ()) -> None:
        """Load a model record of the same knobs; refuse anything else (SnapshotError, one
        line) and then change nothing. `signing_keys`: see model_format.decode_record."""
        params = model_format.decode_record(data, self.version, signing_keys)
        s = self.settings
        clusters = BehaviourClusters.from_params(
            params.clusters,
            s.cluster_count,
            s.cluster_min_step,
            s.seed,
            s.cluster_warmup,
            s.cluster_warmup_days * DAY,
            s.cluster_min_share,
        )
        purchase = Propensity.from_params(params.purchase, s.learning_rate, "purchase")
        churn = Propensity.from_params(params.churn, s.learning_rate, "churn")
        self.clusters, self.purchase, self.churn = clusters, purchase, churn
        self.trainer = params.trainer
