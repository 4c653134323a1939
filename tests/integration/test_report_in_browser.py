"""The segment report in a real browser (Debian's headless Chromium): made by the commands a
user runs from a real offline replay of Online Retail, it opens with no console error and no
request but its own file, and the figures in its DOM are the ones the Python figures computed,
which in turn agree with the replay's own report (an independent count of the same run)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from headless_chromium import chromium

from stream_app.live.workerproc import child_env
from stream_app.settings import SegmentationSettings, Settings
from stream_app.tools.datasets import RowError, read_dataset
from stream_app.tools.report import ReportFigures, build_figures, change_log

ROOT = Path(__file__).resolve().parents[2]
RETAIL = ROOT.parent / "shared" / "datasets" / "online_retail" / "online_retail.csv.gz"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not RETAIL.exists(), reason=f"needs {RETAIL}"),
]

# Every element with a data-value, as the browser sees it.
DOM_FIGURES = """JSON.stringify([...document.querySelectorAll('[data-value]')].map(e => ({
  id: e.id, data: Object.assign({}, e.dataset), text: e.textContent.trim()})))"""
CHARTS = """[...document.querySelectorAll('svg.chart')].map(s => {
  const box = s.getBoundingClientRect(); return [s.id, box.width, box.height,
  s.querySelectorAll('polyline, rect, circle').length]; })"""


def stream_app(cwd: Path, *args: str) -> str:
    """The command as a user runs it; its standard output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_APP_")}
    # The figures below are of the in-process replay (one model version for the whole file).
    env["STREAM_APP_LEARNING"] = "in_process"
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass(frozen=True)
class Made:
    page: Path
    replay_report: dict[str, Any]
    figures: ReportFigures


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    folder = tmp_path_factory.mktemp("report")
    stream_app(
        folder, "replay", str(RETAIL), "--format", "online-retail", "--offline",
        "--out", "changes.jsonl", "--report", "replay.json", "--no-progress",
    )  # fmt: skip
    stream_app(
        folder, "report", "changes.jsonl", "--out", "report.html", "--dataset", str(RETAIL),
        "--format", "online-retail", "--replay-report", "replay.json", "--no-progress",
    )  # fmt: skip
    replay_report = orjson.loads((folder / "replay.json").read_bytes())
    events = [e for e in read_dataset(RETAIL, "online-retail") if not isinstance(e, RowError)]
    with (folder / "changes.jsonl").open("rb") as lines:
        figures = build_figures(
            change_log(lines), SegmentationSettings(), events=events, replay_report=replay_report
        )
    return Made(folder / "report.html", replay_report, figures)


@pytest.fixture(scope="module")
def dom(made: Made) -> Iterator[tuple[list[dict[str, Any]], Any]]:
    with chromium() as page:
        page.load(made.page.as_uri())
        problems = page.problems()
        assert problems.errors() == []
        assert problems.requests == [made.page.as_uri()]  # nothing but the page itself
        figures = orjson.loads(page.evaluate(DOM_FIGURES))
        charts = page.evaluate(CHARTS)
        page.screenshot(made.page.with_suffix(".png"))
        yield figures, charts


def one(figures: list[dict[str, Any]], **wanted: str) -> Any:
    (found,) = [f for f in figures if all(f["data"].get(k) == v for k, v in wanted.items())]
    return orjson.loads(found["data"]["value"])


def by_id(figures: list[dict[str, Any]], element_id: str) -> Any:
    (found,) = [f for f in figures if f["id"] == element_id]
    return orjson.loads(found["data"]["value"])


def test_the_headline_is_the_replays_own_count(
    made: Made, dom: tuple[list[dict[str, Any]], Any]
) -> None:
    figures, _ = dom
    expected = made.replay_report
    assert by_id(figures, "total-customers") == made.figures.summary.customers
    assert by_id(figures, "total-customers") == expected["customers"] == 4372
    assert by_id(figures, "total-changes") == sum(expected["segment_changes"].values())
    assert by_id(figures, "model-versions") == 1


def test_final_sizes_and_cluster_members_match_the_replays_store(
    made: Made, dom: tuple[list[dict[str, Any]], Any]
) -> None:
    figures, _ = dom
    for stage, count in made.replay_report["lifecycle"].items():
        assert one(figures, dimension="lifecycle", segment=stage) == count
    for cluster in made.replay_report["clusters"]:
        assert one(figures, dimension="cluster", segment=f"c{cluster['id']}") == cluster["members"]
        for feature, centre in cluster["centre"].items():
            assert one(figures, cluster=str(cluster["id"]), feature=feature) == centre
    for tier, count in made.figures.sizes.final("tier").items():
        assert one(figures, dimension="tier", segment=tier) == count


def test_score_quality_and_buy_rates_match_the_replays_audit(
    made: Made, dom: tuple[list[dict[str, Any]], Any]
) -> None:
    figures, _ = dom
    for name, key in (("purchase_propensity", "purchase"), ("churn_risk", "churn")):
        audit = made.replay_report[f"{key}_scores_emitted"]["all"]
        assert by_id(figures, f"auc-{name}") == audit["auc"]
        assert by_id(figures, f"ece-{name}") == audit["ece"]
        assert by_id(figures, f"judged-{name}") == audit["judged"]
        quality = made.figures.outcomes.quality[name] if made.figures.outcomes else None
        assert quality is not None and len(quality.periods) >= 6
        for period in quality.periods:
            assert one(figures, score=name, period=period.period, figure="auc") == period.auc
            assert one(figures, score=name, period=period.period, figure="judged") == period.judged
    for tier, rate in made.replay_report["buy_rate_by_tier_entered"].items():
        assert one(figures, tier=tier, figure="entered") == rate["entered"]
        assert one(figures, tier=tier, figure="bought_share") == rate["bought_within_horizon"]


def test_flows_funnel_and_versions_are_the_python_figures(
    made: Made, dom: tuple[list[dict[str, Any]], Any]
) -> None:
    figures, _ = dom
    flows = made.figures.flows
    for dimension, flow in flows.items():
        for (source, target), count in flow.counts.items():
            assert one(figures, flow=dimension, **{"from": source, "to": target}) == count
    # The offline replay of Online Retail makes 31,148 changes (2,377 of them cluster moves,
    # since cluster inputs are winsorised at 3 std), 4,372 of them entries.
    assert sum(flow.total for flow in flows.values()) == 31148 - 4372  # all but the entries
    for stage, count in made.figures.funnel.items():
        assert one(figures, stage=stage) == count
    assert made.figures.funnel["new"] == 4372
    (version,) = made.figures.versions
    assert one(figures, version=version.version, figure="changes") == 31148


def test_every_chart_is_drawn(dom: tuple[list[dict[str, Any]], Any]) -> None:
    _, charts = dom
    ids = {chart_id for chart_id, *_ in charts}
    assert {
        "sizes-cluster", "sizes-tier", "sizes-lifecycle", "auc-over-time-purchase_propensity",
        "reliability-churn_risk", "buy-rate-chart", "funnel-chart", "versions-chart",
    } <= ids  # fmt: skip
    for chart_id, width, height, marks in charts:
        assert width > 300 and height > 50 and marks > 0, chart_id


def test_hostile_names_stay_text_in_the_browser(tmp_path: Path) -> None:
    name = '<img src=x onerror="console.error(1)"><script>console.error(2)</script>'
    change = {
        "change_id": "0" * 32, "customer_id": "</td><b>c1", "sequence": 1, "component": "entry",
        "previous": None,
        "current": {"cluster": 0, "cluster_profile": name, "propensity_tier": "low",
                    "lifecycle": "new"},
        "scores": {"purchase_propensity": None, "churn_risk": None, "absent": {}},
        "reason": {"trigger_event_id": "e", "trigger_event_type": "purchase", "summary": "s",
                   "top_contributions": []},
        "model_version": '"><script>console.error(3)</script>', "segment_definition_version": "s",
        "event_time": "2011-01-01T00:00:00Z", "processed_at": "2011-01-01T00:00:00Z",
        "origin": "live",
    }  # fmt: skip
    (tmp_path / "changes.jsonl").write_bytes(orjson.dumps(change) + b"\n")
    stream_app(tmp_path, "report", "changes.jsonl", "--out", "r.html", "--no-progress")
    with chromium() as page:
        page.load((tmp_path / "r.html").as_uri())
        assert page.problems().errors() == []
        assert page.evaluate("document.querySelectorAll('script, img').length") == 0
        members = page.evaluate("document.querySelector('#cluster-members td + td').textContent")
        assert members == name


def test_the_report_reads_the_changes_topic_to_its_end(
    made: Made,
    settings_factory: Callable[..., Settings],
    topics_factory: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
) -> None:
    """`report kafka:TOPIC` reads every change on the topic (a plain consumer, to the end) and
    draws the same page as from the file: the replay's changes, produced to the topic twice (a
    redelivery), give the same figures and say how many repeats were dropped."""
    settings = settings_factory(partitions=3)
    topics_factory(settings)
    topic = settings.segment_changes_topic
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    lines = (made.page.parent / "changes.jsonl").read_bytes().splitlines()
    for line in lines[:5000] + lines[:100]:
        producer.produce(topic, key=orjson.loads(line)["customer_id"].encode(), value=line)
    assert producer.flush(30) == 0
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "report", f"kafka:{topic}", "--out", "t.html",
         "--no-progress"],
        cwd=tmp_path, env=child_env(settings), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = build_figures(change_log(lines[:5000]), SegmentationSettings())
    with chromium() as page:
        page.load((tmp_path / "t.html").as_uri())
        assert page.problems().errors() == []
        figures = orjson.loads(page.evaluate(DOM_FIGURES))
    assert by_id(figures, "total-changes") == 5000
    assert by_id(figures, "duplicates-dropped") == 100
    assert by_id(figures, "total-customers") == expected.summary.customers
    for stage, count in expected.sizes.final("lifecycle").items():
        assert one(figures, dimension="lifecycle", segment=stage) == count
