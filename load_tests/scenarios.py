"""Scenarios (steady, ramp, spike, soak, smoke) and the run loop that drives one system under test
with the generator while measuring it from outside, one row per wall-clock second.

A run of one system: fresh topics and consumer group, start the system and wait until it owns its
partitions, start the subscriber, then spawn the generator process, whose second 0 is the run's
second 0. Every second the harness records what went in (generator, broker end offsets), what came
out (processed, changes and dead letters at the subscriber, latency), the lag, and CPU and RSS of
every process. After the schedule it waits for the system to drain (bounded), scrapes its
metrics, and stops everything it started, also on errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing
import os
import queue
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

from load_tests.generator import (
    GeneratorJob,
    Phase,
    RateSchedule,
    Tick,
    TrafficConfig,
    run_generator,
)
from load_tests.history import CUSTOMERS, bootstrap_history
from load_tests.measure import (
    Probe,
    ProcessWatch,
    Subscriber,
    latency_summary,
    parse_metrics,
    percentile,
)
from load_tests.objectives import Objectives
from load_tests.systems import (
    Broker,
    SystemKind,
    SystemProcess,
    delete_topics,
    run_settings,
)
from stream_app.kafka.topics import create_topics
from stream_app.live.workerproc import wait_until
from stream_app.progress import StatusLine
from stream_app.settings import Settings

SPIKE_FACTOR: Final = 10.0
WARMUP_PHASE: Final = "warm-up"
SETTLE_SHARE: Final = 0.25  # of a ramp step, ignored while the system settles at the new rate
GRACE_S: Final = 0.25  # after a second ends, before its subscriber bucket is read


class ScenarioName(StrEnum):
    STEADY = "steady"
    RAMP = "ramp"
    SPIKE = "spike"
    SOAK = "soak"
    SMOKE = "smoke"


# Where a scenario's defaults differ from RunOptions' (a smoke run is short and slow, a soak long).
SCENARIO_DEFAULTS: Final[dict[ScenarioName, dict[str, Any]]] = {
    ScenarioName.SMOKE: {"rate": 200.0, "duration_s": 8.0},
    ScenarioName.SOAK: {"duration_s": 1800.0},
}


@dataclass(frozen=True)
class Flag:
    """How a :class:`RunOptions` field is spelled on the command line, where not
    ``--field-name`` (``--no-field-name`` for a switch that is on by default)."""

    name: str | None = None
    metavar: str | None = None
    required: bool = False


class RunOptions(BaseModel):
    """Everything a load run is parameterised by (tests build it directly). The command line is
    made from these fields (``load_tests.__main__``): each is an option with this type, default
    and description, so a new field needs no parser edit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scenario: ScenarioName = Field(
        ScenarioName.STEADY, description="what to run: see the scenarios below"
    )
    rate: float = Field(1000.0, gt=0, le=1_000_000, description="events/s; ramp: the start rate")
    duration_s: Annotated[float, Flag("--duration")] = Field(
        60.0, gt=0, le=7 * 24 * 3600, description="seconds of traffic"
    )
    warmup_s: Annotated[float | None, Flag("--warmup")] = Field(
        None,
        ge=0,
        description="seconds left out of the steady-state figures (default min(10, 20%))",
    )
    seed: int = Field(7, description="traffic seed: same seed, same traffic")
    partitions: int = Field(4, ge=1, le=256, description="input partitions")
    customers: int = Field(
        20_000, ge=1, description="returning customers in the pool; new ones are added on top"
    )
    malformed_rate: float = Field(0.005, ge=0, le=1, description="share of malformed messages")
    spike_factor: float = Field(SPIKE_FACTOR, gt=1, description="spike: x --rate")
    spike_s: float = Field(10.0, gt=0, description="spike: seconds of burst")
    step_rate: float | None = Field(
        None, gt=0, description="ramp increment (default the start rate)"
    )
    step_s: float = Field(20.0, gt=0, description="ramp: seconds per step")
    max_rate: float = Field(30_000.0, gt=0, description="ramp: last step")
    drain_timeout_s: Annotated[float, Flag("--drain-timeout")] = Field(
        60.0, ge=0, description="seconds to wait after the traffic for the backlog to drain"
    )
    baseline: bool = Field(
        False,
        description="also run the plain confluent-kafka loop and the naive Faust agent (same "
        "traffic), and measure all three from a backlog, for the ratios",
    )
    capacity_events: int = Field(
        40_000, ge=1000, description="backlog size for the side-by-side capacity, with --baseline"
    )
    capacity_repeats: int = Field(
        1,
        ge=1,
        le=9,
        description="capacity measurements per system, interleaved; the median counts",
    )
    bootstrap: str | None = Field(
        None, description="use this running broker instead of starting a local one"
    )
    time_scale: float = Field(
        1.0,
        ge=1.0,
        le=100_000,
        description="event seconds per wall second: above 1, event time runs faster (ending at "
        "now), so labels mature, time-driven changes fire and the trainer learns during the run",
    )
    history_days: float = Field(
        0.0,
        ge=0,
        le=400,
        description="bootstrap the worker with this many days of generated history first (its "
        "returning customers are the run's; 0: start cold)",
    )
    history_events: int = Field(
        200_000, ge=1000, description="events in that history, spread evenly over its days"
    )
    report_dir: Annotated[Path, Flag("--report", metavar="DIR", required=True)] = Field(
        Path("load-report"), description="directory for report.json, report.md and the PNG charts"
    )
    progress: bool = Field(True, description="a progress line")

    @classmethod
    def for_scenario(cls, **given: Any) -> RunOptions:
        """The options of a command line: what is given, over the scenario's own defaults
        (:data:`SCENARIO_DEFAULTS`), over the fields' defaults."""
        scenario = given.get("scenario", cls.model_fields["scenario"].default)
        return cls(**{**SCENARIO_DEFAULTS.get(scenario, {}), **given})

    @model_validator(mode="after")
    def _check(self) -> RunOptions:
        if self.scenario is ScenarioName.RAMP and self.max_rate < self.rate:
            raise ValueError(f"--max-rate {self.max_rate:g} is below the start rate {self.rate:g}")
        if self.scenario is ScenarioName.SPIKE and self.duration_s < self.spike_s + 10:
            raise ValueError(
                f"a spike run needs --duration of at least --spike-s + 10 s ({self.spike_s + 10:g})"
            )
        return self

    @property
    def warmup(self) -> float:
        """Seconds at the start excluded from the steady-state figures (the model's warm-up)."""
        if self.warmup_s is not None:
            return min(self.warmup_s, self.duration_s / 2)
        if self.scenario is ScenarioName.SMOKE:
            return 0.0
        return min(10.0, self.duration_s * 0.2)


def build_schedule(options: RunOptions) -> RateSchedule:
    rate, duration = options.rate, options.duration_s
    if options.scenario is ScenarioName.SPIKE:
        before = float(max(5, round((duration - options.spike_s) * 0.3)))
        return RateSchedule(
            (
                Phase(0.0, rate, "before"),
                Phase(before, rate * options.spike_factor, "spike"),
                Phase(before + options.spike_s, rate, "after"),
            ),
            duration,
        )
    if options.scenario is ScenarioName.RAMP:
        # A warm-up at the start rate comes first and is not judged: the worker's start (model
        # warm-up, first commits) must not decide the maximum sustainable rate.
        step, warm = options.step_rate or rate, options.warmup
        count = math.floor((options.max_rate - rate) / step + 1e-9) + 1
        steps = tuple(
            Phase(warm + i * options.step_s, rate + i * step, f"step {rate + i * step:g}/s")
            for i in range(count)
        )
        phases = ((Phase(0.0, rate, WARMUP_PHASE),) if warm > 0 else ()) + steps
        return RateSchedule(phases, warm + count * options.step_s)
    return RateSchedule((Phase(0.0, rate, str(options.scenario)),), duration)


# --- one system under one schedule ---------------------------------------------------------------


@dataclass
class RampStep:
    rate: float
    start: int
    end: int
    sustained: bool
    reason: str
    input_rate: float
    processed_rate: float
    p99_ms: float | None
    backlog_end: int | None


@dataclass
class SystemRun:
    kind: SystemKind
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    ramp: list[RampStep] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # measured window, not serialised


class Progress:
    """The run's status line on stderr: rewritten in place on a terminal, a line every 5 s in a
    log (``stream_app.progress.StatusLine``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.line = StatusLine(sys.stderr, enabled=enabled, redraw_s=0.0, log_every_s=5.0)

    def show(self, text: str) -> None:
        self.line.show(text)

    def done(self, text: str = "") -> None:
        self.line.clear(text)


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.0f}{unit}"


@contextlib.contextmanager
def generator_process(job: GeneratorJob) -> Iterator[tuple[Any, Any, Any]]:
    """The generator in a spawned process (its CPU is then its own); stopped on the way out."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    ticks: Any = context.Queue()
    process = context.Process(target=run_generator, args=(job, stop, ticks), daemon=True)
    process.start()
    try:
        yield process, stop, ticks
    finally:
        stop.set()
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join(5)


class RunLoop:
    """Drives one system with the generator and samples it every second."""

    def __init__(
        self,
        kind: SystemKind,
        options: RunOptions,
        objectives: Objectives,
        broker: Broker,
        workdir: Path,
        progress: Progress,
        label: str,
    ) -> None:
        self.kind, self.options, self.objectives = kind, options, objectives
        self.broker, self.workdir, self.progress, self.label = broker, workdir, progress, label
        self.schedule = build_schedule(options)

    def _traffic(self, run_id: str) -> TrafficConfig:
        o = self.options
        return TrafficConfig(
            seed=o.seed,
            run_id=run_id,
            customer_prefix=CUSTOMERS if o.history_days > 0 else None,
            returning_customers=o.customers,
            malformed_rate=o.malformed_rate,
        )

    def _bootstrap(self, settings: Settings, result: SystemRun) -> None:
        """Create the system's topics; with `history_days`, bootstrap our worker with a
        generated history that ends before the run's event clock begins (the baselines start
        cold: they have no bootstrap)."""
        create_topics(settings)
        o = self.options
        if o.history_days <= 0 or self.kind is not SystemKind.WORKER:
            return
        self.progress.show(f"[{self.label}] bootstrapping {o.history_days:g} days of history")
        margin = 600.0  # the run starts after the bootstrap: its clock begins later still
        end = time.time() - self.schedule.duration_s * (o.time_scale - 1.0) - margin
        result.summary["bootstrap"] = bootstrap_history(
            settings, self._traffic("hist"), o.history_days, o.history_events, end, self.workdir
        )

    def run(self) -> SystemRun:
        settings = run_settings(
            self.broker.settings, str(self.kind), self.options.partitions, self.workdir
        )
        system = SystemProcess(self.kind, settings, self.workdir / f"{self.kind}.log")
        result = SystemRun(self.kind)
        result.settings = {
            "app_id": settings.app_id,
            "partitions": settings.partitions,
            "topics": [*settings.input_topics, settings.segment_changes_topic],
            "log": str(system.log_path),
        }
        watch = ProcessWatch()
        watch.watch("broker", self.broker.pid())
        watch.watch("harness", os.getpid())
        probe = Probe(
            settings.bootstrap_servers, settings.input_topics, settings.partitions, system.group_id
        )
        try:
            self._bootstrap(settings, result)
            self.progress.show(f"[{self.label}] starting {self.kind}")
            system.start(create=False)
            watch.watch("system", system.pid)
            result.summary["ready_s"] = round(system.wait_ready(), 1)
            t0 = time.time() + 1.5
            run_id = f"lt{int(t0) % 100000}{self.kind.value[:1]}"
            job = GeneratorJob(
                bootstrap=settings.bootstrap_servers,
                clickstream_topic=settings.clickstream_topic,
                transactions_topic=settings.transactions_topic,
                traffic=self._traffic(run_id),
                phases=[(p.start_s, p.rate, p.name) for p in self.schedule.phases],
                duration_s=self.schedule.duration_s,
                start_at=t0,
                tolerance_s=0.5,
                time_scale=self.options.time_scale,
            )
            subscriber = Subscriber(
                settings.bootstrap_servers,
                settings.segment_changes_topic,
                settings.dead_letters_topic,
                settings.partitions,
                t0,
                event_prefix=f"{run_id}-",
                sent_at=job.event_clock().wall_time,
                bootstrapped="bootstrap" in result.summary,
            )
            subscriber.start()
            try:
                with generator_process(job) as (process, stop, ticks):
                    watch.watch("generator", process.pid)
                    self._loop(result, system, subscriber, probe, watch, ticks, stop, t0)
                    result.metrics = parse_metrics(system.metrics_text())
                    result.summary["counts"] = system.counts()
            finally:
                subscriber.stop()
            result.summary["duplicates_seen"] = subscriber.duplicates
            result.summary["sequence_gaps_seen"] = subscriber.gaps
            result.summary["changes_by_component"] = dict(subscriber.components)
            result.summary["time_driven_changes"] = subscriber.other_triggers
            window = (int(self.options.warmup), math.ceil(self.schedule.duration_s))
            result.latencies_ms = subscriber.latencies_between(*window)
            result.summary["latency_whole_run"] = latency_summary(
                subscriber.latencies_between(0, 10**9)
            )
        finally:
            self.progress.show(f"[{self.label}] stopping {self.kind}")
            result.summary["exit_code"] = system.stop()
            probe.close()
            with contextlib.suppress(Exception):
                delete_topics(settings)
        summarise(result, self.schedule, self.options, self.objectives)
        return result

    def _loop(
        self,
        result: SystemRun,
        system: SystemProcess,
        subscriber: Subscriber,
        probe: Probe,
        watch: ProcessWatch,
        ticks: Any,
        stop: Any,
        t0: float,
    ) -> None:
        """One sample per second until the schedule is over and the backlog is drained."""
        ticks_by_second: dict[int, Tick] = {}
        sampler = Sampler(self.schedule, system, subscriber, probe, watch)
        schedule_end = self.schedule.duration_s
        drain_deadline: float | None = None
        drained_for = 0
        generator_done = False
        stopped_early_at: float | None = None
        second = -1
        while True:
            second += 1
            time.sleep(max(0.0, t0 + second + 1 + GRACE_S - time.time()))
            generator_done = _drain_ticks(ticks, ticks_by_second) or generator_done
            if not system.alive():
                raise RuntimeError(
                    f"{self.kind} exited during the run: {system.log_tail(3)} "
                    f"(log {system.log_path})"
                )
            row = sampler.sample(second, schedule_end)
            result.rows.append(row)
            self.progress.show(self._line(row, ticks_by_second.get(second), schedule_end))
            # Ramp: judge each step as it ends; stop at the first one not sustained.
            if self.options.scenario is ScenarioName.RAMP and stopped_early_at is None:
                step = _finished_step(self.schedule, second)
                if step is not None and step.name != WARMUP_PHASE:
                    judged = judge_step(
                        result.rows, ticks_by_second, step, self.objectives, subscriber
                    )
                    result.ramp.append(judged)
                    if not judged.sustained:
                        stop.set()
                        stopped_early_at = schedule_end = second + 1
            if second + 1 < schedule_end:
                continue
            if drain_deadline is None:
                drain_deadline = time.time() + self.options.drain_timeout_s
            drained_for = drained_for + 1 if row["backlog"] == 0 else 0
            if drained_for >= 2 or time.time() >= drain_deadline:
                break
        # Late ticks (the generator's last second) may still be in the queue.
        deadline = time.time() + 5
        while not generator_done and time.time() < deadline:
            generator_done = _drain_ticks(ticks, ticks_by_second, timeout=0.5) or generator_done
        merge_ticks(result.rows, ticks_by_second)
        result.summary["stopped_early_at_s"] = stopped_early_at
        result.summary["drained"] = drained_for >= 2
        result.summary["delivery_errors"] = max(
            (t.delivery_errors for t in ticks_by_second.values()), default=0
        )

    def _line(self, row: dict[str, Any], tick: Tick | None, end: float) -> str:
        cpu = row["cpu"]
        behind = " GENERATOR BEHIND" if tick and tick.behind_s > 0.5 else ""
        return (
            f"[{self.label}] {row['t'] + 1:>4}/{end:g}s {row['phase']:<12} "
            f"target {_fmt(row['target'])}/s sent {_fmt(tick.sent if tick else None)} "
            f"in {_fmt(row['in'])} processed {_fmt(row['processed'])} "
            f"changes {row['changes']:,} p99 {_fmt(row['p99_ms'], ' ms')} "
            f"lag {_fmt(row['lag'])} backlog {_fmt(row['backlog'])} | cpu "
            f"{self.kind} {_fmt(cpu.get('system'), '%')} broker {_fmt(cpu.get('broker'), '%')} "
            f"gen {_fmt(cpu.get('generator'), '%')}{behind}"
        )


class Sampler:
    """Turns the cumulative readings (end offsets, processed, committed) into one row a second."""

    def __init__(
        self,
        schedule: RateSchedule,
        system: SystemProcess,
        subscriber: Subscriber,
        probe: Probe,
        watch: ProcessWatch,
    ) -> None:
        self.schedule, self.system, self.subscriber = schedule, system, subscriber
        self.probe, self.watch = probe, watch
        self.end0 = self.last_end = probe.end_offsets() or 0
        self.processed0 = self.last_processed = system.processed() or 0
        self.cpus = os.cpu_count() or 1
        watch.machine_cpu()

    def sample(self, second: int, schedule_end: float) -> dict[str, Any]:
        end = self.probe.end_offsets()
        committed = self.probe.committed()
        processed = self.system.processed()
        samples = self.watch.sample()
        machine = self.watch.machine_cpu()
        bucket = self.subscriber.take_second(second)
        in_broker = None if end is None else end - self.last_end
        done = None if processed is None else processed - self.last_processed
        self.last_end = self.last_end if end is None else end
        self.last_processed = self.last_processed if processed is None else processed
        lat = bucket.latencies_ms
        cpu: dict[str, float | None] = {name: s.cpu_percent for name, s in samples.items()}
        ours = sum(value for value in cpu.values() if value is not None)
        cpu["others"] = round(max(0.0, machine * self.cpus - ours), 1)
        backlog = None
        if end is not None and processed is not None:
            backlog = max(0, (end - self.end0) - (processed - self.processed0))
        return {
            "t": second,
            "phase": self.schedule.phase_at(second).name if second < schedule_end else "drain",
            "target": self.schedule.rate_at(second) if second < schedule_end else 0.0,
            "in": in_broker,
            "processed": done,
            "changes": bucket.changes,
            "dead_letters": bucket.dead_letters,
            "latency_samples": len(lat),
            "p50_ms": _round(percentile(lat, 50)),
            "p95_ms": _round(percentile(lat, 95)),
            "p99_ms": _round(percentile(lat, 99)),
            "max_ms": _round(max(lat) if lat else None),
            "lag": None if end is None or committed is None else max(0, end - committed),
            "backlog": backlog,
            "cpu": cpu,
            "rss_mb": {name: s.rss_mb for name, s in samples.items()},
            "machine_cpu": machine,
        }


def merge_ticks(rows: list[dict[str, Any]], ticks: dict[int, Tick]) -> None:
    """Put what the generator reported for each second into that second's row."""
    for row in rows:
        tick = ticks.get(row["t"])
        row["sent"] = None if tick is None else tick.sent
        row["malformed_sent"] = None if tick is None else tick.malformed
        row["generator_behind_s"] = None if tick is None else tick.behind_s
        row["generator_cpu_s"] = None if tick is None else round(tick.cpu_s, 3)
        row["customers"] = None if tick is None else tick.customers


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _drain_ticks(ticks: Any, into: dict[int, Tick], timeout: float = 0.0) -> bool:
    """Move every queued Tick into ``into``; True once the generator's final tick arrived."""
    done = False
    while True:
        try:
            tick: Tick = ticks.get(timeout=timeout) if timeout else ticks.get_nowait()
        except queue.Empty:
            return done
        timeout = 0.0
        if tick.second in into:  # the final tick may repeat a second
            previous = into[tick.second]
            tick = Tick(
                tick.second,
                previous.sent + tick.sent,
                previous.malformed + tick.malformed,
                tick.target,
                max(previous.behind_s, tick.behind_s),
                tick.delivery_errors,
                tick.customers,
                previous.cpu_s + tick.cpu_s,
                tick.done,
            )
        into[tick.second] = tick
        done = done or tick.done


def _finished_step(schedule: RateSchedule, second: int) -> Phase | None:
    """The ramp step that ends with this second, if one does."""
    boundary = second + 1
    starts = [p.start_s for p in schedule.phases[1:]] + [schedule.duration_s]
    for phase, end in zip(schedule.phases, starts, strict=True):
        if math.isclose(end, boundary):
            return phase
    return None


def judge_step(
    rows: list[dict[str, Any]],
    ticks: dict[int, Tick],
    phase: Phase,
    objectives: Objectives,
    subscriber: Subscriber | None = None,
) -> RampStep:
    """A step is sustained when the generator delivered its rate, the system ended the step less
    than ``sustain_backlog_s`` behind, and p99 stayed within the objective. The first criterion
    that fails names what broke first."""
    end = rows[-1]["t"] + 1
    start = int(phase.start_s)
    settle = start + int((end - start) * SETTLE_SHARE)
    window = [row for row in rows if settle <= row["t"] < end]
    sent = sum(ticks[row["t"]].sent for row in window if row["t"] in ticks)
    seconds = max(len(window), 1)
    input_rate = sent / seconds
    processed_rate = sum(row["processed"] or 0 for row in window) / seconds
    if subscriber is not None:
        samples = subscriber.latencies_between(settle, end)
    else:
        samples = [row["p99_ms"] for row in window if row["p99_ms"] is not None]
    p99 = percentile(samples, 99)
    backlog = rows[-1]["backlog"]
    reason = ""
    if input_rate < phase.rate * (1 - objectives.generator_tolerance):
        reason = f"generator delivered {input_rate:,.0f}/s of {phase.rate:,.0f}/s"
    elif backlog is None or backlog > phase.rate * objectives.sustain_backlog_s:
        reason = (
            f"throughput: backlog {_fmt(backlog)} events after the step "
            f"(> {objectives.sustain_backlog_s:g} s of input), processing {processed_rate:,.0f}/s"
        )
    elif p99 is None:
        reason = "latency: no segment change arrived"
    elif p99 > objectives.p99_ms_max:
        reason = f"latency: p99 {p99:,.0f} ms > {objectives.p99_ms_max:g} ms"
    return RampStep(
        rate=phase.rate,
        start=start,
        end=end,
        sustained=not reason,
        reason=reason or "sustained",
        input_rate=round(input_rate, 1),
        processed_rate=round(processed_rate, 1),
        p99_ms=_round(p99),
        backlog_end=backlog,
    )


# --- summaries -----------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def summarise(
    result: SystemRun, schedule: RateSchedule, options: RunOptions, objectives: Objectives
) -> None:
    rows = result.rows
    s = result.summary
    run_end = min(schedule.duration_s, s.get("stopped_early_at_s") or schedule.duration_s)
    start = int(options.warmup)
    window = [r for r in rows if start <= r["t"] < run_end]
    sent = [float(r["sent"]) for r in window if r.get("sent") is not None]
    target_total = schedule.expected(run_end) - schedule.expected(start)
    s["window_s"] = [start, run_end]
    s["target_rate"] = round(target_total / max(run_end - start, 1e-9), 1)
    s["input_rate"] = _mean(sent)
    s["input_rate_broker"] = _mean([float(r["in"]) for r in window if r["in"] is not None])
    s["processed_rate"] = _mean(
        [float(r["processed"]) for r in window if r["processed"] is not None]
    )
    s["changes_rate"] = _mean([float(r["changes"]) for r in window])
    s["generator_accuracy"] = round(sum(sent) / target_total, 4) if target_total and sent else None
    s["generator_kept_up"] = (
        s["generator_accuracy"] is not None
        and s["generator_accuracy"] >= 1 - objectives.generator_tolerance
    )
    s["generator_behind_seconds"] = sum(1 for r in rows if (r.get("generator_behind_s") or 0) > 0.5)
    s["sent_total"] = sum(r.get("sent") or 0 for r in rows)
    s["malformed_sent"] = sum(r.get("malformed_sent") or 0 for r in rows)
    s["dead_letters_received"] = sum(r["dead_letters"] for r in rows)
    s["changes_received"] = sum(r["changes"] for r in rows)
    s["latency"] = latency_summary(result.latencies_ms)
    lags = [r["lag"] for r in rows if r["lag"] is not None]
    backlogs = [r["backlog"] for r in rows if r["backlog"] is not None]
    s["lag_max"] = max(lags, default=None)
    s["backlog_max"] = max(backlogs, default=None)
    s["backlog_end_of_schedule"] = next(
        (r["backlog"] for r in reversed(rows) if r["t"] < run_end), None
    )
    drain_rows = [r for r in rows if r["t"] >= run_end]
    s["drain_s"] = len(drain_rows) if s.get("drained") else None
    cpu: dict[str, Any] = {}
    rss: dict[str, Any] = {}
    names = sorted({name for r in rows for name in r["cpu"]})
    for name in names:
        values = [r["cpu"][name] for r in window if r["cpu"].get(name) is not None]
        memory = [r["rss_mb"][name] for r in rows if r["rss_mb"].get(name) is not None]
        cpu[name] = {"mean_percent": _mean(values), "max_percent": max(values, default=None)}
        rss[name] = {
            "start_mb": memory[0] if memory else None,
            "end_mb": memory[-1] if memory else None,
            "max_mb": max(memory, default=None),
        }
    s["cpu"] = cpu
    s["rss"] = rss
    s["machine_cpu_mean_percent"] = _mean([r["machine_cpu"] for r in window])
    if options.scenario is ScenarioName.SPIKE:
        s["spike"] = spike_figures(rows, schedule)
    if options.scenario is ScenarioName.SOAK:
        s["soak"] = soak_figures(rows, options)
    if options.scenario is ScenarioName.RAMP:
        sustained = [step.rate for step in result.ramp if step.sustained]
        failed = next((step for step in result.ramp if not step.sustained), None)
        s["max_sustainable_rate"] = max(sustained) if sustained else 0.0
        s["ramp_limit"] = (
            failed.reason
            if failed
            else f"none up to {result.ramp[-1].rate:,.0f}/s (--max-rate)"
            if result.ramp
            else None
        )


def spike_figures(rows: list[dict[str, Any]], schedule: RateSchedule) -> dict[str, Any]:
    """Drain time: from the end of the spike until the backlog is back to its pre-spike level
    (at most twice its median before the spike, and at least half a second of base input)."""
    spike = next(p for p in schedule.phases if p.name == "spike")
    spike_end = next(p.start_s for p in schedule.phases if p.name == "after")
    base = schedule.phases[0].rate
    before = [
        r["backlog"]
        for r in rows
        if spike.start_s / 2 <= r["t"] < spike.start_s and r["backlog"] is not None
    ]
    level = statistics.median(before) if before else 0
    threshold = max(2 * level, base * 0.5)
    drained_at = next(
        (
            r["t"] + 1
            for r in rows
            if r["t"] + 1 > spike_end and r["backlog"] is not None and r["backlog"] <= threshold
        ),
        None,
    )
    during = [r for r in rows if spike.start_s <= r["t"] < spike_end]
    sent = sum(r.get("sent") or 0 for r in during)
    return {
        "spike_start_s": spike.start_s,
        "spike_end_s": spike_end,
        "spike_rate_target": spike.rate,
        "spike_rate_sent": round(sent / max(len(during), 1), 1),
        "backlog_before_median": level,
        "drain_threshold": threshold,
        "backlog_peak": max((r["backlog"] or 0 for r in rows), default=0),
        "drained": drained_at is not None,
        "drain_s": None if drained_at is None else round(drained_at - spike_end, 1),
        "latency_peak_p99_ms": max((r["p99_ms"] or 0 for r in rows), default=0),
    }


def soak_figures(rows: list[dict[str, Any]], options: RunOptions) -> dict[str, Any]:
    """RSS of the system after warm-up versus at the end, the customers seen in between, RSS
    fitted against customers (bytes per customer), and the RSS slope over the second half (a
    leak keeps climbing after customers stop explaining it). Customers are the distinct ids the
    generator has sent: each one has state in the worker (RocksDB, caches, per-customer maps)."""
    measured = [r for r in rows if r["t"] >= options.warmup and r["rss_mb"].get("system")]
    if len(measured) < 4:
        return {}
    span = max(3, min(10, len(measured) // 10))
    start_rss = statistics.median(r["rss_mb"]["system"] for r in measured[:span])
    end_rss = statistics.median(r["rss_mb"]["system"] for r in measured[-span:])
    customers: list[int] = [r["customers"] for r in measured if r.get("customers") is not None]
    new_customers = (customers[-1] - customers[0]) if len(customers) >= 2 else 0
    half = measured[len(measured) // 2 :]
    xs = [float(r["t"]) for r in half]
    ys = [float(r["rss_mb"]["system"]) for r in half]
    slope = statistics.linear_regression(xs, ys).slope * 60 if len(half) >= 2 else None
    paired = [
        (float(r["customers"]), float(r["rss_mb"]["system"]))
        for r in measured
        if r.get("customers")
    ]
    per_customer = None
    if len(paired) >= 2 and len({c for c, _ in paired}) >= 2:
        fit = statistics.linear_regression([c for c, _ in paired], [m for _, m in paired])
        per_customer = round(fit.slope * 2**20)
    latency_first = [r["p99_ms"] for r in measured[: len(measured) // 4] if r["p99_ms"]]
    latency_last = [r["p99_ms"] for r in measured[-len(measured) // 4 :] if r["p99_ms"]]
    return {
        "rss_after_warmup_mb": round(start_rss, 1),
        "rss_end_mb": round(end_rss, 1),
        "rss_growth_mb": round(end_rss - start_rss, 1),
        "new_customers": new_customers,
        "rss_slope_second_half_mb_per_min": None if slope is None else round(slope, 2),
        "rss_bytes_per_customer_fitted": per_customer,
        "p99_first_quarter_median_ms": _round(statistics.median(latency_first))
        if latency_first
        else None,
        "p99_last_quarter_median_ms": _round(statistics.median(latency_last))
        if latency_last
        else None,
    }


# --- capacity (for the baseline ratios) ---------------------------------------------------------


def measure_capacity(
    kind: SystemKind,
    options: RunOptions,
    broker: Broker,
    workdir: Path,
    progress: Progress,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Events/s a system processes from a pre-published backlog (no rate limit): publish
    ``capacity_events`` first, start the system, time it from 10% to 90% processed (so start-up
    and the model's one-off warm-up at the start are left out)."""
    settings = run_settings(broker.settings, f"cap-{kind}", options.partitions, workdir)
    system = SystemProcess(kind, settings, workdir / f"capacity-{kind}.log")
    total = options.capacity_events
    watch = ProcessWatch()
    try:
        create_topics(settings)
        job = GeneratorJob(
            bootstrap=settings.bootstrap_servers,
            clickstream_topic=settings.clickstream_topic,
            transactions_topic=settings.transactions_topic,
            traffic=TrafficConfig(
                seed=options.seed,
                run_id="cap",
                returning_customers=options.customers,
                malformed_rate=options.malformed_rate,
            ),
            phases=[(0.0, 1_000_000.0, "backlog")],
            duration_s=timeout_s,
            start_at=time.time(),
            count=total,
        )
        progress.show(f"[capacity {kind}] publishing a backlog of {total:,} events")
        with generator_process(job) as (process, _stop, _ticks):
            process.join(timeout_s)
        probe = Probe(
            settings.bootstrap_servers, settings.input_topics, settings.partitions, system.group_id
        )
        published = probe.end_offsets() or total
        probe.close()
        system.start(create=False)
        watch.watch("system", system.pid)
        marks: list[tuple[float, int, float]] = []  # (time, processed, CPU seconds used)

        def all_processed() -> bool:
            done, cpu, now = system.processed(), watch.cpu_seconds("system"), time.monotonic()
            if done is None or cpu is None:
                return False
            marks.append((now, done, cpu))
            progress.show(f"[capacity {kind}] {done:,}/{published:,} processed")
            return done >= published

        wait_until(all_processed, timeout_s, every=0.25)
        return capacity_from_marks(kind, marks, published)
    finally:
        system.stop()
        with contextlib.suppress(Exception):
            delete_topics(settings)


def capacity_from_marks(
    kind: SystemKind | str, marks: list[tuple[float, int, float]], total: int
) -> dict[str, Any]:
    """Events/s between 10% and 90% processed, and the CPU the system used meanwhile. Events per
    CPU-second is the figure that survives a shared machine: a process starved by other work is
    slow in wall time but not per CPU-second."""

    def crossing(share: float) -> tuple[float, float] | None:
        goal = share * total
        for (t1, n1, c1), (t2, n2, c2) in itertools.pairwise(marks):
            if n1 < goal <= n2:
                f = (goal - n1) / (n2 - n1)
                return t1 + (t2 - t1) * f, c1 + (c2 - c1) * f
        return None

    low, high = crossing(0.1), crossing(0.9)
    rate = cpu_share = per_cpu = None
    if low is not None and high is not None and high[0] > low[0]:
        rate = 0.8 * total / (high[0] - low[0])
        cpu_share = (high[1] - low[1]) / (high[0] - low[0])
        per_cpu = 0.8 * total / (high[1] - low[1]) if high[1] > low[1] else None
    return {
        "system": str(kind),
        "events": total,
        "processed": marks[-1][1] if marks else 0,
        "events_per_s": None if rate is None else round(rate, 1),
        "cpu_mean_percent": None if cpu_share is None else round(100 * cpu_share, 1),
        "events_per_cpu_s": None if per_cpu is None else round(per_cpu, 1),
    }


def median_capacity(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median events/s (all repeats are kept next to it)."""
    measured = sorted(
        (s for s in samples if s.get("events_per_s") is not None), key=lambda s: s["events_per_s"]
    )
    chosen = dict(measured[len(measured) // 2]) if measured else dict(samples[-1])
    chosen["repeats"] = [
        {k: s.get(k) for k in ("events_per_s", "cpu_mean_percent", "events_per_cpu_s")}
        for s in samples
    ]
    return chosen


Runner = Callable[[SystemKind], SystemRun]
