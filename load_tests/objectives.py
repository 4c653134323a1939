"""The objectives of issue #6, as settings (defaults from the issue, overridable by LOADTEST_*
variables), and the pure pass/fail evaluation of a run's findings against them."""

from __future__ import annotations

from enum import StrEnum

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


def evaluate(objectives: Objectives, findings: Findings) -> list[Verdict]:
    o, f = objectives, findings
    verdicts: list[Verdict] = []

    # 1. Max sustainable rate: only a ramp finds it.
    target = f">= {_num(o.max_rate_min)} events/s"
    if f.max_sustainable_rate is None:
        verdicts.append(
            Verdict(
                objective="max sustainable rate, one worker",
                target=target,
                measured="-",
                status=Status.NOT_MEASURED,
                note="run --scenario ramp",
            )
        )
    else:
        verdicts.append(
            Verdict(
                objective="max sustainable rate, one worker",
                target=target,
                measured=f"{_num(f.max_sustainable_rate)} events/s",
                status=Status.PASS if f.max_sustainable_rate >= o.max_rate_min else Status.FAIL,
                note=f"limit: {f.ramp_limit}" if f.ramp_limit else "",
            )
        )

    # 2. p99 at the objective's rate (the input must really have arrived at that rate).
    target = f"<= {_num(o.p99_ms_max)} ms at {_num(o.p99_at_rate)} events/s"
    at = f.p99_at_input_rate
    if f.p99_ms is None or at is None or at < o.p99_at_rate * (1 - o.generator_tolerance):
        if f.p99_ms is None:
            measured, why = "-", "no latency sample at that rate"
        elif at is None:
            measured = f"{_num(f.p99_ms)} ms (not at a steady rate)"
            why = f"run --scenario steady --rate {o.p99_at_rate:g}"
        else:
            measured = f"{_num(f.p99_ms)} ms at {_num(at)}/s"
            why = f"input rate {_num(at)}/s is below {_num(o.p99_at_rate)}/s"
        verdicts.append(
            Verdict(
                objective="end-to-end p99 latency",
                target=target,
                measured=measured,
                status=Status.NOT_MEASURED,
                note=why,
            )
        )
    else:
        verdicts.append(
            Verdict(
                objective="end-to-end p99 latency",
                target=target,
                measured=f"{_num(f.p99_ms)} ms at {_num(at)}/s",
                status=Status.PASS if f.p99_ms <= o.p99_ms_max else Status.FAIL,
            )
        )

    # 3./4. Ratios, measured side by side in the same run (backlog capacity).
    worker = f.capacity.get("worker")
    for name, minimum, label in (
        ("naive-faust", o.naive_ratio_min, "vs the naive Faust agent"),
        ("plain-loop", o.plain_ratio_min, "vs the plain confluent-kafka loop"),
    ):
        other = f.capacity.get(name)
        target = f">= {minimum:g}x"
        if worker is None or not other:
            verdicts.append(
                Verdict(
                    objective=f"throughput {label}",
                    target=target,
                    measured="-",
                    status=Status.NOT_MEASURED,
                    note="run with --baseline",
                )
            )
            continue
        ratio = worker / other
        verdicts.append(
            Verdict(
                objective=f"throughput {label}",
                target=target,
                measured=f"{ratio:.2f}x ({_num(worker)} vs {_num(other)} events/s)",
                status=Status.PASS if ratio >= minimum else Status.FAIL,
            )
        )

    # 5. Spike drain.
    target = f"<= {_num(o.spike_drain_s_max)} s"
    if f.spike_drained is None:
        verdicts.append(
            Verdict(
                objective="10x spike drains",
                target=target,
                measured="-",
                status=Status.NOT_MEASURED,
                note="run --scenario spike",
            )
        )
    elif not f.spike_drained or f.spike_drain_s is None:
        verdicts.append(
            Verdict(
                objective="10x spike drains",
                target=target,
                measured="did not drain",
                status=Status.FAIL,
            )
        )
    else:
        verdicts.append(
            Verdict(
                objective="10x spike drains",
                target=target,
                measured=f"{f.spike_drain_s:.1f} s",
                status=Status.PASS if f.spike_drain_s <= o.spike_drain_s_max else Status.FAIL,
            )
        )

    # 6. Soak: RSS growth explained by the customers added.
    if f.soak_rss_growth_mb is None or f.soak_new_customers is None:
        verdicts.append(
            Verdict(
                objective="soak: no unexplained RSS growth",
                target=f"<= {_num(o.soak_rss_fixed_mb)} MB + "
                f"{_num(o.soak_rss_per_customer_bytes)} B per new customer",
                measured="-",
                status=Status.NOT_MEASURED,
                note="run --scenario soak",
            )
        )
    else:
        allowed = o.soak_rss_fixed_mb + f.soak_new_customers * o.soak_rss_per_customer_bytes / 2**20
        verdicts.append(
            Verdict(
                objective="soak: no unexplained RSS growth",
                target=f"<= {allowed:,.1f} MB ({_num(o.soak_rss_fixed_mb)} MB + "
                f"{f.soak_new_customers:,} customers x {_num(o.soak_rss_per_customer_bytes)} B)",
                measured=f"{f.soak_rss_growth_mb:+,.1f} MB",
                status=Status.PASS if f.soak_rss_growth_mb <= allowed else Status.FAIL,
            )
        )
    return verdicts
