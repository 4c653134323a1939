"""The objectives of issue #6, as settings (defaults from the issue, overridable by LOADTEST_*
variables), and the pure pass/fail evaluation of a run's findings against them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Objectives(BaseSettings):
    """What one worker must do. ``LOADTEST_P99_MS_MAX=150`` etc. override a default."""

    model_config = SettingsConfigDict(env_prefix="LOADTEST_", frozen=True, extra="forbid")

    max_rate_min: float = Field(10_000, gt=0)  # events/s one worker sustains (ramp)
    p99_ms_max: float = Field(100, gt=0)  # end-to-end p99 ...
    p99_at_rate: float = Field(5_000, gt=0)  # ... at this input rate
    naive_ratio_min: float = Field(3.0, gt=0)  # worker capacity / naive Faust agent's
    plain_ratio_min: float = Field(0.8, gt=0)  # worker capacity / plain confluent-kafka loop's
    spike_drain_s_max: float = Field(30, gt=0)  # backlog of a 10x spike gone within
    soak_rss_fixed_mb: float = Field(64, ge=0)  # RSS growth allowed regardless of customers
    soak_rss_per_customer_bytes: float = Field(2048, ge=0)  # plus this per new customer
    # Not objectives, but the validity of a run and of a ramp step:
    generator_tolerance: float = Field(0.03, gt=0, lt=1)  # input rate within 3% of target
    sustain_backlog_s: float = Field(2.0, gt=0)  # a sustained step ends < this much behind


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NOT_MEASURED = "not measured"


class Verdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    objective: str
    target: str
    measured: str
    status: Status
    note: str = ""


class Findings(BaseModel):
    """The figures the objectives are judged on; None = this run did not measure it."""

    model_config = ConfigDict(frozen=True)

    scenario: str
    target_rate: float
    input_rate: float | None = None  # achieved by the generator in the measured window
    p99_ms: float | None = None  # worker, measured window
    p99_at_input_rate: float | None = None  # the rate p99_ms was measured at
    max_sustainable_rate: float | None = None  # ramp
    ramp_limit: str | None = None  # what broke first
    capacity: dict[str, float] = Field(default_factory=dict)  # system -> events/s (backlog)
    spike_drain_s: float | None = None
    spike_drained: bool | None = None
    soak_rss_growth_mb: float | None = None
    soak_new_customers: int | None = None


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:,.2f}"


@dataclass(frozen=True)
class Measured:
    """What a run measured of an objective, against which target, and whether that passes."""

    target: str
    measured: str
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class NotMeasured:
    """An objective this run cannot judge; ``note`` says which run would."""

    target: str
    note: str
    measured: str = "-"


Judge = Callable[[Objectives, Findings], Measured | NotMeasured]


def _max_rate(o: Objectives, f: Findings) -> Measured | NotMeasured:
    """Max sustainable rate: only a ramp finds it."""
    target = f">= {_num(o.max_rate_min)} events/s"
    if f.max_sustainable_rate is None:
        return NotMeasured(target, "run --scenario ramp")
    return Measured(
        target,
        f"{_num(f.max_sustainable_rate)} events/s",
        f.max_sustainable_rate >= o.max_rate_min,
        f"limit: {f.ramp_limit}" if f.ramp_limit else "",
    )


def _p99(o: Objectives, f: Findings) -> Measured | NotMeasured:
    """p99 at the objective's rate (the input must really have arrived at that rate)."""
    target = f"<= {_num(o.p99_ms_max)} ms at {_num(o.p99_at_rate)} events/s"
    at = f.p99_at_input_rate
    if f.p99_ms is None:
        return NotMeasured(target, "no latency sample at that rate")
    if at is None:
        return NotMeasured(
            target,
            f"run --scenario steady --rate {o.p99_at_rate:g}",
            f"{_num(f.p99_ms)} ms (not at a steady rate)",
        )
    measured = f"{_num(f.p99_ms)} ms at {_num(at)}/s"
    if at < o.p99_at_rate * (1 - o.generator_tolerance):
        why = f"input rate {_num(at)}/s is below {_num(o.p99_at_rate)}/s"
        return NotMeasured(target, why, measured)
    return Measured(target, measured, f.p99_ms <= o.p99_ms_max)


def _ratio(system: str, minimum: Callable[[Objectives], float]) -> Judge:
    """Throughput against a baseline, measured side by side in the same run (backlog capacity)."""

    def judge(o: Objectives, f: Findings) -> Measured | NotMeasured:
        worker, other = f.capacity.get("worker"), f.capacity.get(system)
        target = f">= {minimum(o):g}x"
        if worker is None or not other:
            return NotMeasured(target, "run with --baseline")
        ratio = worker / other
        measured = f"{ratio:.2f}x ({_num(worker)} vs {_num(other)} events/s)"
        return Measured(target, measured, ratio >= minimum(o))

    return judge


def _spike(o: Objectives, f: Findings) -> Measured | NotMeasured:
    target = f"<= {_num(o.spike_drain_s_max)} s"
    if f.spike_drained is None:
        return NotMeasured(target, "run --scenario spike")
    if not f.spike_drained or f.spike_drain_s is None:
        return Measured(target, "did not drain", passed=False)
    return Measured(target, f"{f.spike_drain_s:.1f} s", f.spike_drain_s <= o.spike_drain_s_max)


def _soak(o: Objectives, f: Findings) -> Measured | NotMeasured:
    """RSS growth explained by the customers added."""
    fixed, per_customer = _num(o.soak_rss_fixed_mb), _num(o.soak_rss_per_customer_bytes)
    if f.soak_rss_growth_mb is None or f.soak_new_customers is None:
        target = f"<= {fixed} MB + {per_customer} B per new customer"
        return NotMeasured(target, "run --scenario soak")
    allowed = o.soak_rss_fixed_mb + f.soak_new_customers * o.soak_rss_per_customer_bytes / 2**20
    customers = f"{f.soak_new_customers:,} customers x {per_customer} B"
    return Measured(
        f"<= {allowed:,.1f} MB ({fixed} MB + {customers})",
        f"{f.soak_rss_growth_mb:+,.1f} MB",
        f.soak_rss_growth_mb <= allowed,
    )


# The objectives of issue #6, in the order the report lists them.
OBJECTIVES: Final[tuple[tuple[str, Judge], ...]] = (
    ("max sustainable rate, one worker", _max_rate),
    ("end-to-end p99 latency", _p99),
    ("throughput vs the naive Faust agent", _ratio("naive-faust", lambda o: o.naive_ratio_min)),
    (
        "throughput vs the plain confluent-kafka loop",
        _ratio("plain-loop", lambda o: o.plain_ratio_min),
    ),
    ("10x spike drains", _spike),
    ("soak: no unexplained RSS growth", _soak),
)


def evaluate(objectives: Objectives, findings: Findings) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for name, judge in OBJECTIVES:
        found = judge(objectives, findings)
        if isinstance(found, NotMeasured):
            status = Status.NOT_MEASURED
        else:
            status = Status.PASS if found.passed else Status.FAIL
        verdicts.append(
            Verdict(
                objective=name,
                target=found.target,
                measured=found.measured,
                status=status,
                note=found.note,
            )
        )
    return verdicts
