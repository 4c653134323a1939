"""Offline benchmark on the real datasets: replay throughput, propensity quality against offline
baselines, and cluster-id stability.

Run: ``.venv/bin/python -m load_tests.bench_offline [--out load_tests/results/offline.json]``

1. Throughput: ``replay_offline`` over the whole Online Retail file and the REES46 sample, median
   of 3 runs each. "process" = the report's ``process_seconds`` (time inside ``Processor``);
   "wall" = reading + parsing + sorting the file + replay. The datasets module's parse caches are
   process-global ``lru_cache``s, so they are cleared before every run (a real replay is a fresh
   process); otherwise runs 2 and 3 would parse with warm caches.
   One more replay of each times River's own calls (``RIVER_CALLS``: scaler transform/learn,
   logistic scoring/learning, the KMeans assignment), less the timer's cost: what per-event
   learning costs however fast everything else is (``river_us_per_event``).
2. Propensity: one instrumented Online Retail replay records every delayed label the processor
   learns from (``Propensity.learn`` wrapped on the processor's models) with its snapshot time,
   taken from the snapshot itself (``snap[0]``) by wrapping ``Processor._expire`` and matched to
   the learn calls in order (each learn's ``predicted`` is checked against the snapshot's).
   Labelled snapshots are split by snapshot time (first 70% train, last 30% test); the online
   model's predictions made back then are scored on the test part (honest progressive score) and
   compared with scikit-learn models fitted on the train part with hindsight.
3. Cluster stability: in the same replay the clusters are deep-copied after every 10% of events;
   a fixed probe set (a seeded sample of distinct labelled purchase snapshots from the whole year)
   is assigned with ``BehaviourClusters.assign`` (no learning) at every checkpoint. Each step's
   change is split into scaler-only and centres-only parts. If more than 2% of ids change, the
   same probes are measured under alternative cluster settings and under two benchmark-only
   simulations of code changes (a BehaviourClusters subclass; stream_app itself is untouched).

The instrumented replay is checked to give the same report as a plain one.

Everything but the timings is deterministic (seeded sample, seeded estimators, seeded models).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import gzip
import io
import itertools
import json
import math
import random
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from unittest import mock

from river import linear_model, preprocessing
from sklearn.ensemble import HistGradientBoostingClassifier  # type: ignore[import-untyped]
from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]
from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped]
from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

from load_tests.measure import percentile
from stream_app.contracts.events import Event
from stream_app.core.features import FEATURES
from stream_app.core.models import CLUSTER_FEATURES, BehaviourClusters, OrderedKMeans, SegmentModels
from stream_app.core.processor import MemoryStore, Outcome, Position, Processor
from stream_app.core.state import Snapshot
from stream_app.settings import SegmentationSettings
from stream_app.tools import datasets, replay
from stream_app.tools.datasets import DatasetFormat, RowError, read_dataset
from stream_app.tools.replay import build_report, replay_offline

DATASETS: Final = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RETAIL: Final = DATASETS / "online_retail" / "online_retail.csv.gz"
REES46: Final = DATASETS / "rees46_2019oct_head" / "events.csv.gz"
DEFAULT_OUT: Final = Path(__file__).resolve().parent / "results" / "offline.json"

SEED: Final = 42
RUNS: Final = 3
TRAIN_SHARE: Final = 0.7
MIN_CLASS_LABELS: Final = 50  # per class, in both train and test, to evaluate an outcome
CHECKPOINTS: Final = 10  # clusters copied after every 10% of events
WARM_UP_PERCENT: Final = 30  # stability pairs are judged from this checkpoint on
PROBES: Final = 2000
STABILITY_LIMIT: Final = 0.02
# Settings tried when ids are unstable with the defaults (only cluster knobs change).
ALTERNATIVES: Final[tuple[dict[str, Any], ...]] = (
    {"cluster_min_step": 0.0005},
    {"cluster_warmup": 8000},
)
# Code changes (not settings), simulated here only by a BehaviourClusters subclass: the scaler
# learns during warm-up only; centre step "fixed" = the halflife setting, "1/n" = MacQueen.
# The fix it once simulated (frozen scaler, 1/n centre steps) is now BehaviourClusters itself.
SIMULATED_FIXES: Final[tuple[tuple[str, dict[str, Any]], ...]] = ()


# --- helpers ----------------------------------------------------------------------------------


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


def _clear_parse_caches() -> None:
    for value in vars(datasets).values():
        clear = getattr(value, "cache_clear", None)
        if callable(clear):
            clear()


def count_csv_rows(path: Path) -> int:
    """Data records of a gzip CSV (header excluded), as the csv module counts them."""
    with (
        gzip.open(path, "rb") as raw,
        io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as text,
    ):
        return sum(1 for row in csv.reader(text) if row) - 1


# --- 1. throughput ----------------------------------------------------------------------------


def measure_throughput(
    path: Path, fmt: DatasetFormat, settings: SegmentationSettings
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Median of RUNS plain replays; also returns the last run's report (timing removed)."""
    runs = []
    report: dict[str, Any] = {}
    for _ in range(RUNS):
        _clear_parse_caches()
        gc.collect()
        started = time.perf_counter()
        items = list(read_dataset(path, fmt))
        parsed = time.perf_counter()
        result, processor, flaps = replay_offline(items, settings)
        ended = time.perf_counter()
        report = build_report(result, processor, flaps)
        del report["events_per_second"]
        runs.append(
            {
                "events": result.events,
                "row_errors": sum(result.invalid.values()),
                "parse_seconds": round(parsed - started, 4),
                "process_seconds": round(result.process_seconds, 4),
                "wall_seconds": round(ended - started, 4),
                "events_per_s_process": round(result.events / result.process_seconds, 1),
                "events_per_s_wall": round(result.events / (ended - started), 1),
            }
        )
    events = runs[0]["events"]
    median = {
        key: round(statistics.median(run[key] for run in runs), 4)
        for key in ("parse_seconds", "process_seconds", "wall_seconds")
    }
    measured = {
        "file": str(path),
        "format": fmt,
        "events": events,
        "row_errors": runs[0]["row_errors"],
        "runs": runs,
        "median": median,
        "events_per_s_process": round(events / median["process_seconds"], 1),
        "events_per_s_wall": round(events / median["wall_seconds"], 1),
    }
    return measured, report


RIVER_CALLS: Final = (
    (preprocessing.StandardScaler, "transform_one"),
    (preprocessing.StandardScaler, "learn_one"),
    (linear_model.LogisticRegression, "predict_proba_one"),
    (linear_model.LogisticRegression, "learn_one"),
    (OrderedKMeans, "predict_one"),
)


def _timing(spent: list[float], method: Callable[..., Any]) -> Callable[..., Any]:
    clock = time.perf_counter

    def timed(*args: Any, **kwargs: Any) -> Any:
        spent[1] += 1
        started = clock()
        try:
            return method(*args, **kwargs)
        finally:
            spent[0] += clock() - started

    return timed


def measure_river_time(
    path: Path, fmt: DatasetFormat, settings: SegmentationSettings
) -> dict[str, Any]:
    """Time spent inside River's own calls (scaling, logistic scoring and learning, the KMeans
    assignment) during one replay: what per-event learning costs however fast the rest is. The
    timer's own cost (measured around an empty call) is subtracted."""
    _clear_parse_caches()
    items = list(read_dataset(path, fmt))
    spent = [0.0, 0.0]  # seconds, calls
    with contextlib.ExitStack() as stack:
        for owner, name in RIVER_CALLS:
            stack.enter_context(
                mock.patch.object(owner, name, _timing(spent, getattr(owner, name)))
            )
        result, _, _ = replay_offline(items, settings)
    empty = [0.0, 0.0]
    nothing = _timing(empty, lambda: None)
    for _ in range(100_000):
        nothing()
    overhead = empty[0] / empty[1]
    river_s = spent[0] - overhead * spent[1]
    return {
        "events": result.events,
        "river_calls": int(spent[1]),
        "river_calls_per_event": round(spent[1] / result.events, 2),
        "river_seconds": round(river_s, 4),
        "river_us_per_event": round(1e6 * river_s / result.events, 1),
        "timer_overhead_ns_per_call": round(1e9 * overhead, 1),
        "budget_us_per_event_at_30000": round(1e6 / 30_000, 1),
    }


# --- 2./3. instrumented replay ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Label:
    snapshot_time: float  # event time the snapshot (and its prediction) was taken
    learned_at: float  # event time at which the label matured and was learned
    predicted: float  # the online model's prediction at snapshot time
    outcome: bool
    features: dict[str, float]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    percent: int
    events: int
    event_time: float
    clusters: BehaviourClusters


@dataclass
class Recorder:
    marks: dict[int, int]  # events processed -> checkpoint percent
    events: int = 0
    due: dict[str, deque[tuple[float, float, float]]] = field(
        default_factory=lambda: {"purchase": deque(), "churn": deque()}
    )
    labels: dict[str, list[Label]] = field(default_factory=lambda: {"purchase": [], "churn": []})
    checkpoints: list[Checkpoint] = field(default_factory=list)
    # (snapshot time, prediction then) of purchase snapshots taken at a customer's own event (the
    # probe population the stability figure was first measured on; others are time-driven).
    event_snapshots: set[tuple[float, float]] = field(default_factory=set)
    in_event: bool = False

    def learned(
        self, kind: str, features: dict[str, float], outcome: bool, predicted: float
    ) -> None:
        snapshot_time, snapshot_prediction, now = self.due[kind].popleft()
        if snapshot_prediction != predicted:
            raise AssertionError(f"{kind} learn call does not match the expiring snapshot")
        self.labels[kind].append(Label(snapshot_time, now, predicted, outcome, dict(features)))


class RecordingProcessor(Processor):
    """Processor that reports labels and cluster checkpoints to a Recorder; changes no result."""

    def __init__(
        self,
        settings: SegmentationSettings,
        models: SegmentModels,
        store: MemoryStore,
        recorder: Recorder,
    ) -> None:
        super().__init__(settings, models, store)
        self.recorder = recorder
        for kind in ("purchase", "churn"):
            model = getattr(models, kind)
            model.learn = self._recording_learn(kind, model.learn)

    def _recording_learn(
        self, kind: str, learn: Callable[[dict[str, float], bool, float], None]
    ) -> Callable[[dict[str, float], bool, float], None]:
        def wrapped(features: dict[str, float], outcome: bool, predicted: float) -> None:
            self.recorder.learned(kind, features, outcome, predicted)
            learn(features, outcome, predicted)

        return wrapped

    def _on_event(self, st: Any, event: Event, trig: Any) -> Any:
        self.recorder.in_event = True
        try:
            return super()._on_event(st, event, trig)
        finally:
            self.recorder.in_event = False

    def _snapshot_purchase(self, st: Any, x: dict[str, float], at: float) -> None:
        before = len(st.purchase_pending)
        super()._snapshot_purchase(st, x, at)
        if self.recorder.in_event and len(st.purchase_pending) > before:
            self.recorder.event_snapshots.add((at, st.purchase_propensity))

    def _expire(
        self, pending: list[Snapshot], now: float, horizon: float, *, churn: bool
    ) -> list[Snapshot]:
        queue = self.recorder.due["churn" if churn else "purchase"]
        queue.extend((float(snap[0]), snap[1], now) for snap in pending if snap[0] + horizon <= now)
        return super()._expire(pending, now, horizon, churn=churn)

    def process(
        self, event: Event, processed_at: datetime | None = None, position: Position | None = None
    ) -> Outcome:
        outcome = super().process(event, processed_at, position)
        rec = self.recorder
        rec.events += 1
        percent = rec.marks.get(rec.events)
        if percent is not None:
            clusters = copy.deepcopy(self.models.clusters)
            rec.checkpoints.append(Checkpoint(percent, rec.events, self.max_event_time, clusters))
        return outcome


class SimulatedFixClusters(BehaviourClusters):
    """Benchmark-only simulation of a code change to BehaviourClusters (stream_app is untouched):
    the scaler stops learning after `freeze_after` observations, and each centre moves either by
    the fixed halflife step (as now) or by 1/n of its own observation count (MacQueen's
    sequential k-means, which converges instead of tracking the latest ~ln2/halflife points)."""

    def __init__(self, k: int, halflife: float, seed: int, *, freeze_after: int, step: str) -> None:
        super().__init__(k, halflife, seed)
        self.freeze_after = freeze_after
        self.step = step

    def learn_assign(self, features: dict[str, float], at: float = 0.0) -> int:
        subset = {f: features[f] for f in CLUSTER_FEATURES}
        if sum(self.sizes) < self.freeze_after:
            self.scaler.learn_one(subset)
        scaled = self.scaler.transform_one(subset)
        cid: int = self.kmeans.predict_one(scaled)
        rate = 1.0 / (self.sizes[cid] + 1) if self.step == "1/n" else self.kmeans.halflife
        centre = self.kmeans.centers[cid]
        for f in CLUSTER_FEATURES:
            centre[f] += rate * (scaled[f] - centre[f])
        self.sizes[cid] += 1
        return cid


ClustersFactory = Callable[[SegmentationSettings, int], BehaviourClusters]


@dataclass
class Instrumented:
    settings: SegmentationSettings
    report: dict[str, Any]
    recorder: Recorder


def instrumented_replay(
    items: Sequence[Event | RowError],
    settings: SegmentationSettings,
    clusters: ClustersFactory | None = None,
) -> Instrumented:
    """One replay_offline run with a RecordingProcessor (and optionally other clusters)."""
    total = sum(1 for item in items if not isinstance(item, RowError))
    marks = {
        math.ceil(total * i / CHECKPOINTS): 100 * i // CHECKPOINTS
        for i in range(1, CHECKPOINTS + 1)
    }
    recorder = Recorder(marks)

    def factory(s: SegmentationSettings, models: SegmentModels, store: MemoryStore) -> Processor:
        if clusters is not None:
            models.clusters = clusters(s, total)
        return RecordingProcessor(s, models, store, recorder)

    with mock.patch.object(replay, "Processor", factory):
        result, processor, flaps = replay_offline(items, settings)
    for kind, queue in recorder.due.items():
        if queue:
            raise AssertionError(f"{len(queue)} expired {kind} snapshots were never learned")
    return Instrumented(settings, build_report(result, processor, flaps), recorder)


# --- 2. propensity vs offline baselines -------------------------------------------------------


def _matrix(labels: Sequence[Label]) -> list[list[float]]:
    return [[label.features[f] for f in FEATURES] for label in labels]


def _auc(outcomes: Sequence[bool], scores: Sequence[float]) -> float | None:
    if len(set(outcomes)) < 2:
        return None
    return float(roc_auc_score(list(outcomes), list(scores)))


def _split(labels: list[Label]) -> tuple[list[Label], list[Label], float]:
    """Labels in snapshot-time order; train = before the time at the 70% rank (ties to test)."""
    ordered = sorted(labels, key=lambda label: label.snapshot_time)  # stable: learn order
    cutoff = ordered[int(len(ordered) * TRAIN_SHARE)].snapshot_time
    train = [label for label in ordered if label.snapshot_time < cutoff]
    test = [label for label in ordered if label.snapshot_time >= cutoff]
    return train, test, cutoff


def _class_counts(labels: Sequence[Label]) -> dict[str, int]:
    positives = sum(label.outcome for label in labels)
    return {"labels": len(labels), "positives": positives, "negatives": len(labels) - positives}


def label_delay(labels: Sequence[Label], horizon_days: float) -> dict[str, Any]:
    """How long after its horizon each label was learned (the processor learns a matured label
    at the customer's next timer or event, not at the horizon itself)."""
    late = sorted((la.learned_at - la.snapshot_time) / 86400 - horizon_days for la in labels)
    return {
        "horizon_days": horizon_days,
        "p50": _r(percentile(late, 50), 2),
        "p90": _r(percentile(late, 90), 2),
        "p99": _r(percentile(late, 99), 2),
        "max": _r(late[-1], 2),
        "share_more_than_1_day_late": _r(sum(d > 1 for d in late) / len(late)),
    }


def _baseline_aucs(
    x_train: list[list[float]], y_train: list[bool], x_test: list[list[float]], y_test: list[bool]
) -> dict[str, float]:
    baselines = {
        "logistic_regression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "hist_gradient_boosting": HistGradientBoostingClassifier(random_state=SEED),
    }
    scores: dict[str, float] = {}
    for name, estimator in baselines.items():
        estimator.fit(x_train, y_train)
        auc = _auc(y_test, estimator.predict_proba(x_test)[:, 1])
        assert auc is not None
        scores[name] = auc
    return scores


def evaluate_propensity(
    labels: list[Label], report_auc: float | None, horizon_days: float
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "report_progressive_auc_all_labels": report_auc,
        "sklearn_progressive_auc_all_labels": _r(
            _auc([la.outcome for la in labels], [la.predicted for la in labels])
        ),
        "evaluated": False,
    }
    if not labels:
        return out
    out["constant_features"] = [f for f in FEATURES if len({la.features[f] for la in labels}) == 1]
    out["learned_after_horizon_days"] = label_delay(labels, horizon_days)
    train, test, cutoff = _split(labels)
    counts = {"train": _class_counts(train), "test": _class_counts(test)}
    out.update({"cutoff_snapshot_time": _iso(cutoff), "split": counts})
    out["train_period"] = [_iso(train[0].snapshot_time), _iso(train[-1].snapshot_time)]
    out["test_period"] = [_iso(test[0].snapshot_time), _iso(test[-1].snapshot_time)]
    out["evaluated"] = all(
        part[key] >= MIN_CLASS_LABELS
        for part in counts.values()
        for key in ("positives", "negatives")
    )
    if not out["evaluated"]:
        return out
    y_train = [la.outcome for la in train]
    y_test = [la.outcome for la in test]
    online = _auc(y_test, [la.predicted for la in test])
    assert online is not None
    out["online_progressive_auc_train_part"] = _r(_auc(y_train, [la.predicted for la in train]))
    out["online_progressive_auc_test"] = _r(online)
    scores = _baseline_aucs(_matrix(train), y_train, _matrix(test), y_test)
    out["baseline_auc_test"] = {name: _r(auc) for name, auc in scores.items()}
    best = max(scores, key=lambda name: scores[name])
    out["best_baseline"] = best
    out["online_minus_best_baseline"] = _r(online - scores[best])
    single = {f: _auc(y_test, [la.features[f] for la in test]) or 0.5 for f in FEATURES}
    top = max(single, key=lambda f: abs(single[f] - 0.5))
    out["best_single_feature_test"] = {
        "feature": top,
        "auc": _r(max(single[top], 1 - single[top])),
        "direction": "higher means positive" if single[top] >= 0.5 else "lower means positive",
    }
    return out


# --- 3. cluster stability ---------------------------------------------------------------------


def _distinct(labels: Sequence[Label]) -> list[dict[str, float]]:
    """Feature dicts of the labels, first of each distinct cluster-feature vector, time order."""
    distinct: dict[tuple[float, ...], dict[str, float]] = {}
    for label in sorted(labels, key=lambda la: la.snapshot_time):
        distinct.setdefault(tuple(label.features[f] for f in CLUSTER_FEATURES), label.features)
    return list(distinct.values())


def _assigner(
    scaler_from: BehaviourClusters, centres_from: BehaviourClusters
) -> Callable[[dict[str, float]], int]:
    def assign(x: dict[str, float]) -> int:
        scaled = scaler_from.scaler.transform_one({f: x[f] for f in CLUSTER_FEATURES})
        cid: int = centres_from.kmeans.predict_one(scaled)
        return cid

    return assign


def _share(a: Sequence[int], b: Sequence[int]) -> float:
    return round(sum(x != y for x, y in zip(a, b, strict=True)) / len(a), 4)


def _scaler_shift(a: BehaviourClusters, b: BehaviourClusters) -> dict[str, float]:
    """Per feature: how far the scaler's mean moved, in the later checkpoint's std units."""
    shifts = {}
    for f in CLUSTER_FEATURES:
        std = math.sqrt(b.scaler.vars[f])
        if std > 0:
            shifts[f] = round((b.scaler.means[f] - a.scaler.means[f]) / std, 4)
    return shifts


def _distance(a: dict[str, float], b: dict[str, float]) -> float:
    return round(math.sqrt(sum((a[f] - b[f]) ** 2 for f in CLUSTER_FEATURES)), 4)


def _pair(a: Checkpoint, b: Checkpoint, probes: list[dict[str, float]]) -> dict[str, Any]:
    before = [a.clusters.assign(x) for x in probes]
    after = [b.clusters.assign(x) for x in probes]
    scaler_only = [_assigner(b.clusters, a.clusters)(x) for x in probes]
    centres_only = [_assigner(a.clusters, b.clusters)(x) for x in probes]
    moves = Counter(f"{x}->{y}" for x, y in zip(before, after, strict=True) if x != y)
    k = len(a.clusters.sizes)
    return {
        "from_percent": a.percent,
        "to_percent": b.percent,
        "after_warm_up": a.percent >= WARM_UP_PERCENT,
        "changed_share": _share(before, after),
        "changed_share_scaler_only": _share(before, scaler_only),
        "changed_share_centres_only": _share(before, centres_only),
        "moves": dict(moves.most_common(6)),
        "centre_moves": [
            _distance(a.clusters.kmeans.centers[c], b.clusters.kmeans.centers[c]) for c in range(k)
        ],
        "scaler_mean_shift_std": _scaler_shift(a.clusters, b.clusters),
        "observations_between": [
            y - x for x, y in zip(a.clusters.sizes, b.clusters.sizes, strict=True)
        ],
    }


def _dead_cluster_diagnosis(end: BehaviourClusters) -> dict[str, Any]:
    """Features the scaler saw as constant (scaled to 0 for every point) and, per cluster, the
    squared distance its centre keeps on them: a fixed handicap no observation can overcome."""
    constant = [f for f in CLUSTER_FEATURES if end.scaler.vars[f] == 0]
    return {
        "constant_cluster_features": constant,
        "squared_offset_on_constant_features": [
            round(sum(end.kmeans.centers[c][f] ** 2 for f in constant), 3)
            for c in range(len(end.sizes))
        ],
    }


def _probes_per_cluster(clusters: BehaviourClusters, probes: list[dict[str, float]]) -> list[int]:
    counts = Counter(clusters.assign(x) for x in probes)
    return [counts.get(c, 0) for c in range(len(clusters.sizes))]


def cluster_stability(
    checkpoints: list[Checkpoint], probes: list[dict[str, float]]
) -> dict[str, Any]:
    pairs = [_pair(a, b, probes) for a, b in itertools.pairwise(checkpoints)]
    judged = [p["changed_share"] for p in pairs if p["after_warm_up"]]
    first, last = checkpoints[0], checkpoints[-1]
    return {
        "probes": len(probes),
        "checkpoints": [
            {
                "percent": cp.percent,
                "events": cp.events,
                "event_time": _iso(cp.event_time),
                "observations_per_cluster": list(cp.clusters.sizes),
                "probes_per_cluster": _probes_per_cluster(cp.clusters, probes),
                "profiles": [cp.clusters.profile(c).name for c in range(len(cp.clusters.sizes))],
            }
            for cp in checkpoints
        ],
        "pairs": pairs,
        "max_changed_share_after_warm_up": max(judged),
        "mean_changed_share_after_warm_up": round(statistics.fmean(judged), 4),
        "exceeds_limit": max(judged) > STABILITY_LIMIT,
        "changed_share_first_to_last_checkpoint": _share(
            [first.clusters.assign(x) for x in probes], [last.clusters.assign(x) for x in probes]
        ),
        "never_used_clusters_at_end": [c for c, n in enumerate(last.clusters.sizes) if n == 0],
        **_dead_cluster_diagnosis(last.clusters),
    }


def _variant_summary(run: Instrumented, probes: list[dict[str, float]]) -> dict[str, Any]:
    stability = cluster_stability(run.recorder.checkpoints, probes)
    pairs = [p for p in stability["pairs"] if p["after_warm_up"]]
    return {
        "max_changed_share_after_warm_up": stability["max_changed_share_after_warm_up"],
        "mean_changed_share_after_warm_up": stability["mean_changed_share_after_warm_up"],
        "changed_share_per_pair": [p["changed_share"] for p in pairs],
        "scaler_only_share_per_pair": [p["changed_share_scaler_only"] for p in pairs],
        "centres_only_share_per_pair": [p["changed_share_centres_only"] for p in pairs],
        "changed_share_first_to_last_checkpoint": stability[
            "changed_share_first_to_last_checkpoint"
        ],
        "never_used_clusters_at_end": stability["never_used_clusters_at_end"],
        "squared_offset_on_constant_features": stability["squared_offset_on_constant_features"],
        "probes_per_cluster_at_end": stability["checkpoints"][-1]["probes_per_cluster"],
        "flap_rate": run.report["flap_rate"],
        "cluster_changes": run.report["segment_changes"].get("cluster", 0),
        "clusters": [
            {key: c[key] for key in ("id", "members", "observations", "profile")}
            for c in run.report["clusters"]
        ],
    }


def alternative_setting(
    items: Sequence[Event | RowError], overrides: dict[str, Any], probes: list[dict[str, float]]
) -> dict[str, Any]:
    run = instrumented_replay(items, SegmentationSettings(**overrides))
    return {"settings": overrides, **_variant_summary(run, probes)}


def simulated_fix(
    items: Sequence[Event | RowError],
    step: str,
    overrides: dict[str, Any],
    probes: list[dict[str, float]],
) -> dict[str, Any]:
    def clusters(s: SegmentationSettings, total: int) -> BehaviourClusters:
        freeze_after = math.ceil(total * WARM_UP_PERCENT / 100)
        k, halflife = s.cluster_count, s.cluster_min_step
        return SimulatedFixClusters(k, halflife, s.seed, freeze_after=freeze_after, step=step)

    run = instrumented_replay(items, SegmentationSettings(**overrides), clusters)
    change = (
        f"code change, not a setting: scaler frozen after the {WARM_UP_PERCENT}% checkpoint, "
        f"centre step {'1/n per cluster (MacQueen)' if step == '1/n' else 'fixed halflife'}"
    )
    return {"simulated": change, "settings": overrides, **_variant_summary(run, probes)}


# --- main -------------------------------------------------------------------------------------


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 2)


def _throughput(settings: SegmentationSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    retail, plain_report = measure_throughput(RETAIL, "online-retail", settings)
    rows = count_csv_rows(RETAIL)
    retail["csv_rows"] = rows
    retail["rows_per_s_wall"] = round(rows / retail["median"]["wall_seconds"], 1)
    retail["rows_per_s_parse_only"] = round(rows / retail["median"]["parse_seconds"], 1)
    retail["river"] = measure_river_time(RETAIL, "online-retail", settings)
    rees, _ = measure_throughput(REES46, "rees46", settings)
    rees["river"] = measure_river_time(REES46, "rees46", settings)
    return {"online_retail": retail, "rees46": rees}, plain_report


def _instrumentation_check(plain: dict[str, Any], base: Instrumented) -> dict[str, Any]:
    """The recording processor must not change what the replay computes."""
    instrumented = {k: v for k, v in base.report.items() if k != "events_per_second"}
    labels = base.recorder.labels
    check = {
        "report_identical_to_plain_replay": instrumented == plain,
        "purchase_learn_calls": len(labels["purchase"]),
        "churn_learn_calls": len(labels["churn"]),
    }
    check["learn_calls_match_report"] = (
        check["purchase_learn_calls"] == base.report["purchase_labels"]
        and check["churn_learn_calls"] == base.report["churn_labels"]
    )
    return check


def _stability(
    items: Sequence[Event | RowError], base: Instrumented, timings: dict[str, float]
) -> dict[str, Any]:
    report = base.report
    pool = _distinct(base.recorder.labels["purchase"])
    at_events = _distinct(
        [
            label
            for label in base.recorder.labels["purchase"]
            if (label.snapshot_time, label.predicted) in base.recorder.event_snapshots
        ]
    )
    # The headline is judged on snapshots taken at events: the population the figure was first
    # measured on (issue 13's 1.7%), before time-driven snapshots existed. Silent customers'
    # aged snapshots sit near boundaries by nature (their idle days grow); they are reported too.
    probes = random.Random(SEED).sample(at_events, min(PROBES, len(at_events)))
    stability = cluster_stability(base.recorder.checkpoints, probes)
    stability["probe_source"] = (
        f"seeded sample (random.Random({SEED})) of {len(probes)} of the {len(at_events)} distinct "
        "(in cluster-feature space) labelled purchase snapshots taken at events"
    )
    mixed_probes = random.Random(SEED).sample(pool, min(PROBES, len(pool)))
    mixed = cluster_stability(base.recorder.checkpoints, mixed_probes)
    stability["all_snapshot_probes"] = {
        "probe_source": f"the same seeded sample of all {len(pool)} distinct labelled purchase "
        "snapshots, time-driven ones (silent customers, features aged) included",
        "changed_share_per_pair": [p["changed_share"] for p in mixed["pairs"]],
        "max_changed_share_after_warm_up": mixed["max_changed_share_after_warm_up"],
    }
    first = cluster_stability(base.recorder.checkpoints, pool[:PROBES])
    stability["first_2000_distinct_probes"] = {
        "probe_source": "the first 2,000 distinct labelled purchase snapshots by snapshot time",
        "changed_share_per_pair": [p["changed_share"] for p in first["pairs"]],
        "max_changed_share_after_warm_up": first["max_changed_share_after_warm_up"],
    }
    stability["flap_rate"] = report["flap_rate"]
    stability["cluster_changes"] = report["segment_changes"].get("cluster", 0)
    stability["clusters_at_end"] = [
        {key: c[key] for key in ("id", "members", "observations", "profile", "centre")}
        for c in report["clusters"]
    ]
    members = [c["members"] for c in report["clusters"]]
    total = sum(members)
    stability["smallest_member_share"] = round(min(members) / total, 4) if total else 0
    stability["reseeds"] = report["cluster_reseeds"]
    stability["alternatives"] = []
    stability["simulated_code_fixes"] = []
    if stability["exceeds_limit"]:
        with _stage("alternative_settings", timings):
            stability["alternatives"] = [
                alternative_setting(items, overrides, probes) for overrides in ALTERNATIVES
            ]
        with _stage("simulated_code_fixes", timings):
            stability["simulated_code_fixes"] = [
                simulated_fix(items, step, overrides, probes) for step, overrides in SIMULATED_FIXES
            ]
    return stability


def run(out: Path) -> dict[str, Any]:
    for path in (RETAIL, REES46):
        if not path.is_file():
            raise SystemExit(f"dataset missing: {path} (see {DATASETS / 'README.md'})")
    started = time.perf_counter()
    settings = SegmentationSettings()
    timings: dict[str, float] = {}
    result: dict[str, Any] = {"settings": settings.model_dump(), "seed": SEED}
    with _stage("throughput", timings):
        result["throughput"], plain_report = _throughput(settings)
    with _stage("instrumented_replay", timings):
        _clear_parse_caches()
        items = list(read_dataset(RETAIL, "online-retail"))
        base = instrumented_replay(items, settings)
    report, labels = base.report, base.recorder.labels
    result["instrumentation_check"] = _instrumentation_check(plain_report, base)
    with _stage("propensity", timings):
        result["propensity"] = {
            "snapshot_time_source": "snap[0] of each expiring snapshot, captured by wrapping "
            "Processor._expire and matched in order to the wrapped Propensity.learn calls "
            "(each call's `predicted` is checked against the snapshot's)",
            "purchase": evaluate_propensity(
                labels["purchase"], report["purchase_auc"], settings.purchase_horizon_days
            ),
            "churn": evaluate_propensity(
                labels["churn"], report["churn_auc"], settings.churn_horizon_days
            ),
        }
    with _stage("cluster_stability", timings):
        result["cluster_stability"] = _stability(items, base, timings)
    # the instrumented run's own events_per_second is left out: it includes recording overhead
    result["replay_report"] = {
        k: v for k, v in report.items() if k not in ("clusters", "events_per_second")
    }
    timings["total"] = round(time.perf_counter() - started, 2)
    result["stage_seconds"] = timings
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _summary_propensity(result: dict[str, Any]) -> list[str]:
    lines = ["== propensity, Online Retail (ROC AUC on the last 30% of snapshots by time)"]
    for kind in ("purchase", "churn"):
        p = result["propensity"][kind]
        if not p["evaluated"]:
            lines.append(f"{kind}: not evaluated (too few labels of a class)")
            continue
        base = ", ".join(f"{k} {v}" for k, v in p["baseline_auc_test"].items())
        lines.append(
            f"{kind}: online {p['online_progressive_auc_test']} vs {base}; "
            f"online - best = {p['online_minus_best_baseline']:+}; report progressive AUC "
            f"(all {p['split']['train']['labels'] + p['split']['test']['labels']} labels) "
            f"{p['report_progressive_auc_all_labels']}"
        )
    return lines


def _summary_clusters(cs: dict[str, Any]) -> list[str]:
    per_pair = ", ".join(
        f"{p['from_percent']}->{p['to_percent']}% {p['changed_share']:.2%}"
        for p in cs["pairs"]
        if p["after_warm_up"]
    )
    lines = [
        f"== cluster-id stability ({cs['probes']} probes, share of ids changed per 10% step)",
        per_pair,
        f"max {cs['max_changed_share_after_warm_up']:.2%} (limit {STABILITY_LIMIT:.0%}); "
        f"flap_rate {cs['flap_rate']}; never-used clusters {cs['never_used_clusters_at_end']}; "
        f"smallest cluster {cs['smallest_member_share']:.2%} of customers; "
        f"re-seeds {cs['reseeds']}",
        "probes from every labelled snapshot (time-driven included): max "
        f"{cs['all_snapshot_probes']['max_changed_share_after_warm_up']:.2%}",
    ]
    lines += [
        f"  cluster {c['id']}: {c['observations']:>6} obs {c['members']:>5} members  {c['profile']}"
        for c in cs["clusters_at_end"]
    ]
    for alt in cs["alternatives"] + cs["simulated_code_fixes"]:
        label = alt.get("simulated", "setting") + f" {alt['settings']}"
        lines.append(
            f"  {label}: max {alt['max_changed_share_after_warm_up']:.2%}, "
            f"mean {alt['mean_changed_share_after_warm_up']:.2%}, "
            f"never-used {alt['never_used_clusters_at_end']}"
        )
    return lines


def summary(result: dict[str, Any]) -> str:
    retail = result["throughput"]["online_retail"]
    rees = result["throughput"]["rees46"]
    lines = [
        "== replay_offline throughput (median of 3)",
        f"online-retail: {retail['events']:,} events, {retail['events_per_s_process']:,.0f} ev/s "
        f"process, {retail['events_per_s_wall']:,.0f} ev/s wall incl. reading; "
        f"{retail['rows_per_s_wall']:,.0f} CSV rows/s wall ({retail['csv_rows']:,} rows)",
        f"rees46:        {rees['events']:,} events, {rees['events_per_s_process']:,.0f} ev/s "
        f"process, {rees['events_per_s_wall']:,.0f} ev/s wall incl. reading",
        f"instrumentation check: {result['instrumentation_check']}",
        *_summary_propensity(result),
        *_summary_clusters(result["cluster_stability"]),
        f"stage seconds: {result['stage_seconds']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Offline benchmark of stream_app on real data")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    args = parser.parse_args(argv)
    result = run(args.out)
    print(summary(result))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
