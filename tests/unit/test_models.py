"""Contract checks on stream_app.core.models, in the spirit of river/checks: the same seed and
data give the same model byte for byte, pickling and model records round-trip without changing
what the model does next, damaged, forged or foreign records are refused, and the quality and
explanation numbers are what they claim to be.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import itertools
import json
import math
import os
import pickle
import random
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from river import linear_model, optim, preprocessing, utils

from stream_app.contracts.events import ClickEvent, TransactionEvent
from stream_app.core.features import FEATURES
from stream_app.core.model_format import SnapshotError
from stream_app.core.models import (
    _TRAITS,
    CLUSTER_FEATURES,
    MIN_SPREAD,
    PROFILE_REFRESH,
    SCALED_INPUT_BOUND,
    WARM_UP_LABELS,
    Assessment,
    BehaviourClusters,
    Propensity,
    SegmentModels,
    _squared_distances,
    model_version,
)
from stream_app.core.processor import MemoryStore, Processor
from stream_app.settings import SegmentationSettings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.score_audit import expected_calibration_error

REPO_ROOT = Path(__file__).resolve().parents[2]
Row = dict[str, float]
Example = tuple[Row, bool]
RowsFactory = Callable[..., list[Row]]
ExamplesFactory = Callable[..., list[Example]]


@pytest.fixture
def rows_factory() -> RowsFactory:
    """Deterministic feature vectors with a few behavioural groups, like real customers."""

    def make(n: int, seed: int = 0) -> list[Row]:
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            group = rng.randrange(3)
            rows.append(
                {f: max(0.0, rng.gauss(group * (1 + i % 3), 0.7)) for i, f in enumerate(FEATURES)}
            )
        return rows

    return make


@pytest.fixture
def examples_factory(rows_factory: RowsFactory) -> ExamplesFactory:
    """Labelled rows: a purchase is likelier with more orders and fewer idle days."""

    def make(n: int, seed: int = 0) -> list[Example]:
        rng = random.Random(seed + 1000)
        out = []
        for x in rows_factory(n, seed):
            logit = x["order_count"] - x["days_since_last_event"] + rng.gauss(0, 0.5)
            out.append((x, logit > 0))
        return out

    return make


def train(models: SegmentModels, examples: list[Example]) -> list[tuple[int, float, float]]:
    """Feed examples the way the processor does; return (cluster, purchase, churn) per example."""
    out = []
    for x, y in examples:
        cid = models.clusters.learn_assign(x)
        purchase, churn = models.purchase.score(x), models.churn.score(x)
        models.purchase.learn(x, y, purchase)
        models.churn.learn(x, not y, churn)
        out.append((cid, purchase, churn))
    return out


def probe(models: SegmentModels, rows: list[Row]) -> list[tuple[int, float, float]]:
    return [
        (models.clusters.assign(x), models.purchase.score(x), models.churn.score(x)) for x in rows
    ]


def learned_state(models: SegmentModels) -> tuple[object, ...]:
    """Every learned number of a model set, to compare two sets by value.

    Snapshot bytes cannot be compared after a restore: pickle shares equal strings only when they
    are the same object, and unpickled strings are not the interned originals, so the same model
    pickles to different (equally valid) bytes.
    """

    def scaler(s: Any) -> tuple[object, ...]:
        return (dict(s.counts), dict(s.means), dict(s.vars))

    def propensity(p: Propensity) -> tuple[object, ...]:
        logreg = p.model["LogisticRegression"]
        return (
            scaler(p.model["StandardScaler"]),
            dict(logreg.weights),
            logreg.intercept,
            logreg.optimizer.n_iterations,
            p.labels,
            p.positives,
            p.auc.get(),
            p.log_loss.get(),
        )

    c = models.clusters
    return (
        scaler(c.scaler),
        {cid: dict(centre) for cid, centre in c.kmeans.centers.items()},
        list(c.sizes),
        c.kmeans._rng.getstate(),
        propensity(models.purchase),
        propensity(models.churn),
    )


# --- determinism ----------------------------------------------------------------------------------


def test_same_seed_and_data_give_identical_models(examples_factory: ExamplesFactory) -> None:
    examples = examples_factory(300)
    a, b = SegmentModels(SegmentationSettings()), SegmentModels(SegmentationSettings())
    assert train(a, examples) == train(b, examples)
    assert a.snapshot() == b.snapshot()
    assert a.content_version() == b.content_version()
    assert a.purchase.quality() == b.purchase.quality()
    assert [a.clusters.profile(c) for c in range(6)] == [b.clusters.profile(c) for c in range(6)]


def test_a_different_seed_gives_different_clusters(rows_factory: RowsFactory) -> None:
    rows = rows_factory(200)
    a, b = (
        BehaviourClusters(6, 0.05, seed=1, warmup=50),
        BehaviourClusters(6, 0.05, seed=2, warmup=50),
    )
    ids_a = [a.learn_assign(x) for x in rows]
    ids_b = [b.learn_assign(x) for x in rows]
    assert a.kmeans.centers != b.kmeans.centers
    assert ids_a != ids_b


@pytest.mark.parametrize("k", [2, 6, 32])
def test_cluster_ids_stay_within_range(rows_factory: RowsFactory, k: int) -> None:
    clusters = BehaviourClusters(k, 0.05, seed=42, warmup=50)
    ids = [clusters.learn_assign(x) for x in rows_factory(300)]
    assert set(ids) <= set(range(k))
    assert sorted(clusters.kmeans.centers) == list(range(k))
    assert sum(clusters.sizes) == 300  # the 50 warm-up observations are counted at seeding
    after_warm_up = ids[50:]
    assert all(clusters.sizes[c] >= after_warm_up.count(c) for c in range(k))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries({f: st.floats(0.0, 20.0) for f in FEATURES}),
        min_size=1,
        max_size=40,
    ),
    st.integers(2, 8),
)
def test_any_rows_give_valid_ids_and_scores(rows: list[Row], k: int) -> None:
    models = SegmentModels(SegmentationSettings(cluster_count=k))
    twin = SegmentModels(SegmentationSettings(cluster_count=k))
    results = train(models, [(x, i % 2 == 0) for i, x in enumerate(rows)])
    assert results == train(twin, [(x, i % 2 == 0) for i, x in enumerate(rows)])
    for cid, purchase, churn in results:
        assert 0 <= cid < k
        assert 0.0 <= purchase <= 1.0
        assert 0.0 <= churn <= 1.0


def test_ordered_kmeans_does_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    script = tmp_path / "assign.py"
    script.write_text(
        textwrap.dedent(
            """
            import random
            from stream_app.core.features import FEATURES
            from stream_app.core.models import CLUSTER_FEATURES, BehaviourClusters, OrderedKMeans

            rng = random.Random(1)
            rows = [{f: rng.gauss(0, 1) for f in CLUSTER_FEATURES} for _ in range(300)]
            kmeans = OrderedKMeans(CLUSTER_FEATURES, n_clusters=6, halflife=0.1, seed=3)
            print([kmeans.learn_predict_one(x) for x in rows])
            print([[kmeans.centers[c][f].hex() for f in CLUSTER_FEATURES] for c in range(6)])
            clusters = BehaviourClusters(6, 0.05, 42, warmup=50)
            full = [{f: abs(rng.gauss(1, 1)) for f in FEATURES} for _ in range(300)]
            print([clusters.learn_assign(x) for x in full])
            print(hash("days_since_last_event"))
            """
        )
    )

    def run(hash_seed: str) -> list[str]:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, str(script)],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return done.stdout.splitlines()

    one, two = run("1"), run("2")
    assert len(one) == len(two) == 4
    assert one[3] != two[3]  # control: the two processes really hash strings differently
    assert one[:3] == two[:3]


# --- pickle, model records, restore ---------------------------------------------------------------


def test_pickle_round_trip_predicts_and_learns_identically(
    examples_factory: ExamplesFactory, rows_factory: RowsFactory
) -> None:
    original = SegmentModels(SegmentationSettings())
    train(original, examples_factory(200))
    copy = pickle.loads(pickle.dumps(original))
    probes = rows_factory(50, seed=9)
    assert probe(copy, probes) == probe(original, probes)
    later = examples_factory(100, seed=5)
    assert learned_state(copy) == learned_state(original)
    assert train(copy, later) == train(original, later)
    assert learned_state(copy) == learned_state(original)


@pytest.mark.parametrize("component", ["clusters", "purchase"])
def test_components_pickle_on_their_own(
    examples_factory: ExamplesFactory, rows_factory: RowsFactory, component: str
) -> None:
    models = SegmentModels(SegmentationSettings())
    train(models, examples_factory(100))
    part = getattr(models, component)
    copy = pickle.loads(pickle.dumps(part))
    probes = rows_factory(30, seed=3)
    if isinstance(part, BehaviourClusters):
        assert [copy.assign(x) for x in probes] == [part.assign(x) for x in probes]
        assert [copy.learn_assign(x) for x in probes] == [part.learn_assign(x) for x in probes]
    else:
        assert [copy.score(x) for x in probes] == [part.score(x) for x in probes]
        assert copy.quality() == part.quality()


def test_snapshot_restore_continues_identically(
    examples_factory: ExamplesFactory, rows_factory: RowsFactory
) -> None:
    s = SegmentationSettings()
    original = SegmentModels(s)
    train(original, examples_factory(250))
    restored = SegmentModels(s)
    assert learned_state(restored) != learned_state(original)
    restored.restore(original.snapshot())
    assert restored.encoded() == original.encoded()
    probes = rows_factory(40, seed=4)
    assert probe(restored, probes) == probe(original, probes)
    assert restored.purchase.quality() == original.purchase.quality()
    later = examples_factory(150, seed=6)
    assert learned_state(restored) == learned_state(original)
    assert train(restored, later) == train(original, later)
    assert learned_state(restored) == learned_state(original)
    assert restored.snapshot() == original.snapshot()  # byte for byte, unlike pickle


# --- model records: layout, content id, refusals --------------------------------------------------

SCHEMAS = REPO_ROOT / "schemas"
RETAIL_FILE = REPO_ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"
needs_retail = pytest.mark.skipif(not RETAIL_FILE.exists(), reason="Online Retail is absent")
KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def validator(name: str) -> Draft202012Validator:
    schema = orjson.loads((SCHEMAS / f"{name}.v1.json").read_bytes())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_record_layout(examples_factory: ExamplesFactory) -> None:
    """The record is JSON: an envelope under schemas/model_record.v1.json carrying the
    parameters as JSON text under schemas/model_params.v1.json, with their sha256, and the
    content id as version."""
    models = SegmentModels(SegmentationSettings())
    train(models, examples_factory(300))
    record = orjson.loads(models.snapshot())
    validator("model_record").validate(record)
    params = record["params"].encode()
    validator("model_params").validate(orjson.loads(params))
    assert params == models.encoded()
    assert record["params_sha256"] == hashlib.sha256(params).hexdigest()
    assert record["hmac_sha256"] is None
    assert record["version"] == models.content_version()
    assert models.content_version() == learned_id(models.snapshot(), params)
    assert models.version == model_version(SegmentationSettings())
    signed = orjson.loads(models.snapshot(KEY))
    assert signed["hmac_sha256"] == hmac.new(KEY, params, hashlib.sha256).hexdigest()
    assert {k: v for k, v in signed.items() if k != "hmac_sha256"} == {
        k: v for k, v in record.items() if k != "hmac_sha256"
    }


def test_the_content_id_is_the_learned_numbers(examples_factory: ExamplesFactory) -> None:
    """Equal models share a version; one more example, another learning rate or another seed's
    data changes it; the knob digest stays the family's."""
    examples = examples_factory(200)
    a, b = SegmentModels(SegmentationSettings()), SegmentModels(SegmentationSettings())
    assert a.content_version() == b.content_version()  # both untrained
    train(a, examples)
    assert a.content_version() != b.content_version()
    train(b, examples)
    assert a.content_version() == b.content_version()
    seen = {a.content_version()}
    x, y = examples_factory(1, seed=3)[0]
    a.purchase.learn(x, y, 0.5)  # one label: the weights move
    seen.add(a.content_version())
    a.clusters.learn_assign(x)  # one observation
    seen.add(a.content_version())
    c = SegmentModels(SegmentationSettings())
    train(c, examples_factory(200, seed=1))
    seen.add(c.content_version())
    assert len(seen) == 4
    assert all(v.startswith(a.version + ".") for v in seen)
    other = SegmentModels(SegmentationSettings(learning_rate=0.05))
    train(other, examples)
    assert other.content_version().split(".")[1] != a.version.split(".")[1]


def deep_state(value: object, seen: set[int] | None = None) -> object:
    """Everything an object holds, recursively, as comparable values (floats by bit pattern):
    two objects with equal deep state will compute the same from here on."""
    seen = set() if seen is None else seen
    if isinstance(value, float):
        return ("float", value.hex())
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    if isinstance(value, type | types.FunctionType | types.BuiltinFunctionType):
        return ("code", value.__qualname__)
    if isinstance(value, random.Random):
        return ("Random", value.getstate())
    if isinstance(value, utils.VectorDict):
        return ("VectorDict", deep_state(value.to_dict(), seen))
    if isinstance(value, functools.partial):
        return ("partial", deep_state(value.func, seen), deep_state(value.args, seen))
    if isinstance(value, types.BuiltinMethodType | types.MethodType):
        return ("method", value.__name__, deep_state(value.__self__, seen))
    if isinstance(value, dict):
        factory = getattr(value, "default_factory", None)
        items = [(deep_state(k, seen), deep_state(v, seen)) for k, v in value.items()]
        return (type(value).__name__, deep_state(factory, seen), sorted(items, key=repr))
    if isinstance(value, list | tuple):
        return (type(value).__name__, [deep_state(v, seen) for v in value])
    if id(value) in seen:
        return ("seen", type(value).__name__)
    seen.add(id(value))
    fields = vars(value) if hasattr(value, "__dict__") else {}
    slots = {n: getattr(value, n) for n in getattr(value, "__slots__", ()) if hasattr(value, n)}
    return (
        type(value).__qualname__,
        {name: deep_state(v, seen) for name, v in sorted({**fields, **slots}.items())},
    )


@pytest.mark.parametrize("learned", [0, 40, 600], ids=["untrained", "warming-up", "seeded"])
def test_a_restored_model_holds_everything_the_original_holds(
    examples_factory: ExamplesFactory, learned: int
) -> None:
    """Every attribute of every object in the model set, River's own included, is equal after a
    restore: an attribute added to a model class and not to its to_params/from_params (and the
    record's pydantic models) fails here."""
    s = SegmentationSettings(cluster_warmup=100)
    original = SegmentModels(s)
    train(original, examples_factory(learned))
    for cid in range(s.cluster_count):
        original.clusters.profile(cid)
    restored = SegmentModels(s)
    restored.restore(original.snapshot())
    assert deep_state(restored) == deep_state(original)
    restored.clusters.__dict__["an_attribute_from_params_forgot"] = 0  # the check would see it
    assert deep_state(restored) != deep_state(original)


def retail_events(limit: int) -> list[ClickEvent | TransactionEvent]:
    items = read_dataset(RETAIL_FILE, "online-retail")
    return list(itertools.islice((e for e in items if not isinstance(e, RowError)), limit))


@needs_retail
@pytest.mark.parametrize("checkpoint", [3000, 9000], ids=["warming-up", "seeded"])
def test_a_restored_model_continues_a_real_replay_bit_for_bit(checkpoint: int) -> None:
    """Online Retail through the offline processor; at the checkpoint the processor is copied
    and the copy's models are replaced by ones restored from the record. Both then process the
    next 2,500 events: the same changes (scores, clusters, tiers), the same record bytes."""
    s = SegmentationSettings()
    events = retail_events(checkpoint + 2500)
    processor = Processor(s, SegmentModels(s), MemoryStore())
    for event in events[:checkpoint]:
        processor.process(event)
    assert processor.models.clusters.warming_up is (checkpoint < s.cluster_warmup)
    twin = copy.deepcopy(processor)
    restored = SegmentModels(s)
    restored.restore(processor.models.snapshot(KEY), [KEY])
    twin.use_models(restored)
    assert twin.models.encoded() == processor.models.encoded()
    for event in events[checkpoint:]:
        assert twin.process(event).changes == processor.process(event).changes
    assert twin.advance(processor.max_event_time) == processor.advance(processor.max_event_time)
    assert not processor.models.clusters.warming_up
    assert processor.models.purchase.labels > 0
    assert twin.models.snapshot() == processor.models.snapshot()


@pytest.fixture
def record_factory(examples_factory: ExamplesFactory) -> Callable[..., bytes]:
    """A real record of trained models (signed with `key` if given)."""

    def make(key: bytes | None = None) -> bytes:
        models = SegmentModels(SegmentationSettings())
        train(models, examples_factory(60))
        return models.snapshot(key)

    return make


def reforge(data: bytes, edit: Callable[[dict[str, Any]], object]) -> bytes:
    """What a writer of the topic can do: change the parameters and recompute the digest and
    the version (not the HMAC: it has no key)."""
    record = orjson.loads(data)
    params = orjson.loads(record["params"])
    edit(params)
    return rewrap(data, orjson.dumps(params, option=orjson.OPT_SORT_KEYS))


def rewrap(data: bytes, params: bytes) -> bytes:
    record = orjson.loads(data)
    digest = hashlib.sha256(params).hexdigest()
    record.update(params=params.decode(), params_sha256=digest, version=learned_id(data, params))
    return orjson.dumps(record)


def learned_id(data: bytes, params: bytes) -> str:
    """The version a record with these parameters should carry: the knob digest and 12 hex of
    the sha256 of the parameters without `trainer`, canonical (keys sorted, no spaces); the
    record's own id if they are not a JSON object."""
    try:
        learned = {k: v for k, v in json.loads(params).items() if k != "trainer"}
    except (ValueError, AttributeError):
        return str(orjson.loads(data)["version"])
    knobs = orjson.loads(data)["version"].rsplit(".", 1)[0]
    canonical = json.dumps(learned, sort_keys=True, separators=(",", ":")).encode()
    return f"{knobs}.{hashlib.sha256(canonical).hexdigest()[:12]}"


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def last_digit(data: bytes) -> int:
    """The index of the last digit inside the params text: flipping its low bit gives another
    digit, so the record is still JSON and only the digest can tell."""
    start = data.index(b'"params":')  # the last field of the record
    for index in range(len(data) - 1, start, -1):
        if chr(data[index]).isdigit() and chr(data[index] ^ 0x01).isdigit():
            return index
    raise AssertionError("no digit to flip")


def envelope(edit: Callable[[dict[str, Any]], object]) -> Callable[[bytes], bytes]:
    def damage(data: bytes) -> bytes:
        record = orjson.loads(data)
        edit(record)
        return orjson.dumps(record)

    return damage


def other_hex(record: dict[str, Any]) -> str:
    digest: str = record["params_sha256"]
    return ("1" if digest[0] != "1" else "2") + digest[1:]


def params_edit(edit: Callable[[dict[str, Any]], object]) -> Callable[[bytes], bytes]:
    return lambda data: reforge(data, edit)


def params_text(old: str, new: str) -> Callable[[bytes], bytes]:
    def damage(data: bytes) -> bytes:
        text = orjson.loads(data)["params"]
        assert old in text
        return rewrap(data, text.replace(old, new, 1).encode())

    return damage


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(params: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = params
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return edit


DELETE = object()
NOT_OURS = r"^not a stream_app model record \(not JSON\)$"
NO_FORMAT = r'^not a stream_app model record \(no "format": "stream-app-model"\)$'
ENVELOPE = r"^model record violates its schema: "
DIGEST = r"^model record digest mismatch: its parameters were changed or cut$"
PARAMS = r"^model parameters violate their schema: "
INVALID = r"^model parameters: "
REFUSED: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("empty", lambda d: b"", NOT_OURS),
    ("random bytes", lambda d: random.Random(1).randbytes(300), NOT_OURS),
    ("a pickle", lambda d: pickle.dumps({"version": 1}), NOT_OURS),
    ("the old SAMODEL1 snapshot", lambda d: b"SAMODEL1" + b" " * 64 + bytes(32), NOT_OURS),
    ("cut in the middle", lambda d: d[: len(d) // 2], NOT_OURS),
    ("last byte missing", lambda d: d[:-1], NOT_OURS),
    ("a JSON list", lambda d: b"[1, 2]", NO_FORMAT),
    ("another format", envelope(_set("format", "other")), NO_FORMAT),
    ("unknown schema_version", envelope(_set("schema_version", 2)), ENVELOPE),
    ("extra envelope field", envelope(_set("note", "hi")), ENVELOPE),
    ("missing digest", envelope(_set("params_sha256", DELETE)), ENVELOPE),
    ("digest not hex", envelope(_set("params_sha256", "x" * 64)), ENVELOPE),
    ("params not text", envelope(_set("params", {"a": 1})), ENVELOPE),
    ("flipped parameter byte", lambda d: flip(d, last_digit(d)), DIGEST),
    ("flipped digest byte", envelope(lambda r: r.update(params_sha256=other_hex(r))), DIGEST),
    ("params cut", envelope(lambda r: r.update(params=r["params"][:-1])), DIGEST),
    (
        "version of other params",
        envelope(lambda r: r.update(version=r["version"].rsplit(".", 1)[0] + ".0123456789ab")),
        r"^model record version river-kmeans-logreg\.[0-9a-f]{10}\.0123456789ab is not its "
        r"parameters' id$",
    ),
    (
        "params not JSON",
        params_text('{"churn"', '{"churn'),
        PARAMS + r"\(top level\): Invalid JSON",
    ),
    (
        "a float as text",
        params_edit(_set("purchase.intercept", "0.5")),
        PARAMS + "purchase.intercept",
    ),
    ("an int as float", params_edit(_set("purchase.labels", 60.0)), PARAMS + "purchase.labels"),
    ("a bool as int", params_edit(_set("clusters.profiled_at", True)), PARAMS),
    (
        "missing field",
        params_edit(_set("churn.weights", DELETE)),
        PARAMS + "churn.weights: Field required",
    ),
    ("extra field", params_edit(_set("churn.momentum", 0.9)), PARAMS + "churn.momentum"),
    ("NaN", params_text('"intercept":', '"intercept":NaN,"x":'), PARAMS),
    ("infinity", params_text('"intercept":', '"intercept":1e999,"x":'), PARAMS),
    ("negative count", params_edit(_set("clusters.sizes.0", -1)), PARAMS + r"clusters\.sizes\.0"),
    (
        "negative variance",
        params_edit(lambda p: p["purchase"]["scaler"]["vars"].update(order_count=-1.0)),
        PARAMS,
    ),
    ("negative label count", params_edit(_set("churn.labels", -5)), PARAMS),
    (
        "an empty AUC bin listed",
        params_edit(lambda p: p["purchase"]["auc"]["positives"][0].append(0)),
        PARAMS,
    ),
    (
        "an AUC bin beyond the last",
        params_edit(lambda p: p["purchase"]["auc"]["positives"].append([10_000, 1, 1])),
        PARAMS,
    ),
    (
        "a centre too short",
        params_edit(lambda p: p["clusters"]["centres"][2].pop()),
        INVALID + r"clusters\.centres must be 6 centres of 9 values$",
    ),
    (
        "a centre too many",
        params_edit(lambda p: p["clusters"]["centres"].append([0.0] * 9)),
        INVALID + r"clusters\.centres",
    ),
    (
        "sizes of another k",
        params_edit(lambda p: p["clusters"]["sizes"].pop()),
        INVALID + r"clusters\.sizes",
    ),
    (
        "an unknown feature",
        params_edit(lambda p: p["purchase"]["weights"].update(shoe_size=1.0)),
        INVALID + r"purchase\.weights has unknown feature\(s\) \['shoe_size'\]$",
    ),
    (
        "AUC not counting the labels",
        params_edit(_set("purchase.labels", 61)),
        INVALID + r"purchase\.auc does not count",
    ),
    (
        "more positives than labels",
        params_edit(_set("churn.positives", 10**6)),
        INVALID + r"churn has more positives",
    ),
    (
        "knobs not the version's",
        params_edit(_set("knobs", "river-kmeans-logreg.0123456789")),
        r"^model parameters are model river-kmeans-logreg\.0123456789, this worker runs ",
    ),
]


@pytest.mark.parametrize(
    ("damage", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_restore_refuses_what_is_not_a_sound_record(
    record_factory: Callable[..., bytes],
    rows_factory: RowsFactory,
    damage: Callable[[bytes], bytes],
    message: str,
) -> None:
    data = record_factory()
    target = SegmentModels(SegmentationSettings())
    train(target, [(x, True) for x in rows_factory(20, seed=2)])
    before = target.snapshot()
    with pytest.raises(SnapshotError, match=message) as refused:
        target.restore(damage(data))
    assert "\n" not in str(refused.value)  # one line
    assert target.snapshot() == before  # a refused record changes nothing


def test_the_forgeries_are_well_formed_otherwise(record_factory: Callable[..., bytes]) -> None:
    """Control for the refusals above: an edit that changes nothing is accepted."""
    SegmentModels(SegmentationSettings()).restore(params_edit(lambda p: None)(record_factory()))


def test_a_pickle_that_would_write_a_file_is_refused_and_never_run(tmp_path: Path) -> None:
    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
            return (open, (str(target), "w"))

    data = pickle.dumps(Payload(), protocol=5)
    for candidate in (data, b"SAMODEL1" + b" " * 64 + hashlib.sha256(data).digest() + data):
        with pytest.raises(SnapshotError, match=NOT_OURS):
            SegmentModels(SegmentationSettings()).restore(candidate)
    assert not target.exists()


def test_signatures(record_factory: Callable[..., bytes], rows_factory: RowsFactory) -> None:
    """With a key configured, only records signed with it (or the previous key, during a
    rotation) are accepted; without one, signed and unsigned records both are."""
    unsigned, signed = record_factory(), record_factory(KEY)
    models = SegmentModels(SegmentationSettings())
    models.restore(signed, [KEY])
    models.restore(signed, [OTHER_KEY, KEY])  # the previous key still verifies
    models.restore(signed)  # no key configured: the digest still holds
    models.restore(unsigned)
    refusals = [
        (unsigned, [KEY], r"^model record is unsigned and a signing key is configured$"),
        (signed, [OTHER_KEY], r"^model record signature does not match the signing key$"),
        # A writer without the key changes the parameters and recomputes the digest.
        (params_edit(_set("purchase.intercept", 9.0))(signed), [KEY], "signature does not match"),
        (envelope(_set("hmac_sha256", "0" * 64))(signed), [KEY], "signature does not match"),
        (envelope(_set("hmac_sha256", None))(signed), [KEY], "is unsigned"),
    ]
    for data, keys, message in refusals:
        with pytest.raises(SnapshotError, match=message):
            models.restore(data, keys)


@pytest.mark.parametrize(
    "knob",
    [{"seed": 7}, {"cluster_count": 4}, {"learning_rate": 0.05}, {"purchase_horizon_days": 14}],
    ids=lambda knob: next(iter(knob)),
)
def test_restore_refuses_another_model_version(
    record_factory: Callable[..., bytes], knob: dict[str, float]
) -> None:
    data = record_factory()
    version = model_version(SegmentationSettings())
    other = SegmentModels(SegmentationSettings(**knob))
    assert other.version != version
    with pytest.raises(SnapshotError) as refused:
        other.restore(data)
    assert (
        str(refused.value) == f"model record is model {version}, this worker runs {other.version}"
    )


def test_knobs_outside_the_models_keep_the_model_version(
    record_factory: Callable[..., bytes], rows_factory: RowsFactory
) -> None:
    data = record_factory()
    other = SegmentModels(SegmentationSettings(at_risk_after_days=10, cluster_confirmations=5))
    assert other.version == model_version(SegmentationSettings())
    other.restore(data)
    reference = SegmentModels(SegmentationSettings())
    reference.restore(data)
    probes = rows_factory(10)
    assert probe(other, probes) == probe(reference, probes)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=50))
def test_any_float_round_trips_exactly(values: list[float]) -> None:
    """orjson writes a float64's shortest exact form and the record reader reads it back bit for
    bit: -0.0, subnormals and the largest double included."""
    models = SegmentModels(SegmentationSettings())
    values = [-0.0, 5e-324, 1.7976931348623157e308, *values]
    logreg = models.purchase.model["LogisticRegression"]
    logreg._weights = utils.VectorDict(dict(zip(FEATURES, values, strict=False)))
    logreg.intercept = values[-1]
    restored = SegmentModels(SegmentationSettings())
    restored.restore(models.snapshot())
    got = restored.purchase.model["LogisticRegression"]
    assert {f: w.hex() for f, w in got.weights.items()} == {
        f: w.hex() for f, w in logreg.weights.items()
    }
    assert got.intercept.hex() == logreg.intercept.hex()


# --- cluster profiles -----------------------------------------------------------------------------

VOCABULARY = {word for pair in _TRAITS.values() for word in pair}


def test_profiles_are_named_from_the_trait_vocabulary(rows_factory: RowsFactory) -> None:
    clusters = BehaviourClusters(6, 0.05, seed=42, warmup=50)
    for x in rows_factory(300):
        clusters.learn_assign(x)
    names = []
    for cid in range(6):
        profile = clusters.profile(cid)
        assert profile.cluster == cid
        assert tuple(profile.traits) == CLUSTER_FEATURES
        # The name says the two strongest traits, most extreme first; a name another cluster
        # already has takes more of its own true traits (or its id) to stay unique.
        name = profile.name.split(" (cluster ")[0]
        words = name.split(", ")
        assert name == "typical customers" or set(words) <= VOCABULARY, profile.name
        ranked = sorted(profile.traits.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
        true = [_TRAITS[f][0 if z > 0 else 1] for f, z in ranked if abs(z) >= 0.25]
        assert name == (", ".join(true[: max(2, len(words))]) or "typical customers")
        names.append(profile.name)
    assert len(set(names)) == 6


PROFILES: list[tuple[dict[str, float], str]] = [
    ({}, "typical customers"),
    ({"order_count": 0.24, "total_spend": -0.24}, "typical customers"),
    ({"order_count": 2.0, "total_spend": -1.5}, "frequent buyers, low spenders"),
    ({"days_between_last_events": 1.0, "cart_abandonment_rate": 3.0}, "cart abandoners, dormant"),
    ({"engagement_last_month": -0.9, "session_count": 0.1}, "not engaged by email/push"),
    (
        {"browsing_velocity": 1.0, "session_count": -1.0, "order_count": 0.5},
        "fast browsers, few visits",
    ),
]


@pytest.mark.parametrize(("centre", "name"), PROFILES)
def test_profile_names_from_a_known_centre(centre: dict[str, float], name: str) -> None:
    clusters = BehaviourClusters(3, 0.05, seed=42, warmup=50)
    clusters.reservoir, clusters.sizes = None, [1, 1, 1]  # past warm-up, every cluster used
    for f in CLUSTER_FEATURES:
        clusters.kmeans.centers[1][f] = centre.get(f, 0.0)
    profile = clusters.profile(1)
    assert profile.name == name
    assert profile.traits == {f: round(centre.get(f, 0.0), 3) for f in CLUSTER_FEATURES}


def test_profiles_refresh_every_profile_refresh_observations(rows_factory: RowsFactory) -> None:
    clusters = BehaviourClusters(2, 0.05, seed=42, warmup=50)
    clusters.reservoir, clusters.sizes = None, [1, 1]  # past warm-up, every cluster used
    for f in CLUSTER_FEATURES:
        clusters.kmeans.centers[0][f] = 0.0
    assert clusters.profile(0).name == "typical customers"
    clusters.kmeans.centers[0]["order_count"] = 5.0
    assert clusters.profile(0).name == "typical customers"  # cached
    rows = rows_factory(PROFILE_REFRESH)
    for x in rows:
        clusters.learn_assign(x)
    refreshed = clusters.profile(0)
    assert refreshed.traits["order_count"] == round(clusters.kmeans.centers[0]["order_count"], 3)


def test_explain_rows_are_scaled_value_times_centre(rows_factory: RowsFactory) -> None:
    clusters = BehaviourClusters(4, 0.05, seed=42, warmup=50)
    rows = rows_factory(200)
    for x in rows:
        clusters.learn_assign(x)
    x = rows[0]
    cid = clusters.assign(x)
    scaler = clusters.scaler
    explained = clusters.explain(x, top=len(CLUSTER_FEATURES))
    assert {f for f, _, _ in explained} == set(CLUSTER_FEATURES)
    for f, value, contribution in explained:
        expected = (x[f] - scaler.means[f]) / math.sqrt(scaler.vars[f])
        assert math.isclose(value, expected, rel_tol=1e-9)
        assert math.isclose(contribution, value * clusters.kmeans.centers[cid][f], rel_tol=1e-9)
    magnitudes = [abs(c) for _, _, c in explained]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert clusters.explain(x, top=3) == explained[:3]


# --- propensity -----------------------------------------------------------------------------------


def hand_auc(labels: list[bool], predictions: list[float]) -> float:
    positives = [p for y, p in zip(labels, predictions, strict=True) if y]
    negatives = [p for y, p in zip(labels, predictions, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def hand_log_loss(labels: list[bool], predictions: list[float]) -> float:
    losses = [-math.log(p if y else 1 - p) for y, p in zip(labels, predictions, strict=True)]
    return sum(losses) / len(losses)


def feed(propensity: Propensity, rows: list[Row], labels: list[bool], preds: list[float]) -> None:
    for x, y, p in zip(rows, labels, preds, strict=True):
        propensity.learn(x, y, p)


def test_quality_before_any_label() -> None:
    assert Propensity(0.01).quality() == {
        "labels": 0,
        "positive_rate": None,
        "roc_auc": None,
        "log_loss": None,
        "ece": None,
    }


def test_quality_needs_both_classes_for_auc(rows_factory: RowsFactory) -> None:
    p = Propensity(0.01)
    feed(p, rows_factory(3), [True, True, True], [0.9, 0.8, 0.7])
    assert p.quality() == {
        "labels": 3,
        "positive_rate": 1.0,
        "roc_auc": None,
        "log_loss": round(hand_log_loss([True] * 3, [0.9, 0.8, 0.7]), 4),
        "ece": 0.2,  # each alone in its bin: |0.9-1|, |0.8-1|, |0.7-1|, averaged
    }


QUALITY_CASES: list[tuple[list[bool], list[float]]] = [
    ([True, False, True, False, True], [0.9, 0.2, 0.4, 0.6, 0.8]),
    ([False, True, False, True], [0.1, 0.35, 0.8, 0.9]),
    ([True, False] * 10, [0.05 * i + 0.01 for i in range(20)]),
]


@pytest.mark.parametrize(("labels", "predictions"), QUALITY_CASES)
def test_quality_is_predict_then_learn(
    rows_factory: RowsFactory, labels: list[bool], predictions: list[float]
) -> None:
    p = Propensity(0.01)
    feed(p, rows_factory(len(labels)), labels, predictions)
    assert p.quality() == {
        "labels": len(labels),
        "positive_rate": round(sum(labels) / len(labels), 4),
        "roc_auc": round(hand_auc(labels, predictions), 4),
        "log_loss": round(hand_log_loss(labels, predictions), 4),
        "ece": expected_calibration_error(predictions, labels)["ece"],
    }


def test_quality_of_known_values() -> None:
    p = Propensity(0.01)
    x = dict.fromkeys(FEATURES, 1.0)
    feed(p, [x] * 5, [True, False, True, False, True], [0.9, 0.2, 0.4, 0.6, 0.8])
    assert p.quality() == {
        "labels": 5,
        "positive_rate": 0.6,
        "roc_auc": 0.8333,  # 5 of 6 (positive, negative) pairs ranked right
        "log_loss": round(-(math.log(0.9 * 0.8 * 0.4 * 0.4 * 0.8)) / 5, 4),
        "ece": 0.34,  # one label per bin: (0.1 + 0.2 + 0.6 + 0.6 + 0.2) / 5
    }


@pytest.mark.parametrize(
    ("labels", "predictions"),
    [
        ([True, False] * 5, [0.5] * 10),
        ([True, True, False, False], [0.7, 0.3, 0.7, 0.1]),
    ],
    ids=["untrained-model-ties", "one-tied-pair"],
)
def test_quality_auc_counts_ties_as_half(
    rows_factory: RowsFactory, labels: list[bool], predictions: list[float]
) -> None:
    p = Propensity(0.01)
    feed(p, rows_factory(len(labels)), labels, predictions)
    assert p.quality()["roc_auc"] == round(hand_auc(labels, predictions), 4)


def test_learning_moves_scores_and_warms_up(examples_factory: ExamplesFactory) -> None:
    p = Propensity(0.05)
    examples = examples_factory(WARM_UP_LABELS)
    x0 = examples[0][0]
    assert p.score(x0) == 0.5  # an untrained logistic regression
    for i, (x, y) in enumerate(examples):
        assert p.warmed_up is (i >= WARM_UP_LABELS)
        p.learn(x, y, p.score(x))
    assert p.warmed_up
    assert p.labels == WARM_UP_LABELS
    assert p.positives == sum(y for _, y in examples)
    assert p.score(x0) != 0.5
    auc = p.quality()["roc_auc"]
    assert auc is not None
    assert auc > 0.7  # the label is learnable from these features


def test_contributions_are_coefficient_times_scaled_value(
    examples_factory: ExamplesFactory, rows_factory: RowsFactory
) -> None:
    p = Propensity(0.05)
    feed(p, *map(list, zip(*[(x, y, 0.5) for x, y in examples_factory(150)], strict=True)))
    scaler = p.model["StandardScaler"]
    logreg = p.model["LogisticRegression"]
    x = rows_factory(1, seed=77)[0]
    rows = p.contributions(x, top=len(FEATURES))
    assert sorted(f for f, _, _ in rows) == sorted(FEATURES)
    for f, value, contribution in rows:
        scaled = (x[f] - scaler.means[f]) / math.sqrt(scaler.vars[f])
        assert math.isclose(value, scaled, rel_tol=1e-9)
        assert math.isclose(contribution, logreg.weights[f] * scaled, rel_tol=1e-9)
    magnitudes = [abs(c) for _, _, c in rows]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert p.contributions(x, top=3) == rows[:3]
    # together with the intercept they are the logit of the score
    logit = sum(c for _, _, c in rows) + logreg.intercept
    assert math.isclose(p.score(x), 1 / (1 + math.exp(-logit)), rel_tol=1e-9)


def test_contributions_of_an_untrained_model_are_zero(rows_factory: RowsFactory) -> None:
    rows = Propensity(0.01).contributions(rows_factory(1)[0], top=len(FEATURES))
    assert [c for _, _, c in rows] == [0.0] * len(FEATURES)


def test_clusters_warm_up_then_seed_from_real_observations() -> None:
    """Every customer is cluster 0 while the scaler warms up; then the centres are seeded from
    the observations themselves, so every cluster has members (no random, never-used centre)."""
    rng = random.Random(5)
    groups = [(0.0, 0.0), (3.0, 0.5), (0.5, 3.0)]
    rows = []
    for i in range(300):
        a, b = groups[i % 3]
        row = dict.fromkeys(CLUSTER_FEATURES, 0.0)
        row["order_count"] = a + rng.gauss(0, 0.1)
        row["session_count"] = b + rng.gauss(0, 0.1)
        rows.append(row)
    clusters = BehaviourClusters(3, 0.0005, seed=7, warmup=60)
    early = [clusters.learn_assign(x) for x in rows[:59]]
    assert early == [0] * 59
    assert clusters.warming_up
    assert clusters.profile(1).name.startswith("warming up")
    later = [clusters.learn_assign(x) for x in rows[59:]]
    assert not clusters.warming_up
    assert sorted(set(later)) == [0, 1, 2]
    assert all(size > 0 for size in clusters.sizes)
    # One id per latent group: the three groups are perfectly separated.
    by_group = {i % 3: set() for i in range(3)}
    for i, cid in enumerate(later, start=59):
        by_group[i % 3].add(cid)
    assert all(len(ids) == 1 for ids in by_group.values())
    assert len({next(iter(ids)) for ids in by_group.values()}) == 3
    names = {clusters.profile(c).name for c in range(3)}
    assert len(names) == 3 and not any(n.startswith(("warming", "no members")) for n in names)


def test_assess_and_learn_are_river_steps_with_a_floored_spread_and_a_clip(
    examples_factory: ExamplesFactory,
) -> None:
    """Propensity calls River's two steps itself (to keep the scaled vector), with two
    departures from River's pipeline: the standard deviation is floored at MIN_SPREAD and every
    scaled input clipped at SCALED_INPUT_BOUND. Checked, bit for bit, against River's own
    StandardScaler statistics and LogisticRegression fed the same examples."""
    mine = Propensity(0.05)
    scaler = preprocessing.StandardScaler()
    logreg = linear_model.LogisticRegression(optimizer=optim.SGD(0.05))
    bound = SCALED_INPUT_BOUND

    def expected(x: Row) -> Row:
        return {
            f: max(
                -bound, min(bound, (v - scaler.means[f]) / max(scaler.vars[f] ** 0.5, MIN_SPREAD))
            )
            for f, v in x.items()
        }

    for x, y in examples_factory(300):
        assessment = mine.assess(x)
        assert assessment.scaled == expected(x)
        assert assessment.probability == logreg.predict_proba_one(expected(x))[True]
        assert mine.score(x) == assessment.probability
        mine.learn(x, y, assessment.probability)
        scaler.learn_one(x)
        logreg.learn_one(expected(x), y)
    assert mine.model["LogisticRegression"].weights == logreg.weights
    assert mine.model["LogisticRegression"].intercept == logreg.intercept


def test_a_feature_seen_nearly_constant_is_not_blown_up_to_millions_of_std() -> None:
    p = Propensity(0.05)
    for i in range(50):
        p.learn({"activity_last_hour": 0.0001 * (i % 2)}, i % 3 == 0, 0.5)
    scaled = p.assess({"activity_last_hour": 0.69}).scaled["activity_last_hour"]
    # (0.69 - mean) / the floor: 6.9 std. River's own scaler says ~13,800 (std 0.00005).
    assert scaled == pytest.approx((0.69 - 0.00005) / MIN_SPREAD, rel=1e-3)
    assert p.largest_scaled_input == scaled
    assert p.assess({"activity_last_hour": 5.0}).scaled["activity_last_hour"] == SCALED_INPUT_BOUND


def test_explain_of_an_assessment_is_contributions(
    examples_factory: ExamplesFactory, rows_factory: RowsFactory
) -> None:
    p = Propensity(0.05)
    for x, y in examples_factory(100):
        p.learn(x, y, 0.5)
    x = rows_factory(1, seed=3)[0]
    assert p.explain(p.assess(x), 3) == p.contributions(x, 3)


def test_explain_uses_the_assessment_it_is_given() -> None:
    p = Propensity(0.05)
    p.model["LogisticRegression"]._weights.update({"order_count": 2.0, "tenure_days": -0.5})
    scaled = dict.fromkeys(FEATURES, 0.0) | {"order_count": 1.5, "tenure_days": 4.0}
    rows = p.explain(Assessment(scaled, 0.9), 3)
    # largest |coefficient x scaled value| first; ties (all the zeros) by feature name
    assert rows == [
        ("order_count", 1.5, 3.0),
        ("tenure_days", 4.0, -2.0),
        ("activity_last_hour", 0.0, 0.0),
    ]


def _distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    total = 0.0
    for u, v in zip(a, b, strict=True):
        delta = u - v
        total += delta * delta
    return total


def _closest(point: tuple[float, ...], centres: list[tuple[float, ...]]) -> int:
    best, best_distance = 0, math.inf
    for cid, centre in enumerate(centres):
        distance = _distance(point, centre)
        if distance < best_distance:
            best, best_distance = cid, distance
    return best


def _seed_by_loops(
    clusters: BehaviourClusters, raw: list[Row]
) -> tuple[list[tuple[float, ...]], list[int]]:
    """The seeding as plain Python loops (what BehaviourClusters did before it used numpy)."""
    points = [tuple(clusters._scaled(x)[f] for f in CLUSTER_FEATURES) for x in raw]
    rng = random.Random(clusters.seed)
    k = clusters.kmeans.n_clusters
    centres = [points[rng.randrange(len(points))]]
    while len(centres) < k:
        weights = [min(_distance(p, c) for c in centres) for p in points]
        total = sum(weights)
        pick = rng.choices(points, weights=weights)[0] if total > 0 else rng.choice(points)
        centres.append(pick)
    counts = [0] * k
    for _ in range(clusters.LLOYD_PASSES):
        sums = [[0.0] * len(CLUSTER_FEATURES) for _ in range(k)]
        counts = [0] * k
        for p in points:
            cid = _closest(p, centres)
            counts[cid] += 1
            for i, value in enumerate(p):
                sums[cid][i] += value
        for cid in range(k):
            if counts[cid]:
                centres[cid] = tuple(total / counts[cid] for total in sums[cid])
    return centres, counts


def test_squared_distances_sum_in_feature_order() -> None:
    import numpy as np

    points = np.array([[1.0, 2.0, 3.0], [0.1, 0.2, 0.3]])
    got = _squared_distances(points, (1.0, 0.0, 6.0)).tolist()
    assert got == [13.0, _distance((0.1, 0.2, 0.3), (1.0, 0.0, 6.0))]


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(1, 7),
    n=st.integers(1, 120),
    duplicates=st.booleans(),
)
def test_vectorised_seeding_is_bit_identical_to_the_loops(
    seed: int, k: int, n: int, duplicates: bool
) -> None:
    """Centres and sizes equal the pure-Python k-means++ and Lloyd loops exactly, not approximately,
    ties and identical points included, so a replay's output did not change with numpy."""
    rng = random.Random(seed)
    base = [{f: rng.choice([0.0, 1.0, rng.expovariate(1.0)]) for f in FEATURES} for _ in range(n)]
    raw = [base[i % 3] if duplicates else base[i] for i in range(n)]
    clusters = BehaviourClusters(k, 0.05, seed=seed, warmup=n)
    for x in raw:
        clusters.scaler.learn_one({f: x[f] for f in CLUSTER_FEATURES})
    expected_centres, expected_counts = _seed_by_loops(clusters, raw)
    clusters._seed_centres(raw)
    got = [tuple(clusters.kmeans.centers[c][f] for f in CLUSTER_FEATURES) for c in range(k)]
    assert got == expected_centres
    assert clusters.sizes == expected_counts


@given(
    st.lists(
        st.tuples(st.floats(0.0, 1.0, allow_nan=False), st.booleans()), min_size=1, max_size=200
    )
)
def test_the_streamed_calibration_error_equals_the_audits_over_the_same_scores(
    labelled: list[tuple[float, bool]],
) -> None:
    """Propensity.calibration (constant space, predict-then-learn) against the offline audit's
    expected_calibration_error over the same (score, outcome) pairs; it survives the model
    record, and a record written before it existed counts from the next label on."""
    from stream_app.core.models import Calibration, Propensity
    from stream_app.tools.score_audit import expected_calibration_error

    calibration = Calibration()
    for score, outcome in labelled:
        calibration.update(outcome, score)
    oracle = expected_calibration_error([s for s, _ in labelled], [o for _, o in labelled])
    ece = calibration.get()
    assert ece is not None and round(ece, 4) == pytest.approx(oracle["ece"], abs=1e-4)
    again = Calibration.from_params(calibration.to_params(), "purchase")
    assert again.get() == ece

    model = Propensity(0.01)
    for score, outcome in labelled[:5]:
        model.learn({"order_count": 1.0}, outcome, score)
    params = model.to_params()
    assert Propensity.from_params(params, 0.01, "purchase").calibration.get() == pytest.approx(
        model.calibration.get()
    )
    older = params.model_copy(update={"calibration": None})
    assert Propensity.from_params(older, 0.01, "purchase").calibration.get() is None


def test_the_trainers_bookkeeping_is_not_part_of_the_version(
    examples_factory: ExamplesFactory,
) -> None:
    """A version cut again by a trainer that took over, or a progress record that learned
    nothing new, carries other offsets and counts but the same learned numbers: the same
    version, another params_sha256; each still reads back with its own bookkeeping. A record
    whose version is not its parameters' id is refused."""
    from stream_app.contracts.model_record import TrainerParams
    from stream_app.core.model_format import SnapshotError, record_digest, record_version

    models = SegmentModels(SegmentationSettings())
    train(models, examples_factory(100))
    models.trainer = TrainerParams(next_offset=10, sources={"p0": 3}, examples=100, duplicates=0)
    first = models.snapshot()
    models.trainer = TrainerParams(next_offset=17, sources={"p0": 5}, examples=100, duplicates=2)
    again = models.snapshot()
    assert record_version(first) == record_version(again) == models.content_version()
    assert record_digest(first) != record_digest(again)
    restored = SegmentModels(SegmentationSettings())
    restored.restore(again)
    assert restored.trainer is not None and restored.trainer.next_offset == 17
    other = SegmentModels(SegmentationSettings())
    train(other, examples_factory(101))
    forged = orjson.loads(first)
    forged["version"] = other.content_version()
    with pytest.raises(SnapshotError, match="is not its parameters' id"):
        restored.restore(orjson.dumps(forged))
