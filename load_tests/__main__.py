"""``python -m load_tests run --scenario steady --rate 5000 --duration 60 --report DIR``.

Starts what is missing (a local broker unless ``--bootstrap`` names one, the topics, the system
under test), runs the scenario while measuring from outside, stops everything it started (also on
errors and Ctrl-C) and writes DIR/report.json, DIR/report.md and DIR/*.png.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import orjson
from pydantic import ValidationError

from load_tests.objectives import Findings, Objectives, evaluate
from load_tests.report import machine, overall, verdict_rows, write_report
from load_tests.scenarios import (
    Progress,
    RunLoop,
    RunOptions,
    ScenarioName,
    SystemRun,
    build_schedule,
    measure_capacity,
    median_capacity,
)
from load_tests.systems import DESCRIPTIONS, SystemKind, broker
from stream_app.errors import UserError

EXIT_OBJECTIVES_MISSED = 3

SCENARIO_HELP = """scenarios:
  steady  a fixed --rate for --duration seconds (latency and throughput at that rate)
  ramp    from --rate up by --step-rate every --step-s seconds until a step is not sustained
          (backlog or p99 objective broken) or --max-rate: the max sustainable rate, and what
          broke first; --duration is ignored
  spike   --rate, then --spike-factor x (10x) for --spike-s seconds, then --rate again: how long
          the backlog takes to drain
  soak    a long steady run (e.g. --duration 1800): RSS and latency drift
  smoke   a short steady run at a low rate (CI: checks the harness, not the speed)

objectives (defaults from issue #6, override with LOADTEST_* variables, e.g. LOADTEST_P99_MS_MAX):
  max sustainable rate >= 10,000/s (ramp); p99 <= 100 ms at 5,000/s (steady);
  >= 3x the naive Faust agent and >= 0.8x the plain confluent-kafka loop (--baseline);
  a 10x spike drains within 30 s (spike); RSS growth explained by new customers (soak)
"""


class _Parser(argparse.ArgumentParser):
    """Mistakes on the command line: one clear line, no usage dump, no traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"load_tests: {message} (see python -m load_tests run --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m load_tests", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="run a load scenario and write a report",
        description="Run a load scenario against one stream_app worker and write a report.",
        epilog=SCENARIO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = RunOptions()
    run.add_argument("--scenario", choices=[s.value for s in ScenarioName], default="steady")
    run.add_argument(
        "--rate",
        type=float,
        default=None,
        help="events/s (ramp: start rate; default 1000, smoke 200)",
    )
    run.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of traffic (default 60; soak 1800; smoke 8)",
    )
    run.add_argument(
        "--report",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for report.json, report.md and the PNG charts",
    )
    run.add_argument(
        "--baseline",
        action="store_true",
        help="also run the plain confluent-kafka loop and the naive Faust agent "
        "(same traffic), and measure all three from a backlog, for the ratios",
    )
    run.add_argument(
        "--seed", type=int, default=defaults.seed, help="traffic seed (same seed, same traffic)"
    )
    run.add_argument(
        "--partitions",
        type=int,
        default=defaults.partitions,
        help=f"input partitions (default {defaults.partitions})",
    )
    run.add_argument(
        "--customers",
        type=int,
        default=defaults.customers,
        help="returning customers in the pool (new ones are added on top)",
    )
    run.add_argument(
        "--malformed-rate",
        type=float,
        default=defaults.malformed_rate,
        help="share of malformed messages (default 0.005)",
    )
    run.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds left out of the steady-state figures (default min(10, 20%%))",
    )
    run.add_argument(
        "--spike-factor", type=float, default=defaults.spike_factor, help="spike: x --rate (10)"
    )
    run.add_argument(
        "--spike-s", type=float, default=defaults.spike_s, help="spike: seconds of burst (10)"
    )
    run.add_argument(
        "--step-rate", type=float, default=None, help="ramp increment (default the start rate)"
    )
    run.add_argument(
        "--step-s", type=float, default=defaults.step_s, help="ramp: seconds per step (20)"
    )
    run.add_argument(
        "--max-rate", type=float, default=defaults.max_rate, help="ramp: last step (30000)"
    )
    run.add_argument(
        "--drain-timeout",
        type=float,
        default=defaults.drain_timeout_s,
        help="seconds to wait after the traffic for the backlog to drain",
    )
    run.add_argument(
        "--capacity-events",
        type=int,
        default=defaults.capacity_events,
        help="backlog size for the side-by-side capacity (with --baseline)",
    )
    run.add_argument(
        "--capacity-repeats",
        type=int,
        default=defaults.capacity_repeats,
        help="capacity measurements per system, interleaved; the median counts (default 1)",
    )
    run.add_argument(
        "--bootstrap", default=None, help="use this running broker instead of starting a local one"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress line")
    run.add_argument(
        "--fail-on-miss",
        action="store_true",
        help=f"exit {EXIT_OBJECTIVES_MISSED} when a measured objective fails",
    )
    render = sub.add_parser(
        "render", help="write report.md and the charts again from DIR/report.json"
    )
    render.add_argument("report", type=Path, metavar="DIR")
    return parser


def options_from(args: argparse.Namespace) -> RunOptions:
    scenario = ScenarioName(args.scenario)
    rate = (
        args.rate
        if args.rate is not None
        else (200.0 if scenario is ScenarioName.SMOKE else 1000.0)
    )
    default_duration = {ScenarioName.SOAK: 1800.0, ScenarioName.SMOKE: 8.0}.get(scenario, 60.0)
    return RunOptions(
        scenario=scenario,
        rate=rate,
        duration_s=args.duration if args.duration is not None else default_duration,
        warmup_s=args.warmup,
        seed=args.seed,
        partitions=args.partitions,
        customers=args.customers,
        malformed_rate=args.malformed_rate,
        spike_factor=args.spike_factor,
        spike_s=args.spike_s,
        step_rate=args.step_rate,
        step_s=args.step_s,
        max_rate=args.max_rate,
        drain_timeout_s=args.drain_timeout,
        baseline=args.baseline,
        capacity_events=args.capacity_events,
        capacity_repeats=args.capacity_repeats,
        bootstrap=args.bootstrap,
        report_dir=args.report,
        progress=not args.no_progress,
    )


def run_load(options: RunOptions, objectives: Objectives, command: str = "") -> dict[str, Any]:
    """Run the scenario (and the baselines when asked) and write the report; returns its data."""
    progress = Progress(options.progress)
    started, began = datetime.now(UTC), time.monotonic()
    info = machine()
    systems = [SystemKind.WORKER]
    if options.baseline:
        systems += [SystemKind.PLAIN, SystemKind.NAIVE]
    runs: list[SystemRun] = []
    capacity: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="load-test-") as tmp,
        broker(options.bootstrap, Path(tmp) / "broker") as kafka,
    ):
        for kind in systems:
            loop = RunLoop(
                kind, options, objectives, kafka, Path(tmp), progress, f"{options.scenario}"
            )
            run = loop.run()
            runs.append(run)
            s = run.summary
            progress.done(
                f"{kind}: in {s['input_rate']}/s, processed {s['processed_rate']}/s, "
                f"p99 {s['latency']['p99_ms']} ms, max lag {s['lag_max']}"
            )
        if options.baseline:
            # Interleaved repeats, so a burst of other work on the machine hits every system.
            # The floor runs in the capacity measurement only: it has no segmentation to report.
            measured = [*systems, SystemKind.FLOOR]
            samples: dict[str, list[dict[str, Any]]] = {str(kind): [] for kind in measured}
            for _ in range(options.capacity_repeats):
                for kind in measured:
                    sample = measure_capacity(kind, options, kafka, Path(tmp), progress)
                    samples[str(kind)].append(sample)
                    progress.done(
                        f"capacity {kind}: {sample['events_per_s']} events/s, "
                        f"{sample['events_per_cpu_s']} per CPU-second"
                    )
            capacity = {name: median_capacity(found) for name, found in samples.items()}
        logs = _keep_logs(runs, options.report_dir)
    worker = runs[0]
    ws = worker.summary
    findings = Findings(
        scenario=str(options.scenario),
        target_rate=options.rate,
        input_rate=ws["input_rate"],
        p99_ms=ws["latency"]["p99_ms"],
        p99_at_input_rate=_p99_rate(worker, options),
        max_sustainable_rate=ws.get("max_sustainable_rate"),
        ramp_limit=ws.get("ramp_limit"),
        capacity={k: v["events_per_s"] for k, v in capacity.items() if v.get("events_per_s")},
        spike_drain_s=ws.get("spike", {}).get("drain_s"),
        spike_drained=ws.get("spike", {}).get("drained"),
        soak_rss_growth_mb=ws.get("soak", {}).get("rss_growth_mb"),
        soak_new_customers=ws.get("soak", {}).get("new_customers"),
    )
    if options.scenario is ScenarioName.RAMP:
        findings = _ramp_p99(findings, worker, objectives)
    verdicts = evaluate(objectives, findings)
    schedule = build_schedule(options)
    data: dict[str, Any] = {
        "command": command,
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - began, 1),
        "machine": info,
        "options": {
            **options.model_dump(mode="json"),
            "warmup": options.warmup,
            "schedule": [
                {"start_s": p.start_s, "rate": p.rate, "name": p.name} for p in schedule.phases
            ],
            "schedule_duration_s": schedule.duration_s,
        },
        "objectives": objectives.model_dump(mode="json"),
        "findings": findings.model_dump(mode="json"),
        "verdicts": verdict_rows(verdicts),
        "result": overall(verdicts),
        "systems": {str(k): DESCRIPTIONS[k] for k in systems},
        "capacity": capacity,
        "logs": logs,
        "runs": [
            {
                "system": str(run.kind),
                "settings": run.settings,
                "summary": run.summary,
                "ramp": [vars(step) for step in run.ramp],
                "metrics": run.metrics,
                "rows": run.rows,
            }
            for run in runs
        ],
    }
    write_report(options.report_dir, data)
    return data


def _p99_rate(run: SystemRun, options: RunOptions) -> float | None:
    """The input rate p99 was measured at: the achieved input of a steady-like run."""
    if options.scenario in (ScenarioName.STEADY, ScenarioName.SOAK, ScenarioName.SMOKE):
        rate: float | None = run.summary["input_rate"]
        return rate
    return None


def _ramp_p99(findings: Findings, run: SystemRun, objectives: Objectives) -> Findings:
    """In a ramp, the p99 objective is judged on the step at the objective's rate, if reached."""
    for step in run.ramp:
        if abs(step.rate - objectives.p99_at_rate) < 1e-6:
            return findings.model_copy(
                update={"p99_ms": step.p99_ms, "p99_at_input_rate": step.input_rate}
            )
    return findings.model_copy(update={"p99_ms": None, "p99_at_input_rate": None})


def _keep_logs(runs: list[SystemRun], directory: Path) -> dict[str, str]:
    """Copy the tail of each system's log next to the report (the temp folder goes away)."""
    directory.mkdir(parents=True, exist_ok=True)
    kept: dict[str, str] = {}
    for run in runs:
        source = Path(run.settings.get("log", ""))
        if source.is_file():
            text = source.read_text(errors="replace").replace("\x1b[?25l", "")
            text = text.replace("\x1b[?25h", "")  # Faust's spinner on a non-terminal
            lines = [line[:1000] for line in text.splitlines()[-200:]]
            target = directory / f"{run.kind}.log"
            target.write_text("\n".join(lines) + "\n")
            kept[str(run.kind)] = target.name
            run.settings["log"] = target.name
    return kept


def render(directory: Path) -> int:
    try:
        data = orjson.loads((directory / "report.json").read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"load_tests: cannot read {directory / 'report.json'}: {exc}", file=sys.stderr)
        return 1
    if "findings" in data and "objectives" in data:  # judged again by the current rules
        verdicts = evaluate(Objectives(**data["objectives"]), Findings(**data["findings"]))
        data["verdicts"] = verdict_rows(verdicts)
        data["result"] = overall(verdicts)
    write_report(directory, data)
    print(f"report: {directory / 'report.md'}")
    return 0


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: clean up exactly as on Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "render":
        return render(args.report)
    try:
        options = options_from(args)
        objectives = Objectives()
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        print(f"load_tests: {where + ': ' if where else ''}{message}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    command = "python -m load_tests " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        data = run_load(options, objectives, command)
    except UserError as exc:
        print(f"load_tests: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("load_tests: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"load_tests: {exc}", file=sys.stderr)
        return 1
    for verdict in data["verdicts"]:
        print(
            f"{verdict['status']:>12}  {verdict['objective']}: {verdict['measured']} "
            f"(target {verdict['target']})"
        )
    print(f"report: {options.report_dir / 'report.md'}")
    if args.fail_on_miss and data["result"] == "fail":
        return EXIT_OBJECTIVES_MISSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
