"""`stream-app models` against the real broker (issue 14, item 4), checked from outside.

Two shared-learning workers learn Online Retail through one trainer, which keeps a history of
versions. The command (a subprocess, as operators run it) lists them, pins every worker to an
older one while the trainer keeps learning, and unpins; each worker's `/counts` says which
version it scores with, and the changes on segment-changes which version scored them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from conftest import TopicReader
from test_shared_model import RETAIL, newest_cut, retail_events, settle, start_workers

from stream_app.live.workerproc import child_env
from stream_app.settings import SegmentationSettings, Settings
from stream_app.tools.publish import make_producer, publish

if TYPE_CHECKING:
    from conftest import WorkerProcess

SWITCH_BOUND_S = 15.0  # the follower polls every 0.2 s and switches at the next batch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not RETAIL.exists(), reason=f"{RETAIL} is absent (CI has it)"),
]


def models(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "models", *args],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def following(workers: list[WorkerProcess]) -> set[str]:
    return {w.wait_for(lambda c: True, 10)["model_version"] for w in workers}


def wait_following(workers: list[WorkerProcess], version: Callable[[], str]) -> float:
    """Seconds until every worker scores with `version()` (asked again each time)."""
    started = time.monotonic()
    while following(workers) != {version()}:
        assert time.monotonic() - started < SWITCH_BOUND_S, (following(workers), version())
        time.sleep(0.2)
    return time.monotonic() - started


def newest_now(settings: Settings) -> str:
    """The newest version the trainer cut (what the workers follow when nothing is pinned)."""
    version = newest_cut(settings).get("version")
    assert version is not None
    return str(version)


def check_list_and_choose_older(settings: Settings, newest: dict[str, Any]) -> str:
    """`models list` after the workers settled; an older version without a step back (its
    warm-ups done as in the newest), the one the test pins."""
    listed: dict[str, Any] = orjson.loads(models(settings, "list", "--json").stdout)
    versions = listed["versions"]
    assert len(versions) >= 2, versions
    assert listed["following"] == listed["newest"] == newest["version"] and not listed["pinned"]
    assert versions[-1]["version"] == newest["version"] and versions[-1]["following"]
    assert [v["published"] for v in versions] == sorted(v["published"] for v in versions)
    assert all(v["refused"] is None for v in versions)
    text = models(settings, "list").stdout
    assert newest["version"] in text and "following, newest" in text

    # An older version without a step back (same warm-ups done): the pin the test uses.
    now = versions[-1]
    candidates = [
        v["version"]
        for v in versions[:-1]
        if (v["tiered"], v["clusters_seeded"]) == (now["tiered"], now["clusters_seeded"])
    ]
    assert candidates, versions
    return str(candidates[0])


def test_list_pin_and_unpin_a_model_version_on_two_workers(
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    worker_factory: Callable[[Settings], WorkerProcess],
) -> None:
    settings = settings_factory(
        partitions=4,
        learning="shared",
        model_history_interval_s=1.0,
        batch_max_events=200,
        consumer_session_timeout_s=6,
        # Clusters seeded and tiers scored early: the versions kept after that are pinned
        # without a step back (under load the history keeps fewer versions, 1 s apart).
        segmentation=SegmentationSettings(
            cluster_warmup=500, cluster_warmup_days=0, tier_warm_up_labels=300
        ),
    )
    topics_factory(settings)
    events = retail_events()
    first, later = events[:6000], events[6000:]
    workers = start_workers(settings, worker_factory, 2)
    producer = make_producer(settings)
    publish(first, settings, producer=producer, flush=True)
    newest = settle(settings, workers, len(first))

    older = check_list_and_choose_older(settings, newest)
    shown = orjson.loads(models(settings, "show", older, "--json").stdout)
    assert shown["version"] == older and shown["examples"] < newest["examples"]
    assert len(shown["clusters"]) == settings.segmentation.cluster_count

    reader = TopicReader(settings, settings.segment_changes_topic)
    try:
        assert "pinned" in models(settings, "pin", older[-12:]).stdout
        took = wait_following(workers, lambda: older)
        pinned_at = time.time()
        publish(later, settings, producer=producer, flush=True)  # the trainer keeps learning
        deadline = time.monotonic() + 60
        while newest_cut(settings)["examples"] <= newest["examples"]:
            assert time.monotonic() < deadline, "the trainer stopped learning while pinned"
            time.sleep(0.5)
        time.sleep(2.0)
        assert following(workers) == {older}  # newer versions ignored while pinned
        assert newest_now(settings) != older  # the app key holds the newest, not the pin
        reader.poll(3.0)
        after = [
            orjson.loads(m.value())
            for m in reader.messages
            if m.timestamp()[1] / 1000 > pinned_at + 1.0
        ]
        assert after, "no change was emitted while pinned"
        assert {c["model_version"] for c in after} == {older}
        assert orjson.loads(models(settings, "list", "--json").stdout)["following"] == older

        assert "unpinned" in models(settings, "unpin").stdout
        back = wait_following(workers, lambda: newest_now(settings))
    finally:
        reader.close()
    assert newest_now(settings) != older and took < SWITCH_BOUND_S and back < SWITCH_BOUND_S
