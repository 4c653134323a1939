"""The load harness without a broker: traffic model, pacing, scenario schedules, the figures the
report is built from, and the pass/fail logic against the objectives."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from load_tests.__main__ import build_parser, main, options_from
from load_tests.generator import (
    GeneratorJob,
    Pacer,
    Phase,
    RateSchedule,
    Record,
    Tick,
    TrafficConfig,
    TrafficGenerator,
    produce_paced,
)
from load_tests.measure import Subscriber, latency_summary, parse_metrics, percentile
from load_tests.objectives import Findings, Objectives, Status, evaluate
from load_tests.report import render_markdown, write_report
from load_tests.scenarios import (
    RunOptions,
    ScenarioName,
    build_schedule,
    capacity_from_marks,
    judge_step,
    median_capacity,
    soak_figures,
    spike_figures,
)
from load_tests.systems import processed_count
from stream_app.contracts.events import (
    ClickEvent,
    DeadLetter,
    MessageOrigin,
    TransactionEvent,
    decode_event,
)

NOW = 1_700_000_000.0
FUNNEL_ORDER = {
    "page_view": 0,
    "email_open": 0,
    "push_open": 0,
    "product_view": 1,
    "search": 1,
    "login": 1,
    "cart_add": 1,
    "checkout": 2,
    "purchase": 3,
}


def records(config: TrafficConfig, n: int) -> list[Record]:
    generator = TrafficGenerator(config)
    return [generator.next(NOW + i / 1000) for i in range(n)]


# --- traffic model ------------------------------------------------------------------------------


def test_same_seed_gives_the_same_bytes() -> None:
    config = TrafficConfig(seed=11, malformed_rate=0.05)
    assert records(config, 3000) == records(config, 3000)


def test_another_seed_gives_other_traffic() -> None:
    first = records(TrafficConfig(seed=1), 500)
    second = records(TrafficConfig(seed=2), 500)
    assert [r.value for r in first] != [r.value for r in second]


def test_every_valid_record_decodes_to_its_contract_and_key() -> None:
    for record in records(TrafficConfig(malformed_rate=0.0), 5000):
        event = decode_event(record.value, record.kind, MessageOrigin(topic="t"))
        assert not isinstance(event, DeadLetter), event
        expected = ClickEvent if record.kind == "click" else TransactionEvent
        assert isinstance(event, expected)
        assert record.key == event.customer_id.encode()
        assert event.event_id == record.event_id


def test_malformed_records_are_dead_lettered_with_their_reason() -> None:
    seen: Counter[str] = Counter()
    for record in records(TrafficConfig(malformed_rate=0.2), 4000):
        if record.malformed is None:
            continue
        letter = decode_event(record.value, record.kind, MessageOrigin(topic="t"))
        assert isinstance(letter, DeadLetter)
        assert letter.reason.value == record.malformed
        seen[record.malformed] += 1
    assert set(seen) == {"invalid_json", "not_an_object", "unknown_type", "invalid_field"}


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1])
def test_malformed_share_is_about_the_configured_rate(rate: float) -> None:
    n = 20_000
    bad = sum(r.malformed is not None for r in records(TrafficConfig(malformed_rate=rate), n))
    # Binomial: within 5 standard deviations (and exactly 0 for rate 0).
    sigma = (n * rate * (1 - rate)) ** 0.5
    assert abs(bad - n * rate) <= 5 * sigma


def test_sessions_follow_the_funnel_in_order() -> None:
    by_session: dict[int, list[str]] = {}
    for record in records(TrafficConfig(malformed_rate=0.0, concurrent_sessions=50), 20_000):
        if record.event_type != "refund":
            by_session.setdefault(record.session, []).append(record.event_type)
    assert len(by_session) > 1000
    for steps in by_session.values():
        ranks = [FUNNEL_ORDER[step] for step in steps]
        assert ranks == sorted(ranks), steps
        assert ranks[0] == 0  # a session starts with an entry event
        assert steps.count("purchase") <= 1
        if "purchase" in steps:
            assert "checkout" in steps and "cart_add" in steps


def test_traffic_has_the_mix_the_issue_asks_for() -> None:
    config = TrafficConfig(malformed_rate=0.0)
    sample = records(config, 30_000)
    types = Counter(r.event_type for r in sample)
    for event_type in (*FUNNEL_ORDER, "refund"):
        assert types[event_type] > 0, event_type
    bodies = [orjson.loads(r.value) for r in sample]
    logins = [b for b in bodies if b["event_type"] == "login"]
    assert logins and all("anonymous_id" in b for b in logins)
    assert any(b["customer_id"].startswith(f"{config.run_id}-a") for b in bodies)  # anonymous
    new = {b["customer_id"] for b in bodies if _customer_number(b) >= config.returning_customers}
    returning = {b["customer_id"] for b in bodies if 0 <= _customer_number(b) < 20_000}
    assert new and returning
    money = [b["amount"] for b in bodies if b["event_type"] in ("purchase", "refund")]
    assert all(isinstance(m, str) and float(m) > 0 for m in money)


def _customer_number(body: dict[str, Any]) -> int:
    _, _, tail = body["customer_id"].rpartition("-")
    return int(tail[1:]) if tail.startswith("c") else -1


def test_refunds_follow_their_purchase() -> None:
    config = TrafficConfig(malformed_rate=0.0, refund_share=1.0, refund_delay_events=50)
    bodies = [orjson.loads(r.value) for r in records(config, 5000)]
    purchases = {b["order_id"]: i for i, b in enumerate(bodies) if b["event_type"] == "purchase"}
    refunds = [(i, b) for i, b in enumerate(bodies) if b["event_type"] == "refund"]
    assert refunds
    for i, refund in refunds:
        assert purchases[refund["order_id"]] < i


# --- pacing -------------------------------------------------------------------------------------


def test_schedule_integrates_piecewise_rates() -> None:
    schedule = RateSchedule((Phase(0, 100), Phase(10, 1000), Phase(12, 100)), 20)
    assert schedule.expected(5) == 500
    assert schedule.expected(11) == 1000 + 1000
    assert schedule.expected(20) == 1000 + 2000 + 800
    assert schedule.total == 3800
    assert schedule.rate_at(11.5) == 1000
    assert schedule.rate_at(25) == 0


def test_schedule_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="starts with a phase at 0"):
        RateSchedule((Phase(1, 10),), 5)
    with pytest.raises(ValueError, match="increasing"):
        RateSchedule((Phase(0, 10), Phase(3, 1), Phase(2, 1)), 5)


def test_pacer_sends_what_is_owed_in_bounded_batches() -> None:
    pacer = Pacer(RateSchedule((Phase(0, 1000),), 10), max_batch=100)
    assert pacer.due(0.0) == 0
    assert pacer.due(0.05) == 50
    pacer.record_sent(50)
    assert pacer.due(0.05) == 0
    assert pacer.due(1.0) == 100  # 950 owed, capped
    assert pacer.behind_s(1.0) == pytest.approx(0.95)
    assert not pacer.keeping_up(1.0)
    assert 0 < pacer.sleep_for(0.0505) <= 0.01


@settings(max_examples=25, deadline=None)
@given(
    rates=st.lists(st.integers(1, 4_000), min_size=1, max_size=3),
    step=st.floats(0.001, 0.05),
)
def test_paced_loop_follows_any_schedule_with_a_fake_clock(rates: list[int], step: float) -> None:
    """Driven by a fake clock that advances ``step`` per poll, the loop sends exactly what the
    schedule asks for (total and per second, within one batch), without sleeping."""
    duration = 2.0 * len(rates)
    phases = [(2.0 * i, float(rate), f"p{i}") for i, rate in enumerate(rates)]
    job = GeneratorJob(
        bootstrap="unused:1",
        clickstream_topic="c",
        transactions_topic="t",
        traffic=TrafficConfig(concurrent_sessions=5),
        phases=phases,
        duration_s=duration,
        start_at=100.0,
    )
    now = [100.0]
    sent: list[float] = []
    ticks: list[Tick] = []

    def advance(_seconds: float = 0.0) -> None:
        now[0] += step

    total = produce_paced(
        job,
        send=lambda record: sent.append(now[0]),
        poll=advance,
        report=ticks.append,
        stop=lambda: False,
        clock=lambda: now[0],
        sleep=advance,
        cpu=lambda: 0.0,
    )
    expected = RateSchedule(tuple(Phase(*p) for p in phases), duration)
    assert abs(total - expected.total) <= 1
    per_second = Counter(int(t - 100.0) for t in sent)
    for second in range(int(duration)):
        assert abs(per_second[second] - expected.rate_at(second)) <= (max(rates) * step + 500 + 1)
    assert sum(t.sent for t in ticks) == total
    assert ticks[-1].done


def test_count_mode_sends_exactly_the_backlog() -> None:
    job = GeneratorJob(
        bootstrap="unused:1",
        clickstream_topic="c",
        transactions_topic="t",
        traffic=TrafficConfig(),
        phases=[(0.0, 1e6, "backlog")],
        duration_s=60,
        start_at=0.0,
        count=1234,
    )
    clock = itertools.count()
    sent: list[Record] = []
    total = produce_paced(
        job,
        send=sent.append,
        poll=lambda: None,
        report=lambda tick: None,
        stop=lambda: False,
        clock=lambda: next(clock) * 1e-6,
        sleep=lambda s: None,
    )
    assert total == len(sent) == 1234


# --- scenarios ------------------------------------------------------------------------------------


def test_scenario_schedules() -> None:
    steady = build_schedule(RunOptions(scenario=ScenarioName.STEADY, rate=5000, duration_s=60))
    assert steady.total == 300_000
    spike = build_schedule(
        RunOptions(scenario=ScenarioName.SPIKE, rate=1000, duration_s=60, spike_s=10)
    )
    assert [p.name for p in spike.phases] == ["before", "spike", "after"]
    assert spike.phases[1].rate == 10_000
    assert spike.phases[2].start_s - spike.phases[1].start_s == 10
    ramp = build_schedule(
        RunOptions(scenario=ScenarioName.RAMP, rate=1000, step_rate=500, max_rate=3000, step_s=5)
    )
    # An unjudged 10 s warm-up at the start rate, then the steps.
    assert [p.rate for p in ramp.phases] == [1000, 1000, 1500, 2000, 2500, 3000]
    assert [p.start_s for p in ramp.phases] == [0, 10, 15, 20, 25, 30]
    assert ramp.phases[0].name == "warm-up"
    assert ramp.duration_s == 35
    cold = build_schedule(
        RunOptions(
            scenario=ScenarioName.RAMP,
            rate=1000,
            step_rate=500,
            max_rate=2000,
            step_s=5,
            warmup_s=0,
        )
    )
    assert [(p.start_s, p.rate) for p in cold.phases] == [(0, 1000), (5, 1500), (10, 2000)]
    assert cold.duration_s == 15


def test_run_options_refuse_impossible_runs() -> None:
    with pytest.raises(ValueError, match="max-rate"):
        RunOptions(scenario=ScenarioName.RAMP, rate=5000, max_rate=1000)
    with pytest.raises(ValueError, match="spike"):
        RunOptions(scenario=ScenarioName.SPIKE, duration_s=12, spike_s=10)


def _row(t: int, **values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"t": t, "processed": 0, "backlog": 0, "p99_ms": None, "sent": 0}
    return {**base, **values}


def test_ramp_step_names_what_broke_first() -> None:
    objectives = Objectives()
    phase = Phase(0, 1000)
    ticks = {t: Tick(t, 1000, 0, 1000, 0, 0, 0, 0) for t in range(8)}
    ok = [_row(t, processed=1000, backlog=100, p99_ms=40) for t in range(8)]
    assert judge_step(ok, ticks, phase, objectives).sustained
    behind = [*ok[:-1], _row(7, processed=700, backlog=2500, p99_ms=40)]
    step = judge_step(behind, ticks, phase, objectives)
    assert not step.sustained and step.reason.startswith("throughput")
    slow = [_row(t, processed=1000, backlog=100, p99_ms=400) for t in range(8)]
    step = judge_step(slow, ticks, phase, objectives)
    assert not step.sustained and step.reason.startswith("latency: p99 400")
    starved = {t: Tick(t, 500, 0, 1000, 1.0, 0, 0, 0) for t in range(8)}
    assert judge_step(ok, starved, phase, objectives).reason.startswith("generator")


def test_spike_drain_time() -> None:
    schedule = RateSchedule((Phase(0, 100, "before"), Phase(10, 1000, "spike"),
                             Phase(15, 100, "after")), 40)  # fmt: skip
    backlog = [10] * 10 + [900, 1800, 2700, 3600, 4500] + [4000, 3000, 2000, 1000, 30] + [10] * 20
    rows = [_row(t, backlog=b) for t, b in enumerate(backlog)]
    figures = spike_figures(rows, schedule)
    assert figures["drained"] is True
    assert figures["drain_s"] == 5  # second 19 ends at 20, 5 s after the spike ended at 15
    assert figures["backlog_peak"] == 4500
    never = [_row(t, backlog=b if t < 15 else 4500) for t, b in enumerate(backlog)]
    assert spike_figures(never, schedule)["drained"] is False


def test_capacity_is_timed_from_10_to_90_percent() -> None:
    # (time, processed, CPU seconds): half a core while processing.
    marks = [
        (0.0, 0, 0.0),
        (1.0, 0, 0.5),
        (2.0, 1000, 1.0),
        (12.0, 11_000, 6.0),
        (13.0, 12_000, 6.5),
    ]
    figures = capacity_from_marks("worker", marks, 10_000)
    # 10% (1,000) at t=2, 90% (9,000) at t=10: 8,000 events in 8 s, on 4 CPU-seconds.
    assert figures["events_per_s"] == 1000.0
    assert figures["cpu_mean_percent"] == 50.0
    assert figures["events_per_cpu_s"] == 2000.0


def test_median_capacity_keeps_every_repeat() -> None:
    samples = [
        {"events_per_s": rate, "cpu_mean_percent": 90.0, "events_per_cpu_s": rate / 0.9}
        for rate in (3000.0, 1000.0, 2000.0)
    ]
    chosen = median_capacity(samples)
    assert chosen["events_per_s"] == 2000.0
    assert [r["events_per_s"] for r in chosen["repeats"]] == [3000.0, 1000.0, 2000.0]


# --- measurement helpers ------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([], 99) is None
    summary = latency_summary([5.0, 1.0, 3.0])
    assert summary == {
        "count": 3,
        "p50_ms": 3.0,
        "p95_ms": 5.0,
        "p99_ms": 5.0,
        "max_ms": 5.0,
        "mean_ms": 3.0,
    }


def test_the_one_percentile_is_nearest_rank_never_interpolated() -> None:
    """Every percentile of the load tests and the benchmarks is `percentile`: the value at rank
    ceil(q/100 * n) of the sorted values. Not numpy's default (linear: 2.5 for p50 of 1..4, 198.01
    for p99 of 1..200) nor the index int(q/100 * n) shortcut the benchmarks used (3 and 199)."""
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 75) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 76) == 4.0
    assert percentile([float(v) for v in range(1, 201)], 99) == 198.0
    assert percentile([7.0], 99) == percentile([7.0], 0) == 7.0
    assert percentile([2.0, 1.0], 0) == 1.0  # rank 1 at the least


def test_processed_counts_late_events_once() -> None:
    counts = {"events": {"page_view": 10, "purchase": 2}, "dead_letters": {"late_event": 1, "x": 3}}
    assert processed_count(counts) == 12 + 3


def test_prometheus_histograms_become_quantile_estimates() -> None:
    text = "\n".join(
        [
            "# HELP h_seconds x",
            "# TYPE h_seconds histogram",
            'h_seconds_bucket{le="0.01"} 50.0',
            'h_seconds_bucket{le="0.1"} 100.0',
            'h_seconds_bucket{le="+Inf"} 100.0',
            "h_seconds_count 100.0",
            "h_seconds_sum 2.0",
            "# HELP b_events per batch",
            "# TYPE b_events histogram",
            'b_events_bucket{le="1.0"} 2.0',
            'b_events_bucket{le="100.0"} 4.0',
            'b_events_bucket{le="+Inf"} 4.0',
            "b_events_count 4.0",
            "b_events_sum 102.0",
            "# HELP c_total y",
            "# TYPE c_total counter",
            'c_total{reason="a"} 3.0',
            "",
        ]
    )
    parsed = parse_metrics(text)
    assert parsed["h_seconds"]["count"] == 100
    assert parsed["h_seconds"]["mean_ms"] == 20.0
    assert parsed["h_seconds"]["p50_ms_estimate"] == 10.0
    assert parsed["h_seconds"]["p99_ms_estimate"] == pytest.approx(98.2)
    # Not a duration: reported in its own unit (events), not as milliseconds.
    assert parsed["b_events"] == {
        "count": 4,
        "sum": 102.0,
        "mean": 25.5,
        "p50_estimate": 1.0,
        "p99_estimate": pytest.approx(98.02),
    }
    assert parsed["c"] == {"reason=a": 3.0}


# --- objectives -----------------------------------------------------------------------------------


def _status(findings: Findings, objective: str, objectives: Objectives | None = None) -> Status:
    verdicts = evaluate(objectives or Objectives(), findings)
    return next(v.status for v in verdicts if v.objective.startswith(objective))


def test_nothing_measured_is_not_a_pass() -> None:
    verdicts = evaluate(Objectives(), Findings(scenario="smoke", target_rate=200))
    assert {v.status for v in verdicts} == {Status.NOT_MEASURED}


def test_max_rate_objective_boundary() -> None:
    at = Findings(scenario="ramp", target_rate=1000, max_sustainable_rate=10_000)
    below = at.model_copy(update={"max_sustainable_rate": 9_999})
    assert _status(at, "max sustainable") is Status.PASS
    assert _status(below, "max sustainable") is Status.FAIL


def test_p99_objective_needs_the_rate_and_the_latency() -> None:
    base = Findings(scenario="steady", target_rate=5000, p99_ms=100.0, p99_at_input_rate=5000)
    assert _status(base, "end-to-end p99") is Status.PASS
    assert _status(base.model_copy(update={"p99_ms": 100.1}), "end-to-end") is Status.FAIL
    # 3% generator tolerance: 4,850/s still counts as 5,000/s, 4,849/s does not.
    assert _status(base.model_copy(update={"p99_at_input_rate": 4850}), "end-to") is Status.PASS
    low = base.model_copy(update={"p99_at_input_rate": 4849})
    assert _status(low, "end-to-end") is Status.NOT_MEASURED
    assert _status(base.model_copy(update={"p99_ms": None}), "end-to") is Status.NOT_MEASURED


def test_ratio_objectives() -> None:
    findings = Findings(
        scenario="steady",
        target_rate=5000,
        capacity={"worker": 3000.0, "naive-faust": 1000.0, "plain-loop": 3750.0},
    )
    assert _status(findings, "throughput vs the naive") is Status.PASS  # exactly 3x
    assert _status(findings, "throughput vs the plain") is Status.PASS  # exactly 0.8x
    worse = findings.model_copy(
        update={"capacity": {"worker": 2999.0, "naive-faust": 1000.0, "plain-loop": 3750.0}}
    )
    assert _status(worse, "throughput vs the naive") is Status.FAIL
    assert _status(worse, "throughput vs the plain") is Status.FAIL


def test_spike_and_soak_objectives() -> None:
    base = Findings(scenario="spike", target_rate=1000, spike_drained=True, spike_drain_s=30.0)
    assert _status(base, "10x spike") is Status.PASS
    assert _status(base.model_copy(update={"spike_drain_s": 30.5}), "10x") is Status.FAIL
    assert _status(base.model_copy(update={"spike_drained": False}), "10x") is Status.FAIL
    soak = Findings(
        scenario="soak", target_rate=1000, soak_rss_growth_mb=65.0, soak_new_customers=512
    )
    # Allowed: 64 MB + 512 x 2 KiB = 65 MB exactly.
    assert _status(soak, "soak") is Status.PASS
    assert _status(soak.model_copy(update={"soak_rss_growth_mb": 65.01}), "soak") is Status.FAIL


def test_objectives_are_overridable_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOADTEST_P99_MS_MAX", "250")
    objectives = Objectives()
    assert objectives.p99_ms_max == 250
    findings = Findings(scenario="steady", target_rate=5000, p99_ms=200, p99_at_input_rate=5000)
    assert _status(findings, "end-to-end", objectives) is Status.PASS


# --- CLI and report -------------------------------------------------------------------------


def test_cli_defaults_per_scenario() -> None:
    parser = build_parser()
    smoke = options_from(parser.parse_args(["run", "--scenario", "smoke", "--report", "r"]))
    assert (smoke.rate, smoke.duration_s, smoke.warmup) == (200.0, 8.0, 0.0)
    soak = options_from(parser.parse_args(["run", "--scenario", "soak", "--report", "r"]))
    assert soak.duration_s == 1800
    steady = options_from(
        parser.parse_args(["run", "--rate", "5000", "--duration", "60", "--report", "r"])
    )
    assert (steady.rate, steady.warmup, steady.baseline) == (5000.0, 10.0, False)


# Every flag `python -m load_tests run` has taken: their spellings are the CLI's contract.
EVERY_FLAG = [
    *("--scenario", "ramp", "--rate", "500", "--duration", "30", "--warmup", "5"),
    *("--seed", "3", "--partitions", "2", "--customers", "10", "--malformed-rate", "0.1"),
    *("--spike-factor", "4", "--spike-s", "7", "--step-rate", "100", "--step-s", "5"),
    *("--max-rate", "900", "--drain-timeout", "9", "--baseline", "--capacity-events", "2000"),
    *("--capacity-repeats", "3", "--bootstrap", "h:1", "--report", "r", "--no-progress"),
    *("--time-scale", "600", "--history-days", "45", "--history-events", "5000"),
]


def test_every_run_option_is_a_flag_spelled_as_before() -> None:
    options = options_from(build_parser().parse_args(["run", *EVERY_FLAG]))
    assert options == RunOptions.model_validate(
        {"scenario": "ramp", "rate": 500, "duration_s": 30, "warmup_s": 5, "seed": 3}
        | {"partitions": 2, "customers": 10, "malformed_rate": 0.1, "spike_factor": 4}
        | {"spike_s": 7, "step_rate": 100, "step_s": 5, "max_rate": 900, "drain_timeout_s": 9}
        | {"baseline": True, "capacity_events": 2000, "capacity_repeats": 3}
        | {"bootstrap": "h:1", "report_dir": "r", "progress": False}
        | {"time_scale": 600, "history_days": 45, "history_events": 5000}
    )
    assert set(options.model_fields_set) == set(RunOptions.model_fields)  # each one a flag


def test_the_parser_is_made_from_run_options(capsys: pytest.CaptureFixture[str]) -> None:
    """A field's type, default and description reach the CLI without a parser edit; an option
    left out leaves the field's default (or its scenario's)."""
    assert all(field.description for field in RunOptions.model_fields.values())
    args = build_parser().parse_args(["run", "--report", "r"])
    assert set(RunOptions.model_fields) <= set(vars(args))
    assert options_from(args) == RunOptions(report_dir=Path("r"))
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--malformed-rate MALFORMED_RATE share of malformed messages (default 0.005)" in shown
    assert "--duration DURATION seconds of traffic (default 60, smoke 8, soak 1800)" in shown
    assert "(default min(10, 20%))" in shown and "--no-progress without a progress line" in shown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--scenario", "burst", "--report", "r"], "invalid choice: 'burst'"),
        (["run", "--rate", "fast", "--report", "r"], "invalid float value: 'fast'"),
        (["run", "--rate", "5000"], "the following arguments are required: --report"),
    ],
)
def test_cli_mistakes_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_invalid_values_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--rate", "-5", "--report", "r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("load_tests: rate: Input should be greater than 0")
    assert err.count("\n") == 1


def test_report_files_from_figures(tmp_path: Path) -> None:
    rows = [
        {
            "t": t,
            "phase": "steady",
            "target": 100.0,
            "sent": 100,
            "in": 100,
            "processed": 100,
            "changes": 20,
            "dead_letters": 1,
            "p50_ms": 10.0,
            "p95_ms": 20.0,
            "p99_ms": 30.0,
            "max_ms": 31.0,
            "lag": 5,
            "backlog": 0,
            "cpu": {"system": 50.0, "broker": 20.0, "generator": 5.0, "harness": 1.0},
            "rss_mb": {"system": 150.0, "broker": 400.0, "generator": 40.0, "harness": 50.0},
            "machine_cpu": 40.0,
        }
        for t in range(5)
    ]
    summary = {
        "target_rate": 100.0,
        "input_rate": 100.0,
        "processed_rate": 100.0,
        "changes_rate": 20.0,
        "latency": latency_summary([10.0, 20.0, 30.0]),
        "lag_max": 5,
        "backlog_end_of_schedule": 0,
        "drained": True,
        "drain_s": 1,
        "dead_letters_received": 5,
        "malformed_sent": 5,
        "cpu": {"system": {"mean_percent": 50.0, "max_percent": 50.0}},
        "rss": {"system": {"start_mb": 150.0, "end_mb": 150.0, "max_mb": 150.0}},
        "machine_cpu_mean_percent": 40.0,
        "generator_kept_up": True,
    }
    verdicts = evaluate(Objectives(), Findings(scenario="steady", target_rate=100))
    data: dict[str, Any] = {
        "command": "python -m load_tests run ...",
        "started_at": "2026-01-01T00:00:00+00:00",
        "elapsed_s": 12.0,
        "machine": {
            "cpu_count": 2,
            "cpu_model": "test",
            "memory_gb": 4,
            "python": "3.11",
            "shared": "all on 2 vCPUs",
            "load_average_at_start": [0.5, 0.5, 0.5],
        },
        "options": {**RunOptions().model_dump(mode="json"), "warmup": 0.0},
        "verdicts": [v.model_dump(mode="json") for v in verdicts],
        "capacity": {"worker": {"events_per_s": 3000.0, "cpu_mean_percent": 99.0}},
        "runs": [{"system": "worker", "summary": summary, "rows": rows, "metrics": {}}],
    }
    write_report(tmp_path, data)
    assert {p.name for p in tmp_path.iterdir()} == {
        "report.json",
        "report.md",
        "throughput.png",
        "latency.png",
        "lag.png",
        "resources.png",
    }
    markdown = render_markdown(data)
    assert "| end-to-end p99 latency | <= 100 ms at 5,000 events/s | - | not measured |" in markdown
    run_row = "| worker | 100 | 100 | 100 | 20 | 20.0 | 30.0 | 30.0 | 30.0 | 5 | 0 | 1 s | 5 / 5 |"
    assert run_row in markdown
    assert "Kafka broker (JVM)" in markdown
    assert orjson.loads((tmp_path / "report.json").read_bytes())["runs"][0]["rows"][0]["t"] == 0


class _Message:
    def __init__(self, topic: str, value: bytes) -> None:
        self._topic, self._value = topic, value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes:
        return self._value


def _change(customer: str, sequence: int, trigger: str, event_time: str) -> _Message:
    body = {
        "change_id": f"{customer}-{sequence}",
        "customer_id": customer,
        "sequence": sequence,
        "component": "entry",
        "reason": {"trigger_event_id": trigger},
        "event_time": event_time,
    }
    return _Message("changes", orjson.dumps(body))


def test_subscriber_times_changes_and_spots_duplicates_and_gaps() -> None:
    t0 = NOW
    subscriber = Subscriber("127.0.0.1:9", "changes", "dead", 1, t0, event_prefix="run-")
    try:
        sent = "2023-11-14T22:13:20+00:00"  # == NOW
        subscriber._take(
            [
                _change("a", 1, "run-e1", sent),
                _change("a", 1, "run-e1", sent),  # redelivered
                _change("a", 3, "run-e9", sent),  # 2 is missing
                _change("b", 1, "time:123", sent),  # time-driven: nothing of ours to time
                _Message("dead", orjson.dumps({"reason": "invalid_json"})),
            ],
            arrived=NOW + 2.5,
        )
        bucket = subscriber.take_second(2)
        assert bucket.changes == 3 and bucket.dead_letters == 1
        assert bucket.latencies_ms == [2500.0, 2500.0]
        assert bucket.dead_letter_reasons == {"invalid_json": 1}
        assert (subscriber.duplicates, subscriber.gaps, subscriber.other_triggers) == (1, 1, 1)
        assert subscriber.latencies_between(0, 3) == [2500.0, 2500.0]
        assert subscriber.latencies_between(3, 9) == []
    finally:
        subscriber._consumer.close()


def test_a_bootstrapped_subscriber_times_the_event_clock_and_lets_sequences_continue() -> None:
    """With a history, a customer's first change may continue its stored sequence: only gaps
    after it count. With a faster event clock, latency runs from the send the event time
    maps back to."""
    from load_tests.generator import EventClock

    clock = EventClock.ending_now(NOW, 100.0, 600.0)
    sent = datetime.fromtimestamp(clock.event_time(NOW + 10.0), UTC).isoformat()
    subscriber = Subscriber(
        "127.0.0.1:9",
        "changes",
        "dead",
        1,
        NOW,
        event_prefix="run-",
        sent_at=clock.wall_time,
        bootstrapped=True,
    )
    try:
        subscriber._take(
            [
                _change("a", 7, "run-e1", sent),
                _change("a", 8, "run-e2", sent),
                _change("b", 3, "run-e3", sent),
                _change("b", 5, "run-e4", sent),
            ],
            arrived=NOW + 10.25,
        )
        assert subscriber.gaps == 1  # b's 4, not a's or b's first
        assert subscriber.latencies_between(0, 11) == pytest.approx([250.0] * 4, abs=0.01)
    finally:
        subscriber._consumer.close()


def test_soak_figures_fit_memory_per_customer() -> None:
    options = RunOptions(scenario=ScenarioName.SOAK, duration_s=100, warmup_s=10)
    rows = [
        {
            "t": t,
            "customers": 1000 + 100 * t,
            "rss_mb": {"system": 200.0 + (100 * t) / 1024},  # 1 KiB per customer, no leak
            "p99_ms": 40.0,
        }
        for t in range(100)
    ]
    figures = soak_figures(rows, options)
    assert figures["rss_bytes_per_customer_fitted"] == 1024
    assert figures["new_customers"] == 8900  # seconds 10..99
    # Medians of the first and last 9 measured seconds: t=14 and t=95.
    assert figures["rss_growth_mb"] == round((95 - 14) * 100 / 1024, 1)
    assert figures["p99_first_quarter_median_ms"] == 40.0


# --- event time faster than the wall clock, and a history to bootstrap --------------------------


@given(
    scale=st.floats(1.0, 100_000.0),
    duration=st.floats(1.0, 7 * 86400.0),
    at=st.floats(0.0, 1.0),
)
def test_a_faster_event_clock_never_gets_ahead_of_now_and_inverts(
    scale: float, duration: float, at: float
) -> None:
    """Event time runs `scale` times faster and reaches the wall clock at the end of the run,
    never before (the worker refuses events from the future); the send time of a record is
    its event time mapped back (the latency a subscriber sees)."""
    from load_tests.generator import EventClock

    clock = EventClock.ending_now(NOW, duration, scale)
    wall = NOW + at * duration
    event = clock.event_time(wall)
    assert event <= wall + 1e-6 * max(1.0, scale * duration)
    assert clock.event_time(NOW + duration) == pytest.approx(NOW + duration)
    assert clock.wall_time(event) == pytest.approx(wall, abs=1e-6 * max(1.0, duration))
    if wall + 1.0 <= NOW + duration:
        later = clock.event_time(wall + 1.0)
        assert later - event == pytest.approx(scale, rel=1e-6)
    assert clock.event_time(NOW + duration + 5.0) == NOW + duration + 5.0  # past the end: now


def test_the_paced_loop_stamps_the_event_clock() -> None:
    from load_tests.generator import EventClock

    job = GeneratorJob(
        bootstrap="-",
        clickstream_topic="c",
        transactions_topic="t",
        traffic=TrafficConfig(malformed_rate=0.0),
        phases=[(0.0, 100.0, "steady")],
        duration_s=10.0,
        start_at=NOW,
        time_scale=600.0,
    )
    sent: list[Record] = []
    now = [NOW]

    def sleep(seconds: float) -> None:
        now[0] += max(seconds, 0.01)

    produce_paced(
        job,
        sent.append,
        lambda: None,
        lambda tick: None,
        lambda: False,
        clock=lambda: now[0],
        sleep=sleep,
    )
    decoded = [decode_event(r.value, r.kind, MessageOrigin(topic="t")) for r in sent]
    times = [e.event_time.timestamp() for e in decoded if not isinstance(e, DeadLetter)]
    clock = EventClock.ending_now(NOW, 10.0, 600.0)
    assert len(sent) == 1000
    assert min(times) >= clock.origin - 1 and max(times) <= now[0]  # never ahead of the clock
    assert max(times) - min(times) > 0.9 * 600.0 * 10.0  # ten wall seconds: about 100 minutes


def test_a_history_shares_the_runs_returning_customers_but_not_its_new_ones(
    tmp_path: Path,
) -> None:
    """The history a load run bootstraps: valid events only, spread over its days, readable as
    `stream-app bootstrap --format events` reads them; its returning customers are the run's,
    its new customers are its own."""
    from load_tests.history import CUSTOMERS, write_history
    from stream_app.tools.datasets import RowError, read_dataset

    traffic = TrafficConfig(returning_customers=50, customer_prefix=CUSTOMERS, malformed_rate=0.5)
    path = tmp_path / "history.jsonl"
    assert write_history(path, traffic, NOW - 10 * 86400, NOW, 3000) == 3000
    read = list(read_dataset(path, "events"))
    items = [i for i in read if not isinstance(i, RowError)]
    assert len(items) == len(read) == 3000
    times = [e.event_time.timestamp() for e in items]
    assert min(times) >= NOW - 10 * 86400 and max(times) < NOW
    history = {e.customer_id for e in items}
    run = {r.key.decode() for r in records(traffic.model_copy(update={"run_id": "run1"}), 3000)}
    returning = {c for c in run if c.startswith(f"{CUSTOMERS}-c")}
    assert returning and returning <= history | returning and len(returning & history) > 25
    assert not {c for c in run if c.startswith("run1-c")} & history
