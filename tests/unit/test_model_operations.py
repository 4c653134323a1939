"""Model operations (issue 14, item 4), without a broker: the follower's pin, the trainer's
bounded history, and what `stream-app models` makes of the records on the models topic.

Records are real model records (``Trainer.version``); the topic is a list of
:class:`LogRecord`; a fake producer stands in for the trainer's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stream_app.contracts.model_record import TrainerParams
from stream_app.core.learning import Trainer
from stream_app.core.model_format import record_version
from stream_app.core.models import SegmentModels
from stream_app.errors import UserError
from stream_app.live import model_log
from stream_app.live.model_log import (
    PUBLISHED_HEADER,
    LogRecord,
    ModelHistory,
    history_key,
    newest_key,
    pin_key,
)
from stream_app.live.trainer import ModelFollower, latest_model_record
from stream_app.settings import Settings
from stream_app.tools.models_cli import catalogue, render_list, render_show, step_back

APP = "ops-app"
SETTINGS = Settings(state_dir="/nonexistent", app_id=APP, learning="shared")


def versions(n: int) -> list[bytes]:
    """`n` distinct model versions, as a trainer publishes them (more learned each time: a
    version is its learned numbers, not the trainer's count)."""
    out = []
    t = Trainer(SegmentModels(SETTINGS.segmentation))
    for i in range(n):
        t.models.purchase.learn({"order_count": float(i)}, i % 2 == 0, 0.5)
        t.progress.examples = 100 * (i + 1)
        out.append(t.version())
    return out


def tampered(data: bytes) -> bytes:
    """The record with one learned number changed, its digest left as it was."""
    changed = data.replace(b'\\"examples\\":', b'\\"examples\\":9', 1)
    assert changed != data
    return changed


def follower() -> tuple[ModelFollower, list[str]]:
    """A follower and what it offered: "<version>" for a version, "pin <version>" for a pin,
    "unpin" when the pin is removed."""
    offered: list[str] = []

    def offer(models: SegmentModels | None, pinned: bool) -> None:
        if models is None:
            offered.append("unpin")
        else:
            offered.append(f"pin {models.stamp}" if pinned else models.stamp)

    return ModelFollower(SETTINGS, offer), offered


def feed(f: ModelFollower, *records: tuple[bytes | None, bytes | None]) -> None:
    """One burst of records, as the follower's poll loop reads them."""
    changed = False
    for key, value in records:
        changed = f.take(key, value) or changed
    if changed:
        f.follow()


# --- the follower ----------------------------------------------------------------------------


def test_every_version_is_offered_in_order_and_a_pin_wins_until_unpinned() -> None:
    records = versions(3)
    v1, v2, v3 = (record_version(v) for v in records)
    f, offered = follower()
    feed(f, (newest_key(APP), records[0]), (newest_key(APP), records[1]))
    assert offered == [v1, v2]  # a burst: each, in order (the worker keeps them by epoch)
    feed(f, (pin_key(APP), records[0]))
    assert offered[-1] == f"pin {v1}" and f.pinned == v1
    feed(f, (newest_key(APP), records[2]))  # the trainer keeps publishing: kept, pin stays
    assert offered[-1] == v3 and f.pinned == v1
    feed(f, (pin_key(APP), None))  # unpin: a tombstone
    assert offered[-1] == "unpin" and f.pinned is None
    assert offered == [v1, v2, f"pin {v1}", v3, "unpin"]


def test_a_version_read_again_is_not_offered_again() -> None:
    (v1,) = versions(1)
    f, offered = follower()
    feed(f, (newest_key(APP), v1))
    feed(f, (newest_key(APP), v1), (pin_key(APP), v1))
    assert offered == [record_version(v1), f"pin {record_version(v1)}"]


def test_history_keys_and_other_apps_are_never_followed() -> None:
    v1, v2 = versions(2)
    f, offered = follower()
    feed(f, (newest_key(APP), v1))
    feed(
        f,
        (history_key(APP, record_version(v2)), v2),
        (newest_key("other-app"), v2),
        (pin_key("other-app"), v2),
        (f"{APP}/history".encode(), v2),
        (None, v2),
    )
    assert offered == [record_version(v1)] and f.current == record_version(v1)


def test_a_pin_that_fails_its_checks_is_refused_and_the_newest_followed() -> None:
    v1, v2 = versions(2)
    f, offered = follower()
    feed(f, (newest_key(APP), v2))
    feed(f, (pin_key(APP), tampered(v1)))
    assert offered == [record_version(v2)] and f.pinned is None and f.refused == 1


class FakeMessage:
    def __init__(self, offset: int, key: bytes | None, value: bytes | None) -> None:
        self._offset, self._key, self._value = offset, key, value

    def error(self) -> None:
        return None

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self._offset * 1000)

    def headers(self) -> None:
        return None


class FakeConsumer:
    """The models topic for code that reads it with a confluent-kafka Consumer."""

    topic: list[tuple[bytes | None, bytes | None]] = []

    def __init__(self, config: dict[str, Any], **kwargs: Any) -> None:  # logger=...
        self.messages = [FakeMessage(i, k, v) for i, (k, v) in enumerate(self.topic)]

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        return 0, len(self.messages)

    def assign(self, partitions: Any) -> None:
        return None

    def poll(self, timeout: float) -> FakeMessage | None:
        return self.messages.pop(0) if self.messages else None

    def close(self) -> None:
        return None


def test_the_trainers_restore_reads_the_app_key_only(monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2, v3 = versions(3)
    FakeConsumer.topic = [
        (newest_key(APP), v1),
        (history_key(APP, record_version(v1)), v1),
        (pin_key(APP), v2),  # written after the newest: still not the newest
        (history_key(APP, record_version(v3)), v3),
    ]
    monkeypatch.setattr(model_log, "Consumer", FakeConsumer)  # what latest_model_record reads
    assert latest_model_record(SETTINGS) == v1


def test_a_worker_starting_while_pinned_restores_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2, v3 = versions(3)
    monkeypatch.setattr(model_log, "Consumer", FakeConsumer)
    FakeConsumer.topic = [(newest_key(APP), v1), (pin_key(APP), v2), (newest_key(APP), v3)]
    assert latest_model_record(SETTINGS, honour_pin=True) == v2  # the pin beats the newest
    assert latest_model_record(SETTINGS) == v3  # the trainer continues from the newest
    FakeConsumer.topic.append((pin_key(APP), None))  # unpinned: a tombstone
    assert latest_model_record(SETTINGS, honour_pin=True) == v3


# --- the trainer's history -------------------------------------------------------------------


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes | None]] = []

    def produce(self, topic: str, key: bytes, value: bytes | None, **kwargs: Any) -> None:
        assert topic == SETTINGS.model_snapshots_topic and kwargs["partition"] == 0
        self.sent.append((key, value))

    def flush(self, timeout: float) -> int:
        return 0


def test_history_keeps_the_first_version_then_one_per_interval_and_at_most_keep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = SETTINGS.model_copy(
        update={"model_history_interval_s": 60.0, "model_history_keep": 2}
    )
    monkeypatch.setattr(model_log, "read_model_log", lambda s: [])  # nothing on the topic yet
    clock = [1_000.0]
    monkeypatch.setattr("stream_app.live.model_log.time.time", lambda: clock[0])
    history, producer = ModelHistory(settings), FakeProducer()
    v = versions(4)
    ids = [record_version(data) for data in v]
    assert history.after_publish(producer, v[0], ids[0])  # the first, always
    clock[0] += 30
    assert not history.after_publish(producer, v[1], ids[1])  # within the interval
    clock[0] += 31
    assert history.after_publish(producer, v[1], ids[1])
    clock[0] += 61
    assert history.after_publish(producer, v[2], ids[2])  # a third: the first is dropped
    assert producer.sent == [
        (history_key(APP, ids[0]), v[0]),
        (history_key(APP, ids[1]), v[1]),
        (history_key(APP, ids[2]), v[2]),
        (history_key(APP, ids[0]), None),
    ]


def test_history_continues_from_what_the_topic_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer taking over reads the history first: no new entry before the interval since
    the newest one, whoever wrote it."""
    v = versions(2)
    held = LogRecord(history_key(APP, record_version(v[0])), v[0], 3, 1_000_000, {})
    monkeypatch.setattr(model_log, "read_model_log", lambda s: [held])
    monkeypatch.setattr(
        "stream_app.live.model_log.time.time", lambda: 1_000.0 + 100
    )  # 100 s after it
    history = ModelHistory(SETTINGS)  # default interval: an hour
    assert not history.after_publish(FakeProducer(), v[1], record_version(v[1]))


# --- what `stream-app models` lists ----------------------------------------------------------


def topic_records(v: list[bytes]) -> list[LogRecord]:
    ids = [record_version(data) for data in v]
    at = 1_700_000_000_000
    return [
        LogRecord(newest_key(APP), v[0], 0, at, {}),
        LogRecord(history_key(APP, ids[0]), v[0], 1, at, {}),
        LogRecord(newest_key(APP), v[1], 2, at + 1000, {}),
        LogRecord(newest_key(APP), v[2], 3, at + 2000, {}),
        LogRecord(history_key(APP, ids[2]), v[2], 4, at + 2000, {}),
        LogRecord(newest_key(APP), v[3], 5, at + 3000, {}),
    ]


def test_list_holds_history_and_newest_oldest_first_and_follows_the_newest() -> None:
    v = versions(4)
    found = catalogue(SETTINGS, topic_records(v))
    ids = [record_version(data) for data in v]
    # v[1] was replaced under the app key and never kept in the history: gone.
    assert [info.version for info in found.versions] == [ids[0], ids[2], ids[3]]
    assert found.newest == ids[3] and found.pinned is None and found.following == ids[3]
    assert [info.examples for info in found.versions] == [100, 300, 400]
    assert found.versions[0].published_ms == 1_700_000_000_000
    assert found.versions[-1].held_as == ["newest"]
    text = render_list(found)
    assert text.splitlines()[-1] == "no pin: workers follow the newest version"
    assert ids[3] in text and "following, newest" in text and "2023-11-14T22:13:20Z" in text


def test_a_pin_is_listed_followed_and_survives_the_history() -> None:
    v = versions(4)
    ids = [record_version(data) for data in v]
    records = topic_records(v)
    headers = {PUBLISHED_HEADER: b"1699000000000"}
    records.append(LogRecord(pin_key(APP), v[1], 6, 1_700_000_009_000, headers))
    found = catalogue(SETTINGS, records)
    pinned = found.find(ids[1], SETTINGS.model_snapshots_topic)
    assert pinned.pinned and pinned.following and pinned.held_as == ["pin"]
    assert pinned.published_ms == 1_699_000_000_000  # when it was published, not pinned
    assert found.versions[0] is pinned  # ordered by publication
    assert found.newest == ids[3] and not found.find(ids[3], "t").following
    assert f"pinned to {ids[1]}" in render_list(found)
    # The end of an id names it too; unknown and ambiguous references are refused.
    assert found.find(ids[1][-12:], "t") is pinned
    with pytest.raises(UserError, match=r"model version 'nope' is not on t \(it holds 4"):
        found.find("nope", "t")
    with pytest.raises(UserError, match="matches 4 model versions"):
        found.find("river-kmeans-logreg.", "t")
    unpinned = catalogue(SETTINGS, [*records, LogRecord(pin_key(APP), None, 7, None, {})])
    assert unpinned.pinned is None and unpinned.following == ids[3]


def test_a_record_the_workers_would_refuse_is_listed_as_refused_and_not_followed() -> None:
    v = versions(2)
    records = [
        LogRecord(newest_key(APP), v[0], 0, 1, {}),
        LogRecord(history_key(APP, record_version(v[0])), v[0], 1, 1, {}),
        LogRecord(newest_key(APP), tampered(v[1]), 2, 2, {}),
    ]
    found = catalogue(SETTINGS, records)
    bad = found.versions[-1]
    assert bad.refused is not None and "digest mismatch" in bad.refused
    assert not bad.following and found.following is None  # the workers keep what they have
    assert "REFUSED: model record digest mismatch" in render_list(found)


def test_show_says_one_fact_a_line_with_each_clusters_name_and_size() -> None:
    (data,) = versions(1)
    info = catalogue(SETTINGS, [LogRecord(newest_key(APP), data, 0, 0, {})]).versions[0]
    lines = render_show(info).splitlines()
    assert lines[0] == f"version: {record_version(data)}"
    assert "examples learned: 100" in lines and "following: yes" in lines
    assert "published: 1970-01-01T00:00:00Z" in lines
    clusters = [line for line in lines if line.startswith("cluster ")]
    assert len(clusters) == SETTINGS.segmentation.cluster_count
    assert clusters[0].endswith("(0 members)")
    details = info.details()
    assert {c["cluster"] for c in details["clusters"]} == set(range(len(clusters)))
    assert details["purchase"]["labels"] == 1 and details["examples"] == 100


def test_pinning_a_version_before_the_warm_ups_is_a_step_back_for_everyone() -> None:
    v = versions(2)
    found = catalogue(SETTINGS, [LogRecord(newest_key(APP), v[0], 0, 0, {})])
    untrained = found.versions[0]
    assert not untrained.tiered and not untrained.clusters_seeded
    assert step_back(untrained, untrained) is None  # nothing to lose
    trained = catalogue(SETTINGS, [LogRecord(newest_key(APP), v[1], 0, 0, {})]).versions[0]
    trained.tiered = True
    harm = step_back(trained, untrained)
    assert harm is not None and "every customer would turn `unscored`" in harm
    trained.tiered, trained.clusters_seeded = False, True
    harm = step_back(trained, untrained)
    assert harm is not None and "cluster 0" in harm


# --- the command line ------------------------------------------------------------------------


def models_cli(tmp_path: Path, *args: str) -> str:
    """`stream-app models ARGS` as users run it; its one error line (exit 2, no traceback)."""
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "models", *args],
        cwd=tmp_path,
        env={**os.environ, "STREAM_APP_BOOTSTRAP_SERVERS": "127.0.0.1:1"},  # no broker there
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_models_without_a_broker_is_one_line_and_exit_2(tmp_path: Path) -> None:
    assert models_cli(tmp_path, "list") == (
        "error: Kafka at 127.0.0.1:1 did not answer within 5s "
        "(start it with `stream-app kafka start` or `docker compose up`)"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("show",), "error: models show needs a VERSION (see `stream-app models list`)"),
        (("pin",), "error: models pin needs a VERSION (see `stream-app models list`)"),
        (("list", "abc"), "error: models list takes no VERSION"),
        (("unpin", "--force"), "error: --force is for models pin only"),
    ],
)
def test_models_usage_mistakes_are_one_line(
    tmp_path: Path, args: tuple[str, ...], line: str
) -> None:
    assert models_cli(tmp_path, *args) == line


def test_the_newest_version_is_the_latest_boundary_not_the_last_record() -> None:
    """A trainer that took over cuts earlier boundaries again: the newest version (what the
    workers follow) is the one with the latest boundary; progress records are not versions."""

    def cut(boundary: float, closed: float | None = None) -> bytes:
        models = SegmentModels(SETTINGS.segmentation)
        models.trainer = TrainerParams(
            next_offset=0,
            sources={},
            examples=int(boundary),
            duplicates=0,
            closed_until=boundary if closed is None else closed,
            valid_from=boundary,
        )
        return models.snapshot()

    later, again, progress = cut(172800.0), cut(86400.0), cut(172800.0, closed=200000.0)
    key = newest_key(APP)
    records = [
        LogRecord(key, later, 0, 1_000, {}),
        LogRecord(key, again, 1, 2_000, {}),
        LogRecord(key, progress, 2, 3_000, {}),
    ]
    found = catalogue(SETTINGS, records)
    assert found.newest == record_version(later)
    assert [v.version for v in found.versions if v.following] == [record_version(later)]


def test_the_history_keeps_the_newest_of_the_versions_published_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trainer publishes what one read completes at once; the history keeps the newest of
    them, stamped after it (keeping an earlier one stamped it later than the newest, and
    `models list` showed an older version last: seen in test_model_pins)."""
    from stream_app.live.trainer import TrainerService

    monkeypatch.setattr(model_log, "read_model_log", lambda s: [])
    service, producer = TrainerService(SETTINGS), FakeProducer()
    v = versions(3)
    service._publish(producer, v)
    newest = record_version(v[-1])
    assert producer.sent == [
        *[(APP.encode(), data) for data in v],
        (history_key(APP, newest), v[-1]),
    ]
    assert service.published == newest and service.publications == 3


def test_each_version_is_kept_under_its_epochs_slot_against_compaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compaction keeps one record per key: besides the app key, each version cut at an epoch
    boundary goes under `<app>/recent/<epoch number mod model_recent_keep>`, so the newest
    epochs' versions survive it (a later epoch of the same slot replaces an older one); a
    progress record, which scores nothing, does not."""
    from stream_app.live.model_log import is_followed_key, recent_key
    from stream_app.live.trainer import TrainerService

    monkeypatch.setattr(model_log, "read_model_log", lambda s: [])
    settings = SETTINGS.model_copy(update={"model_recent_keep": 6})
    day = settings.model_epoch_s
    t = Trainer(SegmentModels(settings.segmentation))
    cut = []
    for epoch, closed in ((10, 10), (11, 11), (17, 17), (17, 18)):  # the last: progress
        t.models.purchase.learn({"order_count": float(epoch)}, True, 0.5)
        t.progress.examples += 1
        params = t.progress.to_params().model_copy(
            update={"valid_from": epoch * day, "closed_until": closed * day}
        )
        t.models.trainer = params
        cut.append(t.models.snapshot())
    service, producer = TrainerService(settings), FakeProducer()
    service._publish(producer, cut)
    recent = [(key, data) for key, data in producer.sent if b"/recent/" in key]
    assert recent == [
        (f"{APP}/recent/4".encode(), cut[0]),
        (f"{APP}/recent/5".encode(), cut[1]),
        (f"{APP}/recent/5".encode(), cut[2]),
    ]
    assert recent_key(APP, 17 * day, day, 6) == f"{APP}/recent/5".encode()
    assert all(is_followed_key(APP, key) for key, _ in recent)
    assert not is_followed_key(APP, history_key(APP, "v")) and not is_followed_key(APP, None)


def test_the_follower_takes_the_recent_and_bootstrap_keys_and_every_record_once() -> None:
    """A compacted topic may hold a version only under its recent key, and the bootstrap only
    under its own; the follower offers those. A record read twice (app key and recent key) is
    offered once, but a progress record of the same version (same learned numbers, the trainer
    further on) is offered too: it tells the workers how far versions are final."""
    from stream_app.live.model_log import bootstrap_key, recent_key

    (v1,) = versions(1)
    models = SegmentModels(SETTINGS.segmentation)
    models.restore(v1)
    models.trainer = TrainerParams(next_offset=99, sources={}, examples=100, duplicates=0)
    further = models.snapshot()
    boot = versions(2)[1]
    f, offered = follower()
    day = SETTINGS.model_epoch_s
    feed(
        f,
        (recent_key(APP, 3 * day, day, 32), v1),
        (newest_key(APP), v1),
        (newest_key(APP), further),
        (bootstrap_key(APP), boot),
        (history_key(APP, record_version(boot)), boot),  # the history is not followed
    )
    assert offered == [record_version(v1), record_version(v1), record_version(boot)]
    assert record_version(further) == record_version(v1)
