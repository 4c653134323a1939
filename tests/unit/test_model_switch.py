"""Switching versions (`stream-app models pin`, then `unpin`) without a storm of changes.

The LivePipeline is driven directly (as in test_shared_learning.py). One trainer learns what a
first pass over the events sent; it publishes an older version (a quarter of the examples) and
a newer one (all of them). Then the same events go through two pipelines that score with the
newer version: A throughout, B pinned to the older version from event S and back on the newer
at U (no trainer runs here, so both score pinned throughout: the unpin is a pin of the newer).
Oracle: right after each switch, B changes a segment only where the score under the version
it switched to crosses a hysteresis threshold from the customer's tier (so about as many
customers change as without a switch, never everyone); and a version from before the tier
warm-up would turn everyone `unscored`, which is why `models pin` refuses it without --force.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import orjson
from test_shared_learning import CLICKS, SALES, T0, ExampleLog, Sinks, run, shared_pipeline

from stream_app.contracts.events import PropensityTier
from stream_app.core.learning import ExampleBatch, Trainer
from stream_app.core.model_format import record_version
from stream_app.core.models import SegmentModels
from stream_app.core.segmentation import next_tier
from stream_app.live.model_log import LogRecord, history_key, newest_key
from stream_app.live.pipeline import LivePipeline
from stream_app.live.trainer import decode_version
from stream_app.settings import SegmentationSettings, Settings
from stream_app.tools.models_cli import catalogue, step_back

EVENTS, CUSTOMERS, STEP_MINUTES, BATCH = 6000, 150, 40, 50
S, U = 3000, 4500  # pin at event S, unpin at event U
WINDOW = timedelta(days=3)  # "right after the switch": ~110 events, ~75 customers


def items(seed: int = 7) -> list[tuple[str, bytes]]:
    """Views and purchases of customers who buy rarely, sometimes or often, over 170 days."""
    rng = random.Random(seed)
    rate = {f"c{i}": rng.choice([0.05, 0.2, 0.5]) for i in range(CUSTOMERS)}
    out = []
    for i in range(EVENTS):
        customer = f"c{rng.randrange(CUSTOMERS)}"
        body: dict[str, Any] = {
            "customer_id": customer,
            "event_time": (T0 + timedelta(minutes=STEP_MINUTES * i)).isoformat(),
        }
        if rng.random() < rate[customer]:
            amount = f"{5 + rng.randrange(90)}.50"
            body |= {"event_id": f"t{i}", "event_type": "purchase", "order_id": f"o{i}"}
            out.append((SALES, orjson.dumps({**body, "amount": amount, "currency": "GBP"})))
        else:
            body |= {"event_id": f"e{i}", "event_type": "product_view"}
            out.append((CLICKS, orjson.dumps(body)))
    return out


def settings_for(seg: SegmentationSettings) -> Settings:
    return Settings(state_dir="/nonexistent", partitions=1, segmentation=seg, learning="shared")


def pipeline(settings: Settings, log: ExampleLog, models: SegmentModels) -> LivePipeline:
    return shared_pipeline({}, log, models, settings=settings)


async def feed(p: LivePipeline, events: list[tuple[str, bytes]], lo: int, hi: int) -> None:
    await run(p, events[:hi], lo, BATCH)


async def published_versions(settings: Settings, events: list[tuple[str, bytes]]) -> list[bytes]:
    """The older and the newer record a trainer publishes from what a first pass sent."""
    log = ExampleLog()
    await feed(pipeline(settings, log, SegmentModels(settings.segmentation)), events, 0, EVENTS)
    trainer = Trainer(SegmentModels(settings.segmentation))
    records = []
    for offset, raw in enumerate(log.sent):
        trainer.learn(ExampleBatch.from_bytes(raw), offset)
        if offset in (len(log.sent) // 4, len(log.sent) - 1):
            records.append(trainer.version())
    return records


async def changes(
    settings: Settings, events: list[tuple[str, bytes]], newer: bytes, older: bytes | None
) -> list[dict[str, Any]]:
    """Every change of a pipeline scoring with `newer`, pinned to `older` over [S, U)."""
    p = pipeline(settings, ExampleLog(), decode_version(settings, newer))
    await feed(p, events, 0, S)
    if older is not None:
        p.offer_models(decode_version(settings, older), pinned=True)
    await feed(p, events, S, U)
    if older is not None:
        p.offer_models(decode_version(settings, newer), pinned=True)
    await feed(p, events, U, EVENTS)
    assert isinstance(p.sinks, Sinks)
    return p.sinks.changes


def after(changes: list[dict[str, Any]], event: int) -> list[dict[str, Any]]:
    start = T0 + timedelta(minutes=STEP_MINUTES * event)
    return [c for c in changes if start <= datetime.fromisoformat(c["event_time"]) < start + WINDOW]


def active(events: list[tuple[str, bytes]], event: int) -> int:
    """Customers with an event in the window after `event`."""
    per_window = int(WINDOW / timedelta(minutes=STEP_MINUTES))
    return len({orjson.loads(v)["customer_id"] for _, v in events[event : event + per_window]})


async def test_pin_and_unpin_change_only_customers_whose_score_crosses_a_threshold() -> None:
    seg = SegmentationSettings(cluster_warmup=20, cluster_warmup_days=0, tier_warm_up_labels=100)
    settings = settings_for(seg)
    events = items()
    older, newer = await published_versions(settings, events)
    a = await changes(settings, events, newer, None)
    b = await changes(settings, events, newer, older)
    old_id, new_id = (decode_version(settings, r).stamp for r in (older, newer))
    for event, version in ((S, old_id), (U, new_id)):
        without, with_switch = after(a, event), after(b, event)
        assert {c["model_version"] for c in with_switch} == {version}  # it did switch
        assert with_switch != without  # and the switch changed something
        for change in with_switch:
            current = PropensityTier(change["current"]["propensity_tier"])
            assert current is not PropensityTier.UNSCORED
            if change["component"] != "propensity":
                continue
            previous = PropensityTier(change["previous"]["propensity_tier"])
            score = change["scores"]["purchase_propensity"]
            # The new version's score crossed a threshold from the tier the customer had.
            assert current is not previous
            assert next_tier(previous, score, True, seg) is current, change
        customers = {c["customer_id"] for c in with_switch}
        assert len(with_switch) <= 2 * len(without) + 5
        assert len(customers) <= active(events, event) / 3  # not a storm: most keep theirs


async def test_a_version_before_the_tier_warm_up_would_turn_everyone_unscored() -> None:
    """Why `models pin` refuses such a version: the older one learned too few labels."""
    seg = SegmentationSettings(cluster_warmup=20, cluster_warmup_days=0, tier_warm_up_labels=1000)
    settings = settings_for(seg)
    events = items()
    older, newer = await published_versions(settings, events)
    b = await changes(settings, events, newer, older)
    unscored = {
        c["customer_id"]
        for c in after(b, S)
        if c["current"]["propensity_tier"] == PropensityTier.UNSCORED.value
    }
    assert len(unscored) >= active(events, S) / 2  # the storm a pin must not cause
    records = [
        LogRecord(history_key(settings.app_id, record_version(older)), older, 0, 0, {}),
        LogRecord(newest_key(settings.app_id), newer, 1, 1, {}),
    ]
    infos = catalogue(settings, records).versions
    was, pinned = infos[1], infos[0]
    assert was.tiered and not pinned.tiered
    harm = step_back(was, pinned)
    assert harm is not None and "unscored" in harm
