"""The worker's live page in a real browser (Debian's headless Chromium), served by a real worker
on the real broker: no console error, no request but the page, and its figures equal to
independent ones: the sizes counted from the segment-changes topic by a plain consumer, and the
models' quality of an offline Processor fed the same events (one partition, learning in process:
the worker is deterministic)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from conftest import TopicReader, final_segments
from headless_chromium import chromium

from stream_app.contracts.events import Event
from stream_app.core.models import SegmentModels
from stream_app.core.processor import MemoryStore, Processor
from stream_app.live.pages import LIVE_PAGE_PATH
from stream_app.settings import Settings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.publish import make_producer, publish

if TYPE_CHECKING:
    from conftest import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
RETAIL = ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"
EVENTS = 6000  # Online Retail's first invoices: December 2010 to spring 2011, labels mature

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)"),
]

PAGE_FIGURES = """JSON.stringify([...document.querySelectorAll('[data-value]')].map(e => ({
  id: e.id, data: Object.assign({}, e.dataset)})))"""


def first_events() -> list[Event]:
    events = [e for e in read_dataset(RETAIL, "online-retail") if not isinstance(e, RowError)]
    return events[:EVENTS]


def offline_quality(settings: Settings, events: list[Event]) -> dict[str, dict[str, Any]]:
    """The models' progressive quality after the same events, in process (no final advance:
    the worker has not seen time pass beyond its last event either)."""
    processor = Processor(
        settings.segmentation, SegmentModels(settings.segmentation), MemoryStore()
    )
    for event in events:
        processor.process(event)
    models = processor.models
    return {"purchase": models.purchase.quality(), "churn": models.churn.quality()}


def sizes_from_topic(changes: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    sizes: Counter[tuple[str, str]] = Counter()
    for _, segment in final_segments(changes).values():
        sizes["cluster", f"c{segment['cluster']}"] += 1
        sizes["tier", segment["propensity_tier"]] += 1
        sizes["lifecycle", segment["lifecycle"]] += 1
    return dict(sizes)


def test_live_page_shows_this_workers_segments_and_model_quality(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    # In process: the page's figures are held to an offline Processor learning as it scores.
    settings = settings_factory(partitions=1, learning="in_process")
    topics_factory(settings)
    events = first_events()
    producer = make_producer(settings)
    assert publish(events, settings, producer=producer).published == EVENTS
    assert producer.flush(30) == 0

    worker = worker_factory(settings)
    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        worker.wait_for(lambda c: sum(c["events"].values()) >= EVENTS, timeout=240)
        reader.poll(3.0)  # the changes of the last batch
        with chromium() as page:
            url = worker.url + LIVE_PAGE_PATH
            page.load(url)
            problems = page.problems()
            figures = orjson.loads(page.evaluate(PAGE_FIGURES))
            page.screenshot(Path(worker.log_path).with_name("live-page.png"))
        reader.poll(1.0)
    finally:
        reader.close()
    assert problems.errors() == []
    assert problems.requests == [url], (problems.requests[:8], figures[:3])

    by_id = {f["id"]: orjson.loads(f["data"]["value"]) for f in figures if f["id"]}
    shown = {
        (f["data"]["dimension"], f["data"]["segment"]): orjson.loads(f["data"]["value"])
        for f in figures
        if "dimension" in f["data"]
    }
    expected = sizes_from_topic(reader.received)
    assert shown == expected
    assert by_id["live-customers"] == len(final_segments(reader.received)) > 1000
    assert by_id["live-events"] == EVENTS

    quality = offline_quality(settings, events)
    assert quality["purchase"]["roc_auc"] is not None  # the figure is a real one
    for name in ("purchase", "churn"):
        assert by_id[f"live-auc-{name}"] == quality[name]["roc_auc"]
        for figure in ("labels", "positive_rate", "log_loss", "ece"):
            (cell,) = [
                f for f in figures if f["data"].get("model") == name
                and f["data"].get("figure") == figure
            ]  # fmt: skip
            assert orjson.loads(cell["data"]["value"]) == quality[name][figure]
    assert worker.stop() == 0, worker.log_tail()
