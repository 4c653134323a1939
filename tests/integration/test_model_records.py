"""Model records on the real broker: a worker refuses a tampered record on the model-snapshots
topic (a pickle that would write a file, flipped bytes, a wrong HMAC) with one log line, starts
anyway and keeps scoring with the models it has; a record signed with its key is restored."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from conftest import TopicReader

from stream_app.core.models import SegmentModels
from stream_app.live.app import load_model_snapshot
from stream_app.settings import Settings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.publish import make_producer, publish
from stream_app.tools.replay import replay_offline

if TYPE_CHECKING:
    from conftest import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
REES46 = ROOT.parent / "shared" / "datasets" / "rees46_2019oct_head" / "events.csv.gz"
KEY = "integration-test-signing-key-0123456789"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not REES46.exists(), reason=f"{REES46} is absent (CI has it)"),
]


def file_writing_pickle(target: Path, version: str) -> bytes:
    """What made a worker write a file at start-up before (issue 14): a pickle whose loading
    calls open(target, "w"), in the old SAMODEL1 frame with a correct sha256, so the old
    checks passed it."""

    class Payload:
        def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
            return (open, (str(target), "w"))

    body = pickle.dumps(Payload(), protocol=5)
    return b"SAMODEL1" + version.encode().ljust(64, b" ") + hashlib.sha256(body).digest() + body


def flip_a_digit(record: bytes) -> bytes:
    """One bit of one learned number changed (a digit stays a digit: the JSON stays valid)."""
    at = record.rindex(b'intercept\\":') + len(b'intercept\\":')
    while not chr(record[at]).isdigit():
        at += 1
    return record[:at] + bytes([record[at] ^ 0x01]) + record[at + 1 :]


def write_record(settings: Settings, value: bytes) -> None:
    producer = make_producer(settings)
    producer.produce(
        settings.model_snapshots_topic, key=settings.app_id.encode(), value=value, partition=0
    )
    assert producer.flush(30) == 0


def processed_at_least(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda counts: sum(counts["events"].values()) >= n


def more_than(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda received: len(received) > n


def log_lines(worker: WorkerProcess, needle: str) -> list[str]:
    return [line for line in worker.log_tail(100_000).splitlines() if needle in line]


def test_a_tampered_model_record_is_refused_and_the_worker_keeps_scoring(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
    tmp_path: Path,
) -> None:
    settings = settings_factory(partitions=1, model_signing_key=KEY)
    topics_factory(settings)
    events = [e for e in read_dataset(REES46, "rees46") if not isinstance(e, RowError)]
    chunks = [events[i : i + 3000] for i in range(3000, 15000, 3000)]
    _, trained, _ = replay_offline(events[:3000], settings.segmentation)
    signed = trained.models.snapshot(KEY.encode())
    marker = tmp_path / "written-by-a-pickle"
    records: list[tuple[str, bytes, str | None]] = [
        ("signed with our key", signed, None),
        ("pickle", file_writing_pickle(marker, trained.models.version), "(not JSON)"),
        ("flipped bytes", flip_a_digit(signed), "digest mismatch"),
        ("wrong HMAC", trained.models.snapshot(b"not-our-key" * 4), "signature does not match"),
    ]
    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        for (name, record, refusal), chunk in zip(records, chunks, strict=True):
            write_record(settings, record)
            worker = worker_factory(settings)
            worker.wait_ready()
            if refusal is None:
                (restored,) = log_lines(worker, "models restored from snapshot")
                assert trained.models.content_version() in restored, name
            else:
                (line,) = log_lines(worker, "refused the stored model snapshot")
                assert refusal in orjson.loads(line)["msg"], (name, line)
                assert not log_lines(worker, "models restored from snapshot"), name
            # It keeps scoring: every event of a new chunk is processed, and changes come out.
            before = len(reader.received)
            assert publish(chunk, settings).published == len(chunk)
            worker.wait_for(processed_at_least(len(chunk)), timeout=120)
            assert reader.until(more_than(before), timeout=60), name
            assert worker.stop() == 0, worker.log_tail()
            assert not marker.exists(), f"{name}: the pickle ran"
    finally:
        reader.close()
    # What the worker wrote itself at shutdown is a model record signed with its key.
    assert load_model_snapshot(settings, SegmentModels(settings.segmentation))
